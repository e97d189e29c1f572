"""``maskpro-bench gpu-tests`` reads pytest's own JUnit XML: a real pytest run with each outcome."""

from __future__ import annotations

import subprocess
import sys

from maskpro.bench.gpu_tests import parse_junit, summarize


def test_outcomes_and_skip_reasons_come_from_a_real_pytest_run(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert 1\n"
        "def test_bad():\n    assert 0, 'wrong'\n"
        "@pytest.mark.skip(reason='TensorRT is not installed')\ndef test_trt():\n    pass\n"
        "@pytest.mark.skip(reason='no GPU here')\ndef test_gpu():\n    pass\n")
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True)
    rows = {r["id"].split("::")[-1]: r for r in parse_junit(xml)}
    assert {k: r["outcome"] for k, r in rows.items()} == {"test_ok": "passed", "test_bad": "failed",
                                                          "test_trt": "skipped", "test_gpu": "skipped"}
    assert "wrong" in rows["test_bad"]["reason"] and "TensorRT" in rows["test_trt"]["reason"]
    summary = summarize(list(rows.values()))
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 1, 2)
    assert [i.split("::")[-1] for i in summary["unexpected_skips"]] == ["test_gpu"]
