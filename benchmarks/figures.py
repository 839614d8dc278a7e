"""The figures in the READMEs and docs/, rendered from recorded benchmark and example output, never typed.

Each figure is a block in a markdown file between ``<!-- figure: NAME -->`` and ``<!-- /figure -->``; its content is
made here from a results file (JSON written by a benchmark or an example; a log where a run predates JSON output),
with the machine, threads, versions and date the run recorded beside it.

    python benchmarks/figures.py            # re-render every block in place (after a new run wrote its results)
    python benchmarks/figures.py --check    # exit 1 and name the stale blocks (tests/api/test_figures.py runs it)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", "examples/README.md", "benchmarks/README.md"] + [
    f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))
]
BLOCK = re.compile(r"(<!-- figure: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figure -->)", re.S)


def load(path: str) -> Any:
    return json.loads((ROOT / path).read_text())


def rows_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def caption(env: dict[str, Any], source: str, extra: str = "") -> str:
    """Where and when: device (or CPU model and cores), threads, torch, date, and the results file."""
    where = env.get("device", "?")
    if where == "cpu":
        where = (
            "CPU"
            if not env.get("cpu")
            else f"{env['cpu']} CPU" + (f", {env['cores']} cores" if env.get("cores") else "")
        )
    threads = env.get("torch_threads", env.get("cpu_threads"))
    parts = [where, f"{threads} torch thread{'s' * (threads != 1)}" if threads else "",
             f"torch {env.get('torch', '?')}", f"Python {env['python']}" if env.get("python") else "",
             env.get("date", "?")]  # fmt: skip
    return f"*Measured on {', '.join(p for p in parts if p)}{extra}; raw output: `{source}`.*"


def spread(median: float, low: float, high: float, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(median)} ({fmt.format(low)}–{fmt.format(high)})"


def example(stem: str) -> Callable[[], str]:
    """An example's final table: losses, held-out loss at the first evaluation, time and speed."""

    def render() -> str:
        source = f"examples/results/{stem}_results.json"
        data = load(source)
        first = min((int(s) for r in data["rows"] if r["heldout_curve"] for s in r["heldout_curve"]), default=None)
        header = ["method", "lr", "train loss", f"held-out @ step {first}", "held-out (end)", "seconds", "tokens/s"]
        rows = []
        for r in data["rows"]:
            early = "-" if not r["heldout_curve"] else f"{r['heldout_curve'][str(first)]:.3f}"
            rows.append([r["method"], "-" if r["lr"] is None else f"{r['lr']:g}", f"{r['train_loss']:.3f}", early,
                         f"{r['heldout_loss']:.3f}", "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
                         "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"])  # fmt: skip
        run = data["run"]
        extra = f"; {run['steps']} steps of batch {run['batch']} × {run['seq']}, whole run {run['wall_seconds']:.0f} s"
        return rows_table(header, rows) + "\n\n" + caption(data["machine"], source, extra)

    return render


def minilm_classify() -> str:
    """The MiniLM example's 3-seed table, from its log (the run predates the JSON output; its machine is recorded
    in the sidecar .json, its torch and threads in the log's header)."""
    source = "examples/results/minilm_sweep_seeds3.log"
    text = (ROOT / source).read_text()
    table = text[text.rindex("\nmethod ") + 1 :].split("\n(")[0].strip().splitlines()
    header = ["method", "lr", "held-out accuracy", "held-out loss", "steps to 0.703", "train s"]
    rows = [line.split()[:5] + [line.split()[6]] for line in table[1:]]
    return rows_table(header, rows) + "\n\n" + caption(load(source.replace(".log", ".json")), source, "; 3 seeds")


def step(source: str, names: dict[str, str]) -> Callable[[], str]:
    """A training-step benchmark: each contender's median ms (min–max), its multiple of the frozen base, peak."""

    def render() -> str:
        data = load(source)
        rows = []
        for r in data["rows"]:
            if r["contender"] in names:
                peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
                rows.append([names[r["contender"]], spread(r["ms"], r["ms_min"], r["ms_max"]),
                             f"{r['x_frozen']:.2f}x", peak])  # fmt: skip
        extra = f"; {data['setting']}, batch {' × '.join(map(str, data['batch']))}, r = {data['rank']}"
        header = ["", "ms per step, median (min–max)", "× frozen base", "peak GiB"]
        return rows_table(header, rows) + "\n\n" + caption(data["env"], source, extra)

    return render


def init(source: str) -> Callable[[], str]:
    """An init benchmark: seconds, median (min–max) over its rounds, and the memory above the model's."""

    def render() -> str:
        data = load(source)
        rows = []
        for r in data["rows"]:
            peak = "-" if r.get("peak_extra_gib") is None else f"{r['peak_extra_gib']:.2f}"
            rows.append([r["contender"], spread(r["s_median"], r["s_min"], r["s_max"], "{:.2f}"), peak])
        extra = (
            f"; {data['setting']}, {data['matrices']} matrices, r = {data['rank']}, {data['rows'][0]['rounds']} rounds"
        )
        header = ["", "seconds, median (min–max)", "GiB above the model"]
        return rows_table(header, rows) + "\n\n" + caption(data["env"], source, extra)

    return render


