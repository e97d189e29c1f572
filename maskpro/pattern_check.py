"""The N:M pattern check of a saved model folder, tensor by tensor, and its report.

Sparse tensor cores need N:M along the GEMM reduction dimension K; a saved linear weight is ``(out, K)``,
so every row is checked as it is stored, with the pure check in :mod:`maskpro.nm`. This lives in the core
package because ``maskpro check`` and every writer of a model folder verify their result with it; the ONNX
reader and the sparse engines' shape rules belong to the export layer (:mod:`maskpro.export.check`), which
passes those rules in as ``rules``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .artifacts import MASKS, METADATA, read_metadata
from .errors import MaskproError, PatternError
from .schema import check_folder_files
from .nm import NM, Violation, check_weight

# (out_features, K) -> {engine: why it keeps a layer of that shape dense}; {} = eligible everywhere.
ShapeRules = Callable[[int, int], dict[str, str]]


@dataclass
class LayerCheck:
    name: str
    out_features: int
    in_features: int  # K, the dimension the pattern runs along
    targeted: bool
    violations: list[Violation] = field(default_factory=list)
    groups: int = 0
    ineligible: dict[str, str] = field(default_factory=dict)  # engine -> why it keeps this layer dense

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class CheckReport:
    source: str
    nm: NM
    layers: list[LayerCheck]

    @property
    def targeted(self) -> list[LayerCheck]:
        return [l for l in self.layers if l.targeted]

    @property
    def ok(self) -> bool:
        return all(l.ok for l in self.targeted) and bool(self.targeted)

    @property
    def first_violation(self) -> Violation | None:
        return next((l.violations[0] for l in self.targeted if l.violations), None)

    def raise_if_bad(self) -> None:
        """One-line refusal naming the first failing layer and group (what every export calls first)."""
        if not self.targeted:
            raise PatternError(f"{self.source}: no {self.nm} sparse layers found; export a model saved by "
                               "maskpro prune, or pass --nm to check plain weights")
        bad = self.first_violation
        if bad is not None:
            n_bad = sum(len(l.violations) for l in self.targeted)
            raise PatternError(f"{self.source}: {bad} (more than N={self.nm.n} of M={self.nm.m}); {n_bad} bad "
                               "groups in all - the pattern is broken, re-run maskpro prune on the source model")

    def table(self) -> str:
        engines = sorted({e for l in self.layers for e in l.ineligible})
        head = f"{'layer':<48} {'out x K':>13} {'groups':>9} {'bad':>5}  pattern  " + "  ".join(engines)
        rows = [head, "-" * len(head)]
        for l in self.layers:
            state = ("ok" if l.ok else "BROKEN") if l.targeted else "dense"
            flags = "  ".join(("no" if e in l.ineligible else "yes").ljust(len(e)) for e in engines)
            rows.append(f"{l.name[-48:]:<48} {f'{l.out_features}x{l.in_features}':>13} {l.groups:>9} "
                        f"{len(l.violations):>5}  {state:<7}  {flags}")
        return "\n".join(rows)

    def summary(self) -> str:
        t = self.targeted
        n_weights = sum(l.out_features * l.in_features for l in t)
        dense = [l.name for l in self.layers if not l.targeted]
        s = (f"{self.source}: {len(t)} layers checked for {self.nm} along K, {n_weights:,} weights, "
             f"{sum(not l.ok for l in t)} broken; {len(dense)} linear layers stay dense")
        for engine in sorted({e for l in t for e in l.ineligible}):
            names = [l.name for l in t if engine in l.ineligible]
            s += f"\n  {engine}: {len(names)} sparse layers ineligible (kept dense), e.g. {names[0]}: " \
                 f"{next(l.ineligible[engine] for l in t if engine in l.ineligible)}"
        return s

    def to_json(self) -> dict:
        return {"source": self.source, "nm": str(self.nm), "ok": self.ok,
                "layers": [{"name": l.name, "shape": [l.out_features, l.in_features], "targeted": l.targeted,
                            "groups": l.groups, "violations": len(l.violations),
                            "first_violation": str(l.violations[0]) if l.violations else None,
                            "ineligible": l.ineligible} for l in self.layers]}


def check_layer(name: str, weight: torch.Tensor, nm: NM, targeted: bool,
                rules: ShapeRules | None = None) -> LayerCheck:
    """One ``(out, K)`` weight: its groups, its violations when targeted, and why engines would skip it."""
    out_f, k = weight.shape
    lc = LayerCheck(name, out_f, k, targeted, ineligible=rules(out_f, k) if rules else {})
    if k % nm.m:
        lc.ineligible["nm"] = f"K={k} is not a multiple of M={nm.m}"
        if targeted:  # a targeted layer that cannot hold the pattern at all is itself a failure
            lc.violations = [Violation(name, 0, 0, 0, k, nm.m)]
        return lc
    lc.groups = weight.numel() // nm.m
    if targeted:
        lc.violations = check_weight(weight, nm, name)
    return lc


def check_folder(folder: str | os.PathLike, nm: NM | None = None, rules: ShapeRules | None = None) -> CheckReport:
    """Check a saved model folder tensor by tensor (no model is built, memory stays at one tensor).

    With ``maskpro.json`` the pattern and target layers come from it; otherwise ``nm`` must be given and
    every 2-D ``*.weight`` except embeddings and the LM head is treated as a target. ``rules`` fills each
    layer's ``ineligible`` (the export layer passes the sparse engines' shape rules).
    """
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise MaskproError(f"{folder} is not a folder; pass a model folder written by maskpro prune")
    check_folder_files(folder)  # masks.safetensors too: a truncated one must not pass a check
    files = sorted(f for f in folder.glob("*.safetensors") if f.name != MASKS)
    if not files:
        raise MaskproError(f"{folder} has no *.safetensors weights; pass a model folder written by maskpro prune")
    targets: set[str] | None = None
    if (folder / METADATA).is_file():
        meta = read_metadata(folder)
        nm, targets = NM(meta["n"], meta["m"]), set(meta["targets"])
    elif nm is None:
        raise MaskproError(f"{folder} has no maskpro.json; pass --nm N:M to say which pattern to check")
    layers, seen = [], set()
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                name = key.removesuffix(".weight")
                if not key.endswith(".weight") or "embed" in name:
                    continue
                shape = fh.get_slice(key).get_shape()
                if len(shape) != 2:
                    continue
                t = fh.get_tensor(key)
                targeted = name in targets if targets is not None else not name.endswith("lm_head")
                seen.add(name)
                layers.append(check_layer(name, t, nm, targeted, rules))
    if targets is not None and targets - seen:
        missing = sorted(targets - seen)
        raise MaskproError(f"{folder}: target layer {missing[0]} (and {len(missing) - 1} more) has no weight; "
                           "the folder is incomplete, save it again with maskpro prune")
    return CheckReport(str(folder), nm, layers)


def check_saved(folder: str | os.PathLike) -> tuple[NM, int]:
    """Verify every target layer of a saved model is N:M along its input dimension.

    Raises the one-line error naming the first bad layer, row and columns, or a missing layer, and returns
    the pattern and the number of layers checked.
    """
    read_metadata(folder)  # a folder that is not a maskpro output gets its own one-line error first
    report = check_folder(folder)
    report.raise_if_bad()
    return report.nm, len(report.targeted)
