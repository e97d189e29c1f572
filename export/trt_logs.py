"""Reading what TensorRT says about sparsity: the builder log's "(Sparsity)" lines and the engine
inspector's per-layer JSON, matched against the ONNX MatMuls that hold 2:4 weights.

Pure text parsing, shared by the TensorRT builder (:mod:`.tensorrt`) and trtllm-build's log
(:mod:`.trtllm`); it needs neither TensorRT nor a GPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable

from maskpro.errors import MaskproError

# Wording confirmed in the TensorRT Developer Guide (8.6 section 6.8 "Sparsity") and in trtexec logs quoted
# in NVIDIA/TensorRT#1403, #2169, #4054 and pytorch/TensorRT#1340:
#   [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
#   [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3
# A logger subclass receives the message without the "[I] [TRT]" prefix; both forms are matched.
_ELIGIBLE_RE = re.compile(r"Layers eligible for sparse math:(.*)$")
_PICKED_RE = re.compile(r"picked sparse implementation for layers:(.*)$")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.strip().split(", ") if n.strip()]


@dataclass
class SparsityReport:
    """What TensorRT said about sparsity at the end of one build (the last build, if the log holds several)."""

    eligible: list[str] = field(default_factory=list)  # layers whose weights TensorRT found 2:4 (fused names)
    picked: list[str] = field(default_factory=list)    # layers whose chosen tactic is a sparse one
    logged: bool = False                               # both sparsity lines were in the log

    @property
    def not_picked(self) -> list[str]:
        picked = set(self.picked)
        return [n for n in self.eligible if n not in picked]

    def to_dict(self) -> dict:
        return {"logged": self.logged, "eligible": len(self.eligible), "picked": len(self.picked),
                "eligible_layers": self.eligible, "picked_layers": self.picked, "not_picked": self.not_picked}


def parse_sparsity_log(lines: str | Iterable[str]) -> SparsityReport:
    """Read the builder's two "(Sparsity)" lines out of a TensorRT (or trtexec / trtllm-build) log."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    eligible = picked = None
    for line in lines:
        line = line.rstrip("\r\n")
        if m := _ELIGIBLE_RE.search(line):
            eligible, picked = _names(m.group(1)), None  # a new build starts a new pair
        elif m := _PICKED_RE.search(line):
            picked = _names(m.group(1))
    return SparsityReport(eligible or [], picked or [], eligible is not None and picked is not None)


@dataclass
class InspectorLayer:
    name: str
    layer_type: str | None = None
    tactic: str | None = None
    has_sparse_weights: bool | None = None  # HasSparseWeights (10.x) / AllowSparse (8.x); None: not reported
    onnx_layers: list[str] = field(default_factory=list)
    weights_type: str | None = None

    @property
    def sparse_tactic(self) -> bool:
        """Heuristic: sparse kernels carry "sparse" in their name (e.g. sm80_xmma_fprop_avdt_sparse_...)."""
        return bool(self.tactic) and "sparse" in self.tactic.lower()


_ONNX_LAYER_RE = re.compile(r"\[ONNX Layer: ([^\]]*)\]")


def parse_inspector_json(info: str | dict) -> list[InspectorLayer]:
    """Layers of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` (= trtexec
    ``--exportLayerInfo``): ``{"Layers": [...], "Bindings": [...]}``.

    With ProfilingVerbosity.DETAILED each layer is an object (Name, LayerType, TacticName, Weights,
    HasSparseWeights, Metadata "[ONNX Layer: a]\\x1e[ONNX Layer: b]"); with LAYER_NAMES_ONLY it is a bare
    name. Layers that TensorRT compiles with its Myelin backend (LayerType "Myelin") do not list the
    kernels inside them, so their sparsity is only visible in the log.
    """
    data = json.loads(info) if isinstance(info, (str, bytes)) else info
    if not isinstance(data, dict) or not isinstance(data.get("Layers"), list):
        raise MaskproError("engine information is not TensorRT inspector JSON (no \"Layers\" list); build "
                           "with profiling_verbosity detailed")
    layers = []
    for entry in data["Layers"]:
        if isinstance(entry, str):
            layers.append(InspectorLayer(entry))
            continue
        flag = entry.get("HasSparseWeights", entry.get("AllowSparse"))
        weights = entry.get("Weights") if isinstance(entry.get("Weights"), dict) else {}
        layers.append(InspectorLayer(
            name=str(entry.get("Name", "")), layer_type=entry.get("LayerType"), tactic=entry.get("TacticName"),
            has_sparse_weights=None if flag is None else bool(int(flag)),
            onnx_layers=_ONNX_LAYER_RE.findall(str(entry.get("Metadata", ""))),
            weights_type=weights.get("Type")))
    return layers


def inspector_summary(layers: list[InspectorLayer]) -> dict:
    detailed = [l for l in layers if l.layer_type is not None]
    return {"layers": len(layers), "detailed": bool(detailed),
            "with_sparse_weights": [l.name for l in layers if l.has_sparse_weights],
            "sparse_tactics": [l.name for l in layers if l.sparse_tactic],
            "myelin_layers": sum(l.layer_type == "Myelin" for l in layers)}


def match_candidates(candidates: Iterable[str], report: SparsityReport) -> dict:
    """Which ONNX MatMul nodes that hold 2:4 weights TensorRT called eligible / picked sparse for.

    TensorRT names layers after ONNX nodes and joins fused ones with " + "; a candidate missing from
    both lists was not recognised (dynamic weights, a Myelin region under another name, or a rule above).
    """
    def parts(names: list[str]) -> set[str]:
        return {p.strip() for n in names for p in n.split(" + ")}

    eligible, picked = parts(report.eligible), parts(report.picked)
    cands = list(candidates)
    return {"candidates": len(cands), "eligible": sum(c in eligible for c in cands),
            "picked": sum(c in picked for c in cands), "not_eligible": [c for c in cands if c not in eligible]}
