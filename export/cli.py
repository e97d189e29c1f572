"""``maskpro-check`` and ``maskpro-export``: thin command lines over :mod:`maskpro.export`.

Every export checks the N:M pattern of the source first and refuses a broken one, naming the layer and
group. Exit codes follow :mod:`maskpro.errors`: 1 for a broken pattern, 2 for bad input or a missing engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from maskpro.cliparse import Parser
from maskpro.errors import run_cli
from maskpro.nm import NM

ENGINES = ("onnx", "trt", "vllm", "sparse24", "trtllm")
_EPILOG_EXPORT = """engines:
  onnx      OUT/model.onnx (+ model.onnx.data) with KV-cache inputs/outputs, checked for N:M, and an
            onnxruntime-vs-PyTorch parity run on WikiText-2 text (OUT/export-report.json)
  trt       the ONNX (fp16) in OUT/onnx, then a TensorRT engine OUT/sparse.plan with SPARSE_WEIGHTS
            (and OUT/dense.plan with --dense-too); needs tensorrt and an sm80+ NVIDIA GPU
  vllm      dense safetensors with the zeros (what current vLLM loads) + maskpro's N:M metadata
  sparse24  compressed-tensors "sparse-24-bitmask" (vLLM releases before the Sparse24 removal, llm-compressor)
  trtllm    a TensorRT-LLM checkpoint in OUT/checkpoint, then trtllm-build --weight_sparsity into OUT/engine

examples:
  maskpro-export pruned/ --engine onnx --out pruned-onnx
  maskpro-export pruned/ --engine trt --out pruned-trt --dense-too
  maskpro-export pruned/ --engine vllm --out pruned-vllm