def qpissa_error() -> str:
    """Quantization error below QLoRA's on real MiniLM weights, single and double-quantized absmax."""
    single, double = (
        "benchmarks/results/qpissa_error_minilm_niter4.json",
        "benchmarks/results/qpissa_error_minilm_double_quant.json",
    )
    runs = [load(single), load(double)]
    header = [
        "method",
        "rank",
        "error below QLoRA's, mean (min–max) %",
        "with double quantization %",
        "paper/PEFT anchor %",
    ]
    rows = []
    for a, b in zip(runs[0]["rows"], runs[1]["rows"], strict=True):
        if a["method"] != "QLoRA":
            rows.append([a["method"], str(a["rank"]), spread(a["mean"], a["min"], a["max"]),
                         spread(b["mean"], b["min"], b["max"]), f"{a['anchor']:g}"])  # fmt: skip
    note = f"; 36 matrices; double quantization run {runs[1]['environment']['date']}"
    return rows_table(header, rows) + "\n\n" + caption(runs[0]["environment"], single, note)


def lines(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (ROOT / path).read_text().splitlines() if line.strip()]


def stream_70b() -> str:
    """The 70B-shape streamed QPiSSA init and its training step, one row per configuration; the fresh-process run of
    QPiSSA-5 beside the same-process ones (whose peaks carry memory the previous configuration left)."""
    same, fresh = (
        "benchmarks/results/stream_init_70b_h200.jsonl",
        "benchmarks/results/stream_init_70b_h200_qi5_fresh.jsonl",
    )
    header = [
        "quant_iters",
        "double_quant",
        "process",
        "init s",
        "init peak GiB",
        "step s",
        "step peak GiB",
        "codes GiB",
    ]
    rows = []
    for source, runs in ((same, lines(same)), (fresh, lines(fresh))):
        for i, r in enumerate(runs):
            process = "fresh" if source == fresh or i == 0 else f"after {i} other{'s' * (i > 1)}"
            dq = "yes" if r["double_quant"] else "no"
            numbers = [f"{r['init_seconds']:.1f}", f"{r['init_peak_gib']:.2f}", f"{r['step2_seconds']:.2f}"]
            numbers += [f"{r['step2_peak_gib']:.2f}", f"{r['residual_gib']:.2f}"]
            rows.append([str(r["quant_iters"]), dq, process, *numbers])
    r = lines(same)[0]
    env = {"device": r["device"], "torch": r["torch"], "date": r["date"][:10]}
    extra = (f"; {r['matrices']} matrices, {r['target_params_b']} B target parameters, r = {r['rank']}, niter = "
             f"{r['niter']}; weights from a {r['pool_gib']} GiB pinned pool made in {r['pool_generation_seconds']} s "
             f"(not in the init time); step: batch 1 × 512, checkpointing, AdamW")  # fmt: skip
    return rows_table(header, rows) + "\n\n" + caption(env, same, extra)


def stream_7b(source: str, one_reader: str) -> Callable[[], str]:
    """The 7B-shape checkpoint road: streamed (page cache cold and warm) against the init with the model on the GPU;
    ``one_reader``: the same run, same session, with the fetch of before (one reader thread, two host copies)."""

    def render() -> str:
        r, before = lines(source)[-1], lines(one_reader)[-1]
        header = ["", "seconds", "peak GPU GiB"]
        rows = [["read the checkpoint once (cold, alone)", f"{r['read_seconds']:.2f}", "-"],
                ["streamed from the checkpoint, cold page cache", f"{r['streamed_cold_seconds']:.2f}",
                 f"{r['streamed_cold_peak_gib']:.2f}"],
                ["streamed from the checkpoint, warm page cache", f"{r['streamed_warm_seconds']:.2f}",
                 f"{r['streamed_warm_peak_gib']:.2f}"],
                ["in place (the model loaded onto the GPU first)", f"{r['in_place_seconds']:.2f}",
                 f"{r['in_place_peak_gib']:.2f}"],
                ["  its load onto the GPU, not counted above", f"{r['in_place_load_seconds']:.2f}", "-"]]  # fmt: skip
        env = {"device": r["device"], "torch": r["torch"], "date": r["date"][:10]}
        extra = (f"; {r['read_gib']} GiB of bf16 in {before['shards']} shards, QPiSSA r = {r['rank']}, "
                 f"niter = {r['niter']}; {r['layers_bit_identical']} of {r['layers_compared']} layers "
                 "bit-identical to in place; host peak "
                 f"{r['host_peak_gib']} GiB. The fetch of before (one reader thread, two host copies), same session: "
                 f"cold {before['streamed_cold_seconds']:.2f} s, warm {before['streamed_warm_seconds']:.2f} s, host "
                 f"peak {before['host_peak_gib']} GiB (`{one_reader}`)")  # fmt: skip
        return rows_table(header, rows) + "\n\n" + caption(env, source, extra)

    return render


