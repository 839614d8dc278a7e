"""Command line: ``python -m minipissa convert ADAPTER OUT_DIR [--rank K] [--prefix P]``, ``inspect FILE`` and
``import-peft INITIAL TRAINED BASE OUT``.

Expected errors (bad files, bad arguments) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from math import prod

from ..core.decompose import explained_energy
from ..core.errors import StateError
from ..core.nf4 import stored_bytes
from ..core.table import table
from ..io import adapter_file as state
from ..io import records, trained_modules
from ..io import residual_file as residual
from ..io.safefile import read
from .peft_export import PEFT_PREFIX, SERVING_RANK_LIMIT, convert_to_lora, snap_rank
from .peft_import import import_peft_files


def _convert(args: argparse.Namespace) -> int:
    rank = args.rank if args.rank is None or not args.snap else snap_rank(args.rank)
    report = convert_to_lora(
        args.adapter, args.out_dir, prefix=args.prefix, rank=rank, base_model_name_or_path=args.base_model,
        task_type=args.task_type,
    )  # fmt: skip
    print(
        f"wrote a PEFT LoRA adapter for the original weights to {report.out_dir}: {report.modules} modules, "
        f"r = lora_alpha = {report.rank} (scaling 1, no patterns: read alike by PEFT, vLLM, SGLang, TGI)"
    )
    if rank is not None:
        snapped = f" (--rank {args.rank} snapped to {rank})" if rank != args.rank else ""
        print(
            f"re-compressed to rank <= {rank}{snapped}: relative error of the weight update {report.relative_error:.3g}"
        )
    needed = report.serving_rank
    print(
        f"vLLM needs max_lora_rank >= {report.rank}: {needed if needed else 'more than 512, which it does not allow'}"
    )
    if needed is None or needed > SERVING_RANK_LIMIT:
        print(
            f"warning: adapter rank {report.rank} exceeds {SERVING_RANK_LIMIT}, vLLM's default max_lora_rank; "
            f"serve with --max-lora-rank {needed}, or convert with --rank {SERVING_RANK_LIMIT} "
            "(reports the error it introduces)",
            file=sys.stderr,
        )
    if report.modules_to_save:
        print(
            f"warning: modules trained in full {report.modules_to_save} are written as modules_to_save: PEFT loads "
            "this adapter, vLLM refuses it (serve the merged model instead)",
            file=sys.stderr,
        )
    if report.trained_biases:
        print(
            f"warning: the biases of {report.trained_biases} were trained and are written as PEFT's bias='lora_only': "
            "PEFT loads them; a loader that reads only lora_A/lora_B leaves them out (serve the merged model instead)",
            file=sys.stderr,
        )
    if report.quantization_errors:
        mean = sum(report.quantization_errors.values()) / len(report.quantization_errors)
        print(
            f"QPiSSA adapter: on the 16-bit base this LoRA differs from the trained 4-bit model by {mean:.3g} of ||W||"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    info, tensors = read(args.file)  # verifies the checksums too
    size = os.path.getsize(args.file)
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{args.file}: minipissa {info['kind']} file, format version {info['format_version']}")
    print(f"{len(tensors)} tensors, {data:,} bytes of tensor data; file {size:,} bytes (+{size - data:,} header)")
    if info["kind"] == "residual":
        tied, modules, _, quantized = residual.read(args.file)
        print(f"residual weights of {len(modules)} modules; tied keys: {tied or 'none'}")
        if quantized:
            kinds = "/".join(sorted({"nf4+dq" if w.double_quant else "nf4" for w in quantized.values()}))
            stored, weights = sum(w.bytes for w in quantized.values()), sum(prod(w.shape) for w in quantized.values())
            print(f"4-bit (NF4) residuals: {len(quantized)} modules ({kinds}), {stored:,} bytes "
                  f"({stored / weights:.4f} bytes per weight)")  # fmt: skip
        return 0
    info, recs, other = state.read(args.file)  # every field checked
    full, _ = trained_modules.unpack(info.get("trained"), dict(other), f"minipissa: '{args.file}'")
    print("config: " + ", ".join(f"{k}={v}" for k, v in records.config_summary(recs).items()))
    print(f"optimizer state: {'yes, ' + info['optimizer']['class'] if info.get('optimizer') else 'no'}")
    print(f"modules trained in full: {', '.join(sorted(full)) or 'none'}")
    nf4_recs = [rec for rec in recs if rec.info["quantize"] is not None]
    rows = []
    for rec in recs:
        sigma = rec.info["singular_values"]
        share = explained_energy(sigma, rec.info["weight_norm"])
        top = ", ".join(f"{s:.4g}" for s in sigma[:4]) + (", ..." if len(sigma) > 4 else "")
        shape = f"{rec.out_features} x {rec.in_features}"
        energy = "-" if share is None else f"{share:.3f}"
        flag = " (fan_in_fan_out)" if rec.fan_in_fan_out else ""
        rows.append([rec.name, shape, str(rec.rank), f"{rec.alpha:g}", energy, rec.base_dtype, top + flag])
    header = ["module", "out x in", "rank", "alpha", "energy", "dtype", "top singular values"]
    print("\n".join(table(header, rows, left=(0, len(header) - 1))))
    if nf4_recs:  # QPiSSA: what the 4-bit residual costs, against QLoRA's
        errors = [(r.info["nf4_error"], r.info["qlora_error"]) for r in nf4_recs]
        mean = sum(1 - e / q for e, q in errors if q > 0) / len(errors)
        iters = nf4_recs[0].info["quant_iters"]
        dq = [r.info.get("double_quant", False) for r in nf4_recs]
        kinds = "/".join(sorted({"nf4+dq" if d else "nf4" for d in dq}))
        weights = sum(r.in_features * r.out_features for r in nf4_recs)
        stored = sum(stored_bytes(r.in_features * r.out_features, d) for r, d in zip(nf4_recs, dq, strict=True))
        print(f"QPiSSA: {len(nf4_recs)} modules with a 4-bit NF4 residual ({kinds}: {stored:,} bytes, "
              f"{stored / weights:.4f} per weight), quant_iters={iters}; quantization error")  # fmt: skip
        print(f"{mean:.1%} below QLoRA's (Frobenius norm, mean over modules)")
    return 0


def _import_peft(args: argparse.Namespace) -> int:
    names = import_peft_files(args.initial, args.trained, args.base, args.out)
    print(f"imported a PEFT PiSSA adapter ({len(names)} modules) into {args.out}; load it onto the base model with")
    print("minipissa.load(model, path); its fingerprints are those of the base checkpoint's weights")
    return 0


def _rank(text: str) -> int:
    """``--rank``: an integer >= 1 (argparse turns the error into a usage message and exit status 2)."""
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return rank


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minipissa", description="minipissa adapter files")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert", help="PiSSA adapter file -> PEFT LoRA adapter directory for the original base model"
    )
    convert.add_argument("adapter", help="file written by minipissa.save()")
    convert.add_argument("out_dir", help="directory for adapter_model.safetensors, adapter_config.json, README.md")
    convert.add_argument(
        "--rank", type=_rank, default=None, help="re-compress each update to at most this rank (an integer >= 1)"
    )
    convert.add_argument("--snap", action="store_true", help="round --rank down to a max_lora_rank vLLM accepts")
    convert.add_argument("--prefix", default=PEFT_PREFIX, help=f"tensor key prefix (default {PEFT_PREFIX!r})")
    convert.add_argument("--base-model", default=None, help="base_model_name_or_path for the config and model card")
    convert.add_argument("--task-type", default=None, help="PEFT task_type, e.g. CAUSAL_LM")
    convert.set_defaults(run=_convert)
    imports = commands.add_parser("import-peft", help="a PiSSA adapter trained with PEFT -> a minipissa adapter file")
    imports.add_argument("initial", help="PEFT's initial PiSSA adapter directory (saved right after the init)")
    imports.add_argument("trained", help="the trained PEFT adapter directory")
    imports.add_argument("base", help="the ORIGINAL base model's weights (one .safetensors file)")
    imports.add_argument("out", help="the minipissa adapter file to write")
    imports.set_defaults(run=_import_peft)
    inspect = commands.add_parser("inspect", help="config, modules, shapes, singular values of a minipissa file")
    inspect.add_argument("file")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # a reader gone already fails here, not in the interpreter's flush at exit (status 120)
        return code
    except BrokenPipeError:  # `inspect ... | head`: the reader left; say nothing more (nor at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (StateError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
