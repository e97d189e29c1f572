"""Linears that read the same input (q/k/v, gate/up) served by one fused product.

Why: at decode sizes a 2:4 kernel is bound by how fast it streams the weights, and small shapes stream
slower than large ones (docs/kernels.md). Concatenating q/k/v (and gate/up) along the output rows gives one
larger product and one launch instead of three.

The model's code is left alone: each member keeps its name and is called as before. The first member called
with an input computes the fused product and hands the other members their slices when they are called with
the same tensor object; any other input (or a second call by the same member) recomputes, so a wrong guess
about which layers share an input costs time, never correctness. Where the fused module would run its dense
weight on a prefill-sized input (``runs_dense_rows``), each member runs its own rows of it instead: at
prefill sizes separate dense products are faster than the fused one (docs/kernels.md).
"""

from __future__ import annotations

import torch
from torch import nn

# Child names that transformers' decoder layers call on one input, in the order they are called.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _SharedOutput:
    """The last fused output and which members have not read their slice of it yet."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.x: torch.Tensor | None = None
        self.outs: tuple[torch.Tensor, ...] = ()
        self.pending: set[int] = set()

    def output(self, x: torch.Tensor, index: int, fused: nn.Module) -> torch.Tensor:
        if x is self.x and index in self.pending:
            self.pending.discard(index)
            out = self.outs[index]
            if not self.pending:  # every member has read it: drop the references
                self.x, self.outs = None, ()
            return out
        self.outs = fused(x).split(self.sizes, dim=-1)
        self.x, self.pending = x, set(range(len(self.sizes))) - {index}
        return self.outs[index]


class SharedInputLinear(nn.Module):
    """One member of a fused group: rows ``start:stop`` of ``fused``'s output."""

    def __init__(self, fused: nn.Module, shared: _SharedOutput, index: int, start: int, stop: int):
        super().__init__()
        self.fused, self._shared, self.index = fused, shared, index
        self.start, self.stop = start, stop
        self._rows_of: tuple | None = None
        self._rows_views: tuple = ()
        self.in_features, self.out_features = fused.in_features, stop - start

    @property
    def weight(self) -> torch.Tensor | None:
        """The member's rows of the fused dense weight (a view), for code that reads ``.weight``."""
        w = getattr(self.fused, "weight", None)
        return None if w is None else w[self.start:self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        split = getattr(type(fused), "runs_dense_rows", None)
        if split is not None and split(fused, x):
            return nn.functional.linear(x, *self._rows(fused))
        return self._shared.output(x, self.index, fused)

    def _rows(self, fused: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This member's rows of the fused weight and bias, as views made once (per prefill they cost more
        than the product's launch) and again if the fused module's tensors were replaced."""
        w, b = fused.weight, fused.bias
        key = (w.data_ptr(), None if b is None else b.data_ptr())
        if self._rows_of != key:
            self._rows_views = (w[self.start:self.stop], None if b is None else b[self.start:self.stop])
            self._rows_of = key
        return self._rows_views

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of a fused {type(self.fused).__name__}"


def fusable_groups(model: nn.Module, candidates: set[str]) -> list[list[str]]:
    """Names of the groups in ``GROUPS`` whose members are all in ``candidates`` and are linears with the
    same input size, dtype and device."""
    modules = dict(model.named_modules())
    found = []
    for parent in modules:
        for children in GROUPS:
            names = [f"{parent}.{c}" if parent else c for c in children]
            lins = [modules.get(n) for n in names]
            if not all(n in candidates and type(m) is nn.Linear for n, m in zip(names, lins)):
                continue
            w0 = lins[0].weight
            if all(m.in_features == lins[0].in_features and m.weight.dtype == w0.dtype
                   and m.weight.device == w0.device for m in lins):
                found.append(names)
    return found


def fuse(model: nn.Module, names: list[str]) -> tuple[nn.Linear, list[SharedInputLinear]]:
    """Replace the linears ``names`` of ``model`` by members of one new ``nn.Linear`` (their weights
    concatenated along the output rows; the originals are released). Returns the fused linear and the members,
    so the caller can swap ``member.fused`` for a faster module of the same product."""
    modules = dict(model.named_modules())
    lins = [modules[n] for n in names]
    sizes = [m.out_features for m in lins]
    w = torch.cat([m.weight.data for m in lins])
    fused = nn.Linear(lins[0].in_features, sum(sizes), bias=any(m.bias is not None for m in lins),
                      device=w.device, dtype=w.dtype)
    fused.weight.data = w
    if fused.bias is not None:
        fused.bias.data = torch.cat([m.bias.data if m.bias is not None else w.new_zeros(m.out_features)
                                     for m in lins])
    shared = _SharedOutput(sizes)
    members, start = [], 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        member = SharedInputLinear(fused, shared, i, start, start + size)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, member)
        members.append(member)
        start += size
    return fused, members


def fuse_all(model: nn.Module) -> int:
    """Fuse every group of ``model`` into plain fused ``nn.Linear`` products; returns how many groups.
    ``sparsify`` later swaps each fused product for its 2:4 module. Used to time a dense model with the same
    fusion as the 2:4 runtime."""
    groups = fusable_groups(model, {n for n, _ in model.named_modules()})
    for names in groups:
        fuse(model, names)
    return len(groups)


def fused_products(model: nn.Module) -> dict[int, tuple[nn.Module, list[SharedInputLinear]]]:
    """The distinct fused modules of ``model`` with their members, by ``id``."""
    out: dict[int, tuple[nn.Module, list[SharedInputLinear]]] = {}
    for m in model.modules():
        if isinstance(m, SharedInputLinear):
            out.setdefault(id(m.fused), (m.fused, []))[1].append(m)
    return out
