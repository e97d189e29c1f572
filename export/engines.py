"""The engines ``maskpro-export`` writes for, one :class:`Exporter` each, looked up by name in :data:`EXPORTERS`.

Every exporter has the same two steps. ``check_available(src, out)`` refuses early, before a long step
writes anything, when the engine cannot run on this machine; ``export(src, out, options, check)`` writes
``out`` and returns its report. Both report problems only by raising :class:`~maskpro.errors.MaskproError`
(a broken pattern: :class:`~maskpro.errors.PatternError`); the command turns the error's type into the
exit code (:func:`maskpro.errors.run_cli`).

Each exporter imports its engine module when it runs, so ``--help`` and a bad option answer without
loading onnx, transformers or compressed-tensors.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from maskpro.pattern_check import CheckReport

# options: the parsed maskpro-export arguments; check: the source's pattern report, already passed.
ExportFn = Callable[[Path, Path, argparse.Namespace, "CheckReport"], dict]


def always_available(src: Path, out: Path) -> None:
    """For engines whose first step already names what is missing before it writes anything."""


@dataclass(frozen=True)
class Exporter:
    name: str
    summary: str  # its lines under "engines:" in maskpro-export --help
    export: ExportFn
    check_available: Callable[[Path, Path], None] = always_available


def _onnx(src: Path, out: Path, options: argparse.Namespace, check: CheckReport) -> dict:
    from .onnx import OnnxExportConfig, export_onnx

    return export_onnx(src, out, OnnxExportConfig(dtype=options.dtype or "fp32", opset=options.opset,
                                                  parity=not options.no_parity, data_root=options.data_dir), check)


def _trt_available(src: Path, out: Path) -> None:
    if (out / "onnx" / "model.onnx").is_file():
        return  # the build reuses the kept ONNX and says what is missing itself
    from .tensorrt import require_engine

    require_engine(f"nothing was written; `maskpro-export {src} --engine onnx --dtype fp16` exports the "
                   "ONNX for a machine that has TensorRT")


def _trt(src: Path, out: Path, options: argparse.Namespace, check: CheckReport) -> dict:
    from .onnx import ONNX_FILE, OnnxExportConfig, export_onnx
    from .tensorrt import TrtBuildConfig, build_dense_and_sparse, build_engine, require_engine

    onnx_dir = out / "onnx"
    dtype = options.dtype or "fp16"  # TensorRT 10+/11 networks are strongly typed: the engine runs the ONNX's dtype
    if not (onnx_dir / ONNX_FILE).is_file():
        export_onnx(src, onnx_dir, OnnxExportConfig(dtype=dtype, opset=options.opset, parity=not options.no_parity,
                                                    data_root=options.data_dir), check)
    require_engine(f"the ONNX file {onnx_dir / ONNX_FILE} is kept")
    cfg = TrtBuildConfig(precision=dtype if dtype != "fp32" else "fp16", batch=options.batch,
                         sequence=options.seq, past=options.past,
                         timing_cache=Path(options.timing_cache) if options.timing_cache else None)
    if options.dense_too:
        return build_dense_and_sparse(onnx_dir / ONNX_FILE, out, cfg)
    return build_engine(onnx_dir / ONNX_FILE, out / "sparse.plan", cfg)


def _vllm(src: Path, out: Path, options: argparse.Namespace, check: CheckReport) -> dict:
    from maskpro.data import wikitext2_text

    from .vllm import verify_vllm_checkpoint, write_vllm_checkpoint

    write_vllm_checkpoint(src, out, dtype=options.dtype)
    text = wikitext2_text(options.data_dir).strip()[:4000]  # real text for the reload-and-compare check
    return {"engine": "vllm", "out": str(out), "verify": verify_vllm_checkpoint(src, out, text)}


def _sparse24(src: Path, out: Path, options: argparse.Namespace, check: CheckReport) -> dict:
    from .sparse24 import verify_sparse24_bitmask, write_sparse24_bitmask

    write_sparse24_bitmask(src, out)
    return {"engine": "sparse24", "out": str(out), "verify": verify_sparse24_bitmask(src, out)}


def _trtllm(src: Path, out: Path, options: argparse.Namespace, check: CheckReport) -> dict:
    from .trtllm import build_trtllm_engine, write_trtllm_checkpoint

    ckpt = write_trtllm_checkpoint(src, out / "checkpoint", dtype=options.dtype or "fp16", tp_size=options.tp)
    engine = build_trtllm_engine(out / "checkpoint", out / "engine", sparse=True,
                                 max_batch_size=options.max_batch_size, max_input_len=options.max_input_len,
                                 max_seq_len=options.max_seq_len, tp=options.tp)
    return {"engine": "trtllm", "checkpoint": ckpt, "build": engine}


EXPORTERS: dict[str, Exporter] = {e.name: e for e in (
    Exporter("onnx", "OUT/model.onnx (+ model.onnx.data) with KV-cache inputs/outputs, checked for N:M, and an\n"
                     "onnxruntime-vs-PyTorch parity run on WikiText-2 text (OUT/export-report.json)", _onnx),
    Exporter("trt", "the ONNX (fp16) in OUT/onnx, then a TensorRT engine OUT/sparse.plan with SPARSE_WEIGHTS\n"
                    "(and OUT/dense.plan with --dense-too); needs tensorrt and an sm80+ NVIDIA GPU",
             _trt, _trt_available),
    Exporter("vllm", "dense safetensors with the zeros (what current vLLM loads) + maskpro's N:M metadata", _vllm),
    Exporter("sparse24", 'compressed-tensors "sparse-24-bitmask" (vLLM releases before the Sparse24 removal, '
                         "llm-compressor)", _sparse24),
    Exporter("trtllm", "a TensorRT-LLM checkpoint in OUT/checkpoint, then trtllm-build --weight_sparsity into "
                       "OUT/engine", _trtllm),
)}


def engines_help() -> str:
    """The "engines:" block of maskpro-export --help, one entry per registered exporter."""
    return "engines:\n" + "\n".join(f"  {e.name:<8}  " + e.summary.replace("\n", "\n" + " " * 12)
                                    for e in EXPORTERS.values())
