"""The N:M pattern check that every export runs first, for a saved model folder or an ONNX file.

Sparse tensor cores need N:M along the GEMM reduction dimension K. In a saved folder a linear weight is
``(out, K)``; in ONNX a Linear becomes ``MatMul(x, B)`` with ``B = W.T`` of shape ``(K, out)``, or
``Gemm`` whose ``transB=1`` keeps ``(out, K)``, sometimes behind a ``Transpose`` node. Every layer is
brought back to ``(out, K)`` before the pure check in :mod:`maskpro.nm`. The report also says which
layers the sparse engines would reject (their shape rules), so users know what stays dense.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskpro.artifacts import MASKS, read_metadata
from maskpro.errors import MaskproError, PatternError
from maskpro.integrity import check_folder_files, verify_recorded
from maskpro.nm import NM, Violation, check_weight

# Shape rules of the sparse kernels, (out, K) of a 2:4 fp16/bf16 layer. cuSPARSELt as PyTorch wraps it
# (torch.sparse.semi_structured, fp16/bf16): both dimensions multiples of 16. TensorRT's rule lives with
# its builder in maskpro.export.tensorrt and is used when that module is present.
CUSPARSELT_MULTIPLE = 16


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


def engine_rules(out_features: int, in_features: int, precision: str = "fp16") -> dict[str, str]:
    """Why each sparse engine would keep a layer of this shape dense ({} = eligible everywhere).

    ``precision`` is the engine's compute precision (fp16 by default, what sparse tensor cores run), not the
    dtype the weights happen to be stored in.
    """
    why: dict[str, str] = {}
    if out_features % CUSPARSELT_MULTIPLE or in_features % CUSPARSELT_MULTIPLE:
        why["cusparselt"] = f"cuSPARSELt needs both dimensions multiples of {CUSPARSELT_MULTIPLE}"
    try:
        from maskpro.export.tensorrt import trt_sparse_eligible
    except ImportError:
        return why
    ok, reason = trt_sparse_eligible(out_features, in_features, precision)
    if not ok:
        why["tensorrt"] = reason
    return why


def _layer(name: str, weight: torch.Tensor, nm: NM, targeted: bool, precision: str = "fp16") -> LayerCheck:
    out_f, k = weight.shape
    lc = LayerCheck(name, out_f, k, targeted, ineligible=engine_rules(out_f, k, precision))
    if k % nm.m:
        lc.ineligible["nm"] = f"K={k} is not a multiple of M={nm.m}"
        if targeted:  # a targeted layer that cannot hold the pattern at all is itself a failure
            lc.violations = [Violation(name, 0, 0, 0, k, nm.m)]
        return lc
    lc.groups = weight.numel() // nm.m
    if targeted:
        lc.violations = check_weight(weight, nm, name)
    return lc


def check_folder(folder: str | os.PathLike, nm: NM | None = None) -> CheckReport:
    """Check a saved model folder tensor by tensor (no model is built, memory stays at one tensor).

    With ``maskpro.json`` the pattern and target layers come from it; otherwise ``nm`` must be given and
    every 2-D ``*.weight`` except embeddings and the LM head is treated as a target.
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
    if (folder / "maskpro.json").is_file():
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
                layers.append(_layer(name, t, nm, targeted))
    if targets is not None and targets - seen:
        missing = sorted(targets - seen)
        raise MaskproError(f"{folder}: target layer {missing[0]} (and {len(missing) - 1} more) has no weight; "
                           "the folder is incomplete, save it again with maskpro prune")
    return CheckReport(str(folder), nm, layers)


