"""maskpro-bench vllm-plugin on CPU: the summary's arithmetic and bars from two runs' JSON, the greedy comparison,
the export both runs load (and its reuse), the child command lines, and one error line without vLLM. The engine
runs themselves need a CUDA GPU and vLLM 0.26.0 (benchmarks/device/vllm_plugin.sh)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from maskpro.artifacts import save_pruned
from maskpro.bench import vllm_plugin as vp
from maskpro.bench.cli import main
from maskpro.errors import MaskproError
from maskpro.models import tiny_llama
from maskpro.nm import NM
from maskpro.oneshot import magnitude_prune

ROW_KEYS = {"batch": int, "dense_decode_ms": float, "plugin_decode_ms": float, "speedup": float,
            "dense_ttft_ms": float, "plugin_ttft_ms": float}


def _run(points: list[tuple[int, int, float, float]], **extra) -> dict:
    """What ``python -m maskpro.bench.vllm_dense`` prints: (batch, prompt, decode ms, ttft ms) per point."""
    return {"vllm": "0.26.0", "cuda_graphs": True, "startup_s": 41.0, "weights_gib": 12.6, **extra,
            "rows": [{"batch": b, "prompt": p, "decode_ms": d, "ttft_ms": t} for b, p, d, t in points]}


def _pruned(out: Path, seed: int = 0) -> Path:
    model = tiny_llama(seed=seed, hidden=64, layers=2, intermediate=128)
    return save_pruned(model, None, out, magnitude_prune(model, NM(2, 4)).masks, NM(2, 4), "magnitude")


def test_rows_pair_points_and_divide_dense_by_plugin():
    dense = _run([(1, 512, 4.65, 12.0), (16, 512, 5.94, 33.0)])
    plugin = _run([(16, 512, 4.5, 34.0), (1, 512, 3.1, 12.5)])  # another order: paired by point, not position
    rows = vp.point_rows(dense, plugin)
    assert [(r["batch"], r["prompt"]) for r in rows] == [(1, 512), (16, 512)]
    assert rows[0]["speedup"] == pytest.approx(4.65 / 3.1) and rows[1]["speedup"] == pytest.approx(5.94 / 4.5)
    assert rows[0]["ttft_ratio"] == pytest.approx(12.5 / 12.0)
    assert (rows[1]["dense_ttft_ms"], rows[1]["plugin_ttft_ms"]) == (33.0, 34.0)
    with pytest.raises(MaskproError, match="no point batch 16 prompt 512"):
        vp.point_rows(dense, _run([(1, 512, 3.1, 12.5)]))


def test_bars_pass_fail_and_unmeasured():
    rows = vp.point_rows(_run([(1, 512, 4.5, 10.0), (1, 128, 4.0, 5.0), (16, 512, 6.0, 30.0)]),
                         _run([(1, 512, 3.0, 10.5), (1, 128, 4.0, 5.0), (16, 512, 5.0, 30.0)]))
    b = vp.bars(rows, True)
    assert b["decode_batch1"]["got"] == pytest.approx(1.5) and b["decode_batch1"]["pass"]  # the bar itself passes
    assert b["decode_batch16"]["got"] == pytest.approx(1.2) and b["decode_batch16"]["pass"] is False
    assert b["ttft"]["got"] == pytest.approx(1.05) and b["ttft"]["pass"]
    assert b["greedy_equal"]["pass"] is True and b["all_pass"] is False
    # Points off prompt 512 do not stand in for the bars' points; what was not measured passes nothing.
    only_short = vp.point_rows(_run([(1, 128, 4.0, 5.0)]), _run([(1, 128, 2.0, 5.0)]))
    b = vp.bars(only_short, None)
    assert b["decode_batch1"]["pass"] is None and b["decode_batch16"]["pass"] is None
    assert b["greedy_equal"]["pass"] is None and b["ttft"]["pass"] is True and b["all_pass"] is False
    good = vp.point_rows(_run([(1, 512, 4.8, 12.0), (16, 512, 6.4, 33.0)]),
                         _run([(1, 512, 3.0, 12.0), (16, 512, 5.0, 33.5)]))
    assert vp.bars(good, True)["all_pass"] is True
    assert vp.bars(good, False)["all_pass"] is False


def test_greedy_comparison_names_the_first_differing_token():
    same = vp.compare_greedy([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]])
    assert same["equal"] and [p["first_diff"] for p in same["prompts"]] == [None, None]
    diff = vp.compare_greedy([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6], [7, 8, 9]])
    assert not diff["equal"]
    assert [(p["equal"], p["first_diff"]) for p in diff["prompts"]] == [(True, None), (False, 1), (False, 2)]
    assert not vp.compare_greedy([[1], [2]], [[1]])["equal"]  # a missing prompt is not equality


def test_summary_has_the_issue_shape():
    dense = _run([(1, 512, 4.65, 12.0), (4, 512, 4.8, 24.0), (16, 512, 5.94, 33.0)], weights_gib=12.6)
    plugin = _run([(1, 512, 3.0, 12.4), (4, 512, 3.4, 25.0), (16, 512, 4.6, 34.0)], weights_gib=7.4)
    s = vp.summarize("NVIDIA H200", dense, plugin, {"equal": None, "reason": "no --smollm2 folder given"})
    assert isinstance(s["device"], str) and isinstance(s["vllm"], str) and s["cuda_graphs"] is True
    assert [r["batch"] for r in s["rows"]] == [1, 4, 16]
    assert all(isinstance(r[k], t) for r in s["rows"] for k, t in ROW_KEYS.items())
    assert s["smollm2_greedy_equal"] is None and s["greedy"]["reason"] == "no --smollm2 folder given"
    assert s["weights_gib"] == {"dense": 12.6, "plugin": 7.4} and s["startup_s"]["plugin"] == 41.0
    assert s["dense_run"] is dense and s["plugin_run"] is plugin  # the raw per-point figures are kept
    json.dumps(s)
    # A failed engine leaves no rows, nothing passes, and its error is kept in the raw run.
    failed = vp.summarize("NVIDIA H200", dense, {"error": "Unknown quantization method: maskpro"}, {"equal": True})
    assert failed["rows"] == [] and failed["cuda_graphs"] is False and not failed["bars"]["all_pass"]
    assert failed["plugin_run"]["error"].startswith("Unknown")


def test_the_result_line_is_found_among_engine_logs():
    out = ('INFO 12-04 [llm.py] starting\n{"rows": [], "vllm": "0.26.0"}\n'
           '(EngineCore pid=9) INFO shutting down\n{"level": "info"}\n')
    assert vp.last_json(out, "rows") == {"rows": [], "vllm": "0.26.0"}
    assert vp.last_json("Traceback ...\nValueError: boom\n", "rows") is None


def test_both_runs_load_one_export_and_only_the_plugin_names_maskpro(tmp_path):
    a = argparse.Namespace(new=128, reps=5, dtype="float16", points=["1:512", "16:512"], enforce_eager=False)
    dense, plugin = vp.timing_cmd(tmp_path, a, None), vp.timing_cmd(tmp_path, a, "maskpro")
    assert dense[1:3] == ["-m", "maskpro.bench.vllm_dense"] and str(tmp_path) in dense
    assert [w for w in plugin if w not in dense] == ["--quantization", "maskpro"] and set(dense) < set(plugin)
    assert vp.greedy_cmd(tmp_path, a, "maskpro")[3:5] == ["--greedy-child", str(tmp_path)]
    # vllm_dense's own parser takes every option the bench passes (a bad point is its first complaint).
    a.points, a.enforce_eager = ["1x512"], True
    done = subprocess.run(vp.timing_cmd(tmp_path, a, "maskpro"), capture_output=True, text=True)
    assert done.returncode == 2 and "BATCH:PROMPT pairs" in done.stderr, done.stderr


def test_export_is_the_vllm_engines_plain_checkpoint_and_is_reused(tmp_path):
    src = _pruned(tmp_path / "src")
    out = tmp_path / "work" / "sparse-vllm"
    first = vp.export_for_vllm(src, out)
    config = json.loads((out / "config.json").read_text())
    # Nothing in it selects the plugin: vLLM loads it dense unless --quantization maskpro is given.
    assert not first["reused"] and "quantization_config" not in config and config["maskpro"]["n"] == 2
    assert (out / "maskpro.json").is_file()
    assert vp.export_for_vllm(src, out)["reused"]
    other = _pruned(tmp_path / "other", seed=1)
    assert not vp.export_for_vllm(other, out)["reused"]  # another source is exported again


def test_without_vllm_one_line_exit_2_before_any_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # how Python marks a package that cannot be imported
    src = _pruned(tmp_path / "src")
    work, results = tmp_path / "work", tmp_path / "results"
    capsys.readouterr()  # the save's progress bar
    assert main(["vllm-plugin", "--sparse", str(src), "--work", str(work), "--out-dir", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maskpro-bench: error: ") and "pip install vllm==0.26.0" in err
    assert "Traceback" not in err and not work.exists() and not results.exists()