"""


def _nm(text: str | None) -> NM | None:
    return NM.parse(text) if text else None


def check_main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="maskpro-check",
        description="Verify strict N:M sparsity along the GEMM reduction dimension K of every targeted weight, "
                    "in a model folder saved by maskpro prune or in an ONNX file. Prints a per-layer table "
                    "(and which layers each sparse engine would keep dense), then a summary. Exit code 0: the "
                    "pattern holds; 1: it is broken; 2: bad input (a missing or damaged file).")
    p.add_argument("path", help="model folder, ONNX export folder, or .onnx file")
    p.add_argument("--nm", default=None, help="pattern to check when the folder has no maskpro.json, e.g. 2:4")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="summary only, no per-layer table")
    a = p.parse_args(argv)
    return run_cli("maskpro-check", lambda: _check(a), "nothing was written")


def _check(a: argparse.Namespace) -> None:
    from .check import check_path

    report = check_path(a.path, _nm(a.nm))
    if not a.quiet:
        print(report.table())
    print(report.summary())
    if a.json:
        from maskpro.checkpoint import save_json

        save_json(report.to_json(), a.json)
    report.raise_if_bad()
    print(f"OK: strict {report.nm} on all {len(report.targeted)} targeted layers")


def _triple(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN,OPT,MAX (three integers)") from None
    return lo, opt, hi


def export_main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="maskpro-export", epilog=_EPILOG_EXPORT,
        description="Export a model saved by `maskpro prune` for an inference engine. The N:M pattern is "
                    "checked first; a broken model is refused with the layer and group named.")
    p.add_argument("src", help="model folder written by maskpro prune")
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--out", required=True, help="output folder (written atomically; replaced only on success)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="weights of the export (default: fp32 for onnx, fp16 for trt/trtllm, source for vllm)")
    g = p.add_argument_group("onnx")
    g.add_argument("--no-parity", action="store_true", help="skip the onnxruntime-vs-PyTorch comparison")
    g.add_argument("--opset", type=int, default=17)
    g.add_argument("--data-dir", default=None, help="folder with wikitext2/test.txt for the parity text")
    g = p.add_argument_group("trt")
    g.add_argument("--dense-too", action="store_true", help="also build a dense engine for comparison")
    g.add_argument("--batch", type=_triple, default=(1, 1, 8), metavar="MIN,OPT,MAX")
    g.add_argument("--seq", type=_triple, default=(1, 128, 1024), metavar="MIN,OPT,MAX",
                   help="new tokens per call (prefill up to MAX, decode 1)")
    g.add_argument("--past", type=_triple, default=(0, 512, 1024), metavar="MIN,OPT,MAX")
    g.add_argument("--timing-cache", default=None, help="TensorRT timing cache file (read, then updated)")
    g = p.add_argument_group("trtllm")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the TensorRT-LLM checkpoint")
    g.add_argument("--max-batch-size", type=int, default=8)
    g.add_argument("--max-input-len", type=int, default=1024)
    g.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    if a.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return run_cli("maskpro-export", lambda: _export(a), f"nothing was written to {a.out}")


def _export(a: argparse.Namespace) -> None:
    report = run_export(a)
    print(json.dumps(report, indent=2, default=str)[:4000] if not a.quiet else f"exported to {a.out}")


def run_export(a: argparse.Namespace) -> dict:
    """Check the source, then dispatch to the engine's exporter; returns its report."""
    from .check import check_folder

    src, out = Path(a.src), Path(a.out)
    check = check_folder(src)
    check.raise_if_bad()
    if a.engine == "trt" and not (out / "onnx" / "model.onnx").is_file():  # fail before a long ONNX export
        from .tensorrt import require_engine

        require_engine(f"nothing was written; `maskpro-export {src} --engine onnx --dtype fp16` exports the "
                       "ONNX for a machine that has TensorRT")
    logging.getLogger(__name__).info(check.summary())
    if a.engine == "onnx":
        from .onnx import OnnxExportConfig, export_onnx

        return export_onnx(src, out, OnnxExportConfig(dtype=a.dtype or "fp32", opset=a.opset,
                                                      parity=not a.no_parity, data_root=a.data_dir), check)
    if a.engine == "trt":
        from .onnx import ONNX_FILE, OnnxExportConfig, export_onnx
        from .tensorrt import TrtBuildConfig, build_dense_and_sparse, build_engine, require_engine

        onnx_dir = out / "onnx"
        dtype = a.dtype or "fp16"  # TensorRT 10+/11 networks are strongly typed: the engine runs the ONNX's dtype
        if not (onnx_dir / ONNX_FILE).is_file():
            export_onnx(src, onnx_dir, OnnxExportConfig(dtype=dtype, opset=a.opset, parity=not a.no_parity,
                                                        data_root=a.data_dir), check)
        require_engine(f"the ONNX file {onnx_dir / ONNX_FILE} is kept")
        cfg = TrtBuildConfig(precision=dtype if dtype != "fp32" else "fp16", batch=a.batch, sequence=a.seq,
                             past=a.past, timing_cache=Path(a.timing_cache) if a.timing_cache else None)
        if a.dense_too:
            return build_dense_and_sparse(onnx_dir / ONNX_FILE, out, cfg)
        return build_engine(onnx_dir / ONNX_FILE, out / "sparse.plan", cfg)
    if a.engine == "vllm":
        from .vllm import verify_vllm_checkpoint, write_vllm_checkpoint

        from maskpro.data import wikitext2_text

        write_vllm_checkpoint(src, out, dtype=a.dtype)
        text = wikitext2_text(a.data_dir).strip()[:4000]  # real text for the reload-and-compare check
        return {"engine": "vllm", "out": str(out), "verify": verify_vllm_checkpoint(src, out, text)}
    if a.engine == "sparse24":
        from .vllm import verify_sparse24_bitmask, write_sparse24_bitmask

        write_sparse24_bitmask(src, out)
        return {"engine": "sparse24", "out": str(out), "verify": verify_sparse24_bitmask(src, out)}
    from .trtllm import build_trtllm_engine, write_trtllm_checkpoint

    ckpt = write_trtllm_checkpoint(src, out / "checkpoint", dtype=a.dtype or "fp16", tp_size=a.tp)
    engine = build_trtllm_engine(out / "checkpoint", out / "engine", sparse=True, max_batch_size=a.max_batch_size,
                                 max_input_len=a.max_input_len, max_seq_len=a.max_seq_len, tp=a.tp)
    return {"engine": "trtllm", "checkpoint": ckpt, "build": engine}


if __name__ == "__main__":
    sys.exit(export_main())
