"""The one report of weights that do not line up with a model: missing, unexpected and mis-shaped keys.

Converting PyTorch weights, checking a Flax checkpoint, loading a PeRFlow ΔW and merging LoRAs all end the
same way when something does not fit: one error that lists every problem at once (first
:data:`LIST_LIMIT` of each kind, with counts), so a user sees the whole picture instead of the first bad key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

__all__ = ["LIST_LIMIT", "ConversionError", "KeyMismatch", "compare_shapes", "format_key_list"]

LIST_LIMIT = 20

Path = tuple[str, ...]


class ConversionError(ValueError):
    """Raised when weights do not map one-to-one onto a model's parameter tree (or cannot be read)."""


def format_key_list(title: str, items: list[str]) -> str:
    """``title (count):`` and the first :data:`LIST_LIMIT` items, one a line, indented under it."""
    shown = "\n    ".join(items[:LIST_LIMIT])
    more = f"\n    ... and {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


@dataclasses.dataclass
class KeyMismatch:
    """Keys that did not line up, as readable lines: ``missing`` (the model wants them, the weights lack them),
    ``unexpected`` (the weights have them, the model does not) and ``misshaped`` (both have them, shapes differ).
    """

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    misshaped: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def raise_if_any(self, headline: str, *, hint: str = "",
                     labels: tuple[str, str, str] = ("missing", "unexpected", "mis-shaped"),
                     error: type[Exception] = ConversionError) -> None:
        """Raise `error` listing every non-empty kind under `headline` (then `hint`); do nothing when all fit.

        `labels` titles the missing, unexpected and mis-shaped lists, in that order.
        """
        if not self:
            return
        kinds = (self.missing, self.unexpected, self.misshaped)
        parts = [headline] + [format_key_list(t, items) for t, items in zip(labels, kinds, strict=True) if items]
        raise error("\n".join(parts + ([hint] if hint else [])))


def compare_shapes(got: Mapping[Path, tuple[int, ...]], want: Mapping[Path, tuple[int, ...]]) -> KeyMismatch:
    """Compare two flat ``path → shape`` maps (e.g. a loaded tree against the model's): paths only in `want` are
    missing, only in `got` unexpected, in both with other shapes mis-shaped."""
    name = "/".join
    return KeyMismatch(
        missing=[f"{name(p)} {tuple(want[p])}" for p in want if p not in got],
        unexpected=[f"{name(p)} {tuple(got[p])}" for p in got if p not in want],
        misshaped=[f"{name(p)}: {tuple(got[p])}, expected {tuple(want[p])}" for p in want
                   if p in got and tuple(got[p]) != tuple(want[p])],
    )
