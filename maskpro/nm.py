"""Pure N:M sparsity math on tensors (no model code).

Convention: a linear weight is ``(out_features, in_features)`` and ``y = x @ W.T``; the GEMM reduction
dimension K is ``in_features``, the last dimension. Sparse tensor cores need every run of M consecutive
weights along K to hold at most N non-zeros; "strict" N:M means exactly N kept per group in the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import MaskproError


@dataclass(frozen=True)
class NM:
    """An N:M pattern: keep N of every M consecutive weights along the reduction dimension."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 2 or not 0 < self.n < self.m:
            raise MaskproError(f"invalid sparsity {self.n}:{self.m}; need integers 0 < N < M, M >= 2 (e.g. 2:4)")

    @classmethod
    def parse(cls, text: str | NM) -> NM:
        """The pattern of ``"N:M"`` text (an NM passes through): the one place a pattern string is read."""
        if isinstance(text, NM):
            return text
        try:
            n, m = (int(x) for x in str(text).split(":"))
        except ValueError:
            raise MaskproError(f"cannot read sparsity {text!r}; write it as N:M, e.g. --nm 2:4") from None
        return cls(n, m)

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def groups(t: torch.Tensor, m: int, name: str = "weight") -> torch.Tensor:
    """View a (..., K) tensor as (num_groups, M) groups of consecutive elements along K."""
    if t.dim() < 1 or t.shape[-1] % m:
        raise MaskproError(f"{name} has reduction dimension {t.shape[-1] if t.dim() else 0}, not divisible by "
                           f"M={m}; exclude this layer with --targets or choose an M that divides it")
    return t.reshape(-1, m)


def check_shape(shape: torch.Size | tuple[int, ...], nm: NM, name: str = "weight") -> None:
    if len(shape) < 1 or shape[-1] % nm.m:
        raise MaskproError(f"{name} has reduction dimension {shape[-1] if len(shape) else 0}, not divisible by "
                           f"M={nm.m}; exclude this layer with --targets or choose an M that divides it")


def topn_mask(score: torch.Tensor, nm: NM, name: str = "weight") -> torch.Tensor:
    """Boolean mask keeping the N largest scores of every group (ties broken by position)."""
    g = groups(score, nm.m, name)
    idx = torch.topk(g, nm.n, dim=1, sorted=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True)
    return mask.view(score.shape)


def project(weight: torch.Tensor, nm: NM, score: torch.Tensor | None = None) -> torch.Tensor:
    """Project a weight onto strict N:M by a score (default: magnitude); returns the masked weight."""
    mask = topn_mask(weight.abs() if score is None else score, nm)
    return weight * mask


def group_counts(t: torch.Tensor, nm: NM) -> torch.Tensor:
    """Non-zeros per group (for a weight) or kept entries per group (for a boolean mask)."""
    return (groups(t, nm.m) != 0).sum(dim=1)


def violations(t: torch.Tensor, nm: NM, strict: bool = False) -> torch.Tensor:
    """Flat indices of groups breaking the pattern: more than N non-zeros (or, if strict, not exactly N)."""
    c = group_counts(t, nm)
    bad = c != nm.n if strict else c > nm.n
    return bad.nonzero().flatten()


@dataclass(frozen=True)
class Violation:
    layer: str
    group: int       # flat group index
    row: int
    col: int         # first column (along K) of the group
    count: int
    m: int

    def __str__(self) -> str:
        return (f"layer {self.layer}: group {self.group} (row {self.row}, columns {self.col}..{self.col + self.m - 1})"
                f" has {self.count} non-zeros")


def check_weight(t: torch.Tensor, nm: NM, layer: str = "weight", strict: bool = False) -> list[Violation]:
    """Every violating group of one weight with its row and column, for reports that point at the fault."""
    check_shape(t.shape, nm, layer)
    bad = violations(t, nm, strict)
    if bad.numel() == 0:
        return []
    counts = group_counts(t, nm)[bad]
    per_row = t.shape[-1] // nm.m
    return [Violation(layer, int(g), int(g) // per_row, (int(g) % per_row) * nm.m, int(c), nm.m)
            for g, c in zip(bad.tolist(), counts.tolist())]


def pack_mask(mask: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pack a boolean mask into a uint8 bitmask (8 entries a byte, little-endian bit order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8) << torch.arange(8, dtype=torch.uint8, device=flat.device)
    return bits.sum(dim=1, dtype=torch.uint8), tuple(mask.shape)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    numel = 1
    for s in shape:
        numel *= s
    if packed.numel() * 8 < numel:
        raise MaskproError(f"packed mask holds {packed.numel() * 8} bits, shape {tuple(shape)} needs {numel}; "
                           "the mask file is truncated or belongs to another model")
    bits = (packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(-1)[:numel].bool().reshape(shape)