def adapters_switch(source: str) -> Callable[[], str]:
    """Several adapters on one model: forwards per adapter and of a mixed batch beside one adapter's, and switches."""

    def render() -> str:
        runs = lines(source)
        header = ["", "ms, median (min–max)", "note"]
        rows = []
        for r in runs:
            if "median_ms" not in r:
                continue
            note = "" if "exact" not in r else ("bit-identical to alone" if r["exact"] else "low-rank correction")
            if "switch_mem_delta_bytes" in r:
                note = f"device memory added: {r['switch_mem_delta_bytes']} bytes"
            if "max_ms" in r:
                ms = spread(r["median_ms"], r["min_ms"], r["max_ms"], "{:.2f}")
            else:  # runs before the benchmark recorded the max
                ms = f"{r['median_ms']:.2f} (min {r['min_ms']:.2f}; max not recorded)"
            rows.append([r["what"], ms, note])
        memory = next(r for r in runs if "measured_bytes" in r)
        r = runs[0]
        env = {"device": r["device"], "torch": r["torch"], "date": r["date"]}
        extra = (f"; Llama-2-7B shape, {r['layers']} layers, bf16, r = {r['rank']} on all 7 projections, batch "
                 f"{r['batch']} × {r['seq']}; three more adapters cost {memory['measured_bytes'] / 2**20:.0f} MiB of "
                 f"device memory ({memory['a_b_bytes'] / 2**20:.0f} MiB their A and B, "
                 f"{memory['correction_bytes'] / 2**20:.0f} MiB the corrections)")  # fmt: skip
        return rows_table(header, rows) + "\n\n" + caption(env, source, extra)

    return render


def qpissa_from_4bit() -> str:
    """Starting from a 4-bit checkpoint: the error at init against the original and the checkpoint's own weights."""
    source = "benchmarks/results/qpissa_from_4bit_minilm.json"
    data = load(source)
    header = ["method", "rank", "error vs the original W %", "vs the checkpoint's W_deq %"]
    rows = [[r["method"], str(r["rank"]), f"{r['vs_w']:.2f}", f"{r['vs_w_deq']:.2f}"] for r in data["rows"]]
    extra = "; all-MiniLM-L6-v2, 36 matrices, bitsandbytes NF4 with nested statistics, exact init"
    return rows_table(header, rows) + "\n\n" + caption(data["environment"], source, extra)


STEP_NAMES = {"frozen base": "frozen base", "minipissa (fp32 masters)": "minipissa, fp32 masters",
              "PEFT LoRA bf16 adapters": "PEFT, bf16 adapters", "PEFT LoRA (default: fp32 adapters)": "PEFT, default",
              "minipissa, CUDA graph": "minipissa, whole step in a CUDA graph"}  # fmt: skip
FIGURES: dict[str, Callable[[], str]] = {
    "example-gpt": example("gpt"),
    "example-llama": example("llama"),
    "example-gpt-quantized": example("gpt_quantized"),
    "example-minilm": minilm_classify,
    "step-gpu-7b": step("benchmarks/results/step_gpu_llama7b_h200_issue16_after.json", STEP_NAMES),
    "step-cpu-minilm": step("benchmarks/results/step_cpu_minilm_issue16.json", STEP_NAMES),
    "step-cpu-llama": step("benchmarks/results/step_cpu_llama_small_issue16.json", STEP_NAMES),
    "init-gpu-7b": init("benchmarks/results/init_gpu_llama7b_h200_issue16.json"),
    "qpissa-error": qpissa_error,
    "stream-70b": stream_70b,
    "qpissa-from-4bit": qpissa_from_4bit,
    "adapters-switch": adapters_switch("benchmarks/results/adapters_switch_h200_32layers.jsonl"),
    "stream-7b": stream_7b(
        "benchmarks/results/stream_init_7b_ckpt_h200_parallel_reader.jsonl",
        "benchmarks/results/stream_init_7b_ckpt_h200_one_reader_rerun.jsonl",
    ),
}


def render_document(text: str) -> tuple[str, list[str]]:
    """``text`` with every figure block re-rendered, and the names of the blocks whose content changed."""
    stale: list[str] = []

    def fill(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in FIGURES:
            raise SystemExit(f"figures.py: no figure named '{name}' (known: {', '.join(FIGURES)})")
        body = FIGURES[name]() + "\n"
        if body != m.group("body"):
            stale.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(fill, text), stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    stale_all = []
    for doc in DOCUMENTS:
        path = ROOT / doc
        if not path.exists():
            continue
        text, stale = render_document(path.read_text())
        stale_all += [f"{doc}: {name}" for name in stale]
        if stale and not args.check:
            path.write_text(text)
    for s in stale_all:
        print(("stale: " if args.check else "re-rendered: ") + s)
    return 1 if args.check and stale_all else 0


if __name__ == "__main__":
    sys.exit(main())