def _read_initializer(init, base: Path) -> torch.Tensor:
    """One initializer as a tensor; external data is read by offset, so only this tensor is in memory."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    if init.data_location != TensorProto.EXTERNAL:
        return torch.from_numpy(numpy_helper.to_array(init).copy())
    info = {e.key: e.value for e in init.external_data}
    raw_types = {TensorProto.FLOAT: (np.float32, None), TensorProto.FLOAT16: (np.float16, None),
                 TensorProto.BFLOAT16: (np.int16, torch.bfloat16), TensorProto.DOUBLE: (np.float64, None)}
    if init.data_type not in raw_types:
        raise MaskproError(f"initializer {init.name} has ONNX data type {init.data_type}, which the check cannot read")
    np_type, view = raw_types[init.data_type]
    count = int(np.prod(init.dims)) if init.dims else 1
    with open(base / info["location"], "rb") as fh:
        fh.seek(int(info.get("offset", 0)))
        arr = np.frombuffer(fh.read(count * np.dtype(np_type).itemsize), dtype=np_type).reshape(tuple(init.dims))
    t = torch.from_numpy(arr.copy())
    return t.view(view) if view is not None else t


def _onnx_weights(model, base: Path):
    """Yield (node name, weight as (out, K)) for every MatMul/Gemm whose right operand is a constant."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    producers = {o: n for n in graph.node for o in n.output}

    def constant(name: str) -> torch.Tensor | None:
        if name in inits:
            return _read_initializer(inits[name], base)
        if name in consts:
            return torch.from_numpy(numpy_helper.to_array(onnx.helper.get_attribute_value(consts[name].attribute[0])).copy())
        return None

    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        b_name, transposed = node.input[1], False
        b = constant(b_name)
        if b is None and b_name in producers and producers[b_name].op_type == "Transpose":
            tnode = producers[b_name]
            perm = [list(a.ints) for a in tnode.attribute if a.name == "perm"]
            b = constant(tnode.input[0])
            transposed = b is not None and b.dim() == 2 and (not perm or perm[0] == [1, 0])
        if b is None or b.dim() != 2:
            continue
        if node.op_type == "Gemm":
            transposed ^= any(a.name == "transB" and a.i == 1 for a in node.attribute)
        # MatMul(x, B) multiplies by B (K, out); an odd number of transposes means B is already (out, K).
        yield node.name or b_name, (b if transposed else b.T)


def check_onnx(path: str | os.PathLike, nm: NM, targets: set[str] | None = None) -> CheckReport:
    """Check the constant weights of every MatMul/Gemm in an ONNX file (external data is followed).

    A layer is targeted when its node name contains one of ``targets`` (module paths such as
    ``layers.0.self_attn.q_proj``, matched with dots or slashes), or, without targets, when it holds any
    zero; the LM head and other dense layers are listed as staying dense.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise MaskproError(f"{path} does not exist; pass the .onnx file written by maskpro-export --engine onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several types for a bad file
        raise MaskproError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); export it again") from None
    keys = [t.removeprefix("model.") for t in targets] if targets else None
    layers = []
    for name, w in _onnx_weights(model, path.parent):
        dotted = "." + name.replace("/", ".") + "."
        targeted = any(f".{k}." in dotted for k in keys) if keys is not None else bool((w == 0).any())
        layers.append(_layer(name, w, nm, targeted))
    return CheckReport(str(path), nm, layers)


def check_path(path: str | os.PathLike, nm: NM | None = None) -> CheckReport:
    """Check a model folder or an ONNX file (a folder holding ``model.onnx`` counts as the latter)."""
    path = Path(path)
    onnx_file = path / "model.onnx" if path.is_dir() and (path / "model.onnx").is_file() else path
    if onnx_file.suffix == ".onnx":
        targets = None
        meta_dir = onnx_file.parent
        verify_recorded(meta_dir, "maskpro.json")  # an export's files are whole and unchanged
        if (meta_dir / "maskpro.json").is_file():
            meta = read_metadata(meta_dir)
            nm, targets = nm or NM(meta["n"], meta["m"]), set(meta["targets"])
        if nm is None:
            raise MaskproError(f"{onnx_file} has no maskpro.json beside it; pass --nm N:M")
        return check_onnx(onnx_file, nm, targets)
    if not path.exists():
        raise MaskproError(f"{path} does not exist; pass a model folder from maskpro prune or an .onnx file")
    return check_folder(path, nm)
