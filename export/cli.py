"""``maskpro-check`` and ``maskpro-export``: thin command lines over :mod:`maskpro.export`.

Every export checks the N:M pattern of the source first and refuses a broken one, naming the layer and
group. Exit codes follow :mod:`maskpro.errors` and come from the error's type: 1 for a broken pattern
(PatternError), 2 for bad input or a missing engine (any other MaskproError).
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

from .engines import EXPORTERS, engines_help

ENGINES = tuple(EXPORTERS)
_EPILOG_EXPORT = engines_help() + """

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
    """Check the source, then hand it to the engine's exporter; returns its report."""
    from .check import check_folder

    exporter = EXPORTERS[a.engine]
    src, out = Path(a.src), Path(a.out)
    check = check_folder(src)
    check.raise_if_bad()
    exporter.check_available(src, out)  # fail before a long step (the ONNX export of trt) writes anything
    logging.getLogger(__name__).info(check.summary())
    return exporter.export(src, out, a, check)


if __name__ == "__main__":
    sys.exit(export_main())
