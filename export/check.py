"""The N:M pattern check that every export runs first, for a saved model folder or an ONNX file.

Sparse tensor cores need N:M along the GEMM reduction dimension K. In a saved folder a linear weight is
``(out, K)``; in ONNX a Linear becomes ``MatMul(x, B)`` with ``B = W.T`` of shape ``(K, out)``, or
``Gemm`` whose ``transB=1`` keeps ``(out, K)``, sometimes behind a ``Transpose`` node. Every layer is
brought back to ``(out, K)`` before the pure check in :mod:`maskpro.nm`. The report also says which
layers the sparse engines would reject (their shape rules, :mod:`.sparse_rules`), so users know what
stays dense. The folder check and its report live in :mod:`maskpro.pattern_check`, which the core package
uses too; this module adds the engines' rules and the ONNX reader.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from maskpro.errors import MaskproError
from maskpro.schema import METADATA, has_meta, read_meta, verify_recorded
from maskpro.nm import NM
from maskpro.pattern_check import CheckReport, LayerCheck, check_layer
from maskpro.pattern_check import check_folder as check_folder_pattern

from .sparse_rules import CUSPARSELT_MULTIPLE, engine_rules

__all__ = ["CUSPARSELT_MULTIPLE", "CheckReport", "LayerCheck", "check_folder", "check_onnx", "check_path",
           "engine_rules"]


def check_folder(folder: str | os.PathLike, nm: NM | None = None) -> CheckReport:
    """:func:`maskpro.pattern_check.check_folder` with each layer's eligibility for the sparse engines."""
    return check_folder_pattern(folder, nm, engine_rules)


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
        layers.append(check_layer(name, w, nm, targeted, engine_rules))
    return CheckReport(str(path), nm, layers)


def check_path(path: str | os.PathLike, nm: NM | None = None) -> CheckReport:
    """Check a model folder or an ONNX file (a folder holding ``model.onnx`` counts as the latter)."""
    path = Path(path)
    onnx_file = path / "model.onnx" if path.is_dir() and (path / "model.onnx").is_file() else path
    if onnx_file.suffix == ".onnx":
        targets = None
        meta_dir = onnx_file.parent
        verify_recorded(meta_dir)  # an export's files are whole and unchanged
        if has_meta(meta_dir):
            meta = read_meta(meta_dir)
            nm, targets = nm or meta.nm, set(meta.targets)
        if nm is None:
            raise MaskproError(f"{onnx_file} has no {METADATA} beside it; pass --nm N:M")
        return check_onnx(onnx_file, nm, targets)
    if not path.exists():
        raise MaskproError(f"{path} does not exist; pass a model folder from maskpro prune or an .onnx file")
    return check_folder(path, nm)
