"""Every GPU test, run where a GPU is, with the outcome of each recorded against the commit.

  maskpro-bench gpu-tests                         # on the GPU machine, from a checkout
  maskpro-bench gpu-tests -- -x                   # extra pytest arguments after --

Runs the tests marked ``gpu`` (kernels, the fast runtime, the slot cache's CUDA graphs, the learner's
graph-replayed forward, TensorRT where installed) and the vLLM plugin tests (which need vLLM, e.g. 0.26.0
from ``../shared/engines/vllm-0.26/`` on PYTHONPATH), and writes ``gpu-tests.json``: the commit, the device,
and passed / failed / skipped (with the reason) per test. Skips are expected only for TensorRT and
TensorRT-LLM, which cannot be installed on the machines this project has; any other skip is listed under
``unexpected_skips``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from .env import add_output_args, environment, output_path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"gpu-marked": ["tests", "-m", "gpu"], "vllm": ["tests/serve/test_serve_vllm_plugin.py"]}
EXPECTED_SKIPS = ("tensorrt", "TensorRT", "trtllm", "TensorRT-LLM")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    add_output_args(p, "gpu-tests.json")


def parse_junit(path: Path) -> list[dict]:
    """One row per test case of a pytest JUnit XML file: id, outcome and, for skips and failures, why."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, reason = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[tag]
                reason = (node.get("message") or node.text or "").strip().splitlines()[0][:300] if \
                    (node.get("message") or node.text) else None
                break
        rows.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "reason": reason,
                     "seconds": float(case.get("time") or 0)})
    return rows


def summarize(rows: list[dict]) -> dict:
    count = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "skipped")}
    unexpected = [r["id"] for r in rows if r["outcome"] == "skipped"
                  and not any(word in (r["reason"] or "") for word in EXPECTED_SKIPS)]
    return {**count, "unexpected_skips": unexpected}


def run(a: argparse.Namespace) -> Path:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in RUNS.items():
            xml = Path(tmp) / f"{name}.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args,
                   *a.pytest_args]
            print("running", " ".join(cmd), flush=True)
            code = subprocess.run(cmd, cwd=ROOT).returncode
            found = parse_junit(xml) if xml.is_file() else []
            rows += [{**r, "run": name} for r in found]
            if code not in (0, 1, 5) or not xml.is_file():  # pytest crashed (a kernel fault): nothing is clean
                rows.append({"id": f"{name}: pytest itself", "outcome": "failed", "run": name, "seconds": 0.0,
                             "reason": f"pytest exited {code} with {'no' if not xml.is_file() else 'a'} report"})
    result = {**summarize(rows), "env": environment(), "tests": rows}
    path = output_path(a, "gpu-tests.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("passed", "failed", "skipped", "unexpected_skips")}))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("gpu-tests"))
