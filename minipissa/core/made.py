"""What a PiSSA layer was made with, so that save() can tell whether load() would rebuild it.

``load(base="original")`` rebuilds W_res = W - s·B0·A0 from the file's A0 and B0, in the base weight's dtype, as
apply() made it; the user then repeats any cast of the model (``model.half()``). So a live layer reloads exactly
when (1) its A0 and B0 are those its residual was made from and (2) its residual is the one made, R0, cast to its
dtype now: cast_d(R0). A layer remembers the hashes of its A0, B0 and R0 when it is made (apply, load), and of
cast_d(R0) as casts of the model change the residual's dtype (:meth:`Made.cast`):

- a cast of an unedited residual that holds R0's values exactly (R0 itself, or a widening of it) gives cast_d(R0);
- a cast of an unedited but narrowed one (fp32 -> fp16 -> fp32) is cast_d(R0) only if it gives the hash known for
  that dtype already (fp16(R0) cast back is R0 only where R0 was fp16-exact); unknown, it is not followed;
- a cast of an edited residual, or one not followed, leaves the layer *lost*.

An edit, a loss or other A0/B0 make :meth:`Made.edits` non-empty: save() then marks the record
``residual_edited``, which ``load(base="original")`` refuses (load the output of save_residual with
base="residual" instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Casts that keep every value exactly (the target holds every value of the source).
WIDENING = {
    ("float16", "float32"), ("float16", "float64"), ("bfloat16", "float32"), ("bfloat16", "float64"),
    ("float32", "float64"),
}  # fmt: skip


@dataclass
class Made:
    """The hashes of a layer's A0 and B0 as made, and per dtype d of its residual the hash of cast_d(R0) and
    whether cast_d(R0) holds R0's values exactly. ``lost``: a cast could not be followed (see the module)."""

    factors: tuple[str, str]
    residual: dict[str, tuple[str, bool]] = field(default_factory=dict)
    lost: bool = False

    @classmethod
    def of(cls, residual_print: dict[str, Any], factor_hashes: tuple[str, str]) -> Made:
        """A layer made now: its residual's fingerprint (R0) and the hashes of its A0 and B0."""
        return cls(factor_hashes, {residual_print["dtype"]: (residual_print["hash"], True)})

    def cast(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """The residual was cast from ``before`` to ``after`` (its fingerprints, of different dtypes)."""
        known = self.residual.get(before["dtype"])
        if self.lost or known is None or known[0] != before["hash"]:  # edited before this cast
            self.lost = True
            return
        target = self.residual.get(after["dtype"])
        if target is not None:
            self.lost = target[0] != after["hash"]
        elif known[1]:  # R0's own values: the cast of it is cast_d(R0)
            self.residual[after["dtype"]] = (after["hash"], (before["dtype"], after["dtype"]) in WIDENING)
        else:
            self.lost = True

    def edits(self, residual_print: dict[str, Any], factor_hashes: tuple[str, str]) -> list[str]:
        """What of the layer now (its residual's fingerprint, the hashes of A0 and B0) a reload would not rebuild:
        some of "A0", "B0", "residual"."""
        edited = [
            name for name, now, then in zip(("A0", "B0"), factor_hashes, self.factors, strict=True) if now != then
        ]
        known = self.residual.get(residual_print["dtype"])
        if self.lost or known is None or known[0] != residual_print["hash"]:
            edited.append("residual")
        return edited
