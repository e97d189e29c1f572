"""The kernels benchmark's CPU harness: dense and 2:4 from the same run, percentiles and the spread flag."""

from __future__ import annotations

import json

import pytest

from maskpro.bench import cli, configs


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "kernels-test.json"
    assert cli.main(["kernels", "--config", "tiny", "--tokens", "1", "8", "--reps", "5", "--out", str(out),
                     *extra]) == 0
    return json.loads(out.read_text())


def test_cpu_harness_rows_hold_dense_and_sparse_of_one_run(tmp_path):
    r = _run(tmp_path)
    assert r["device"] == "cpu" and r["env"]["device"] == "cpu" and r["complete"] is True
    assert r["env"]["command"].startswith("maskpro-bench kernels --config tiny")
    assert {"torch", "transformers", "git_commit", "date", "cuda", "driver", "onnxruntime", "tensorrt", "vllm",
            "tensorrt_llm", "triton"} <= set(r["env"])
    shapes = configs.CONFIGS["tiny"].linear_shapes()
    assert [(row["shape"], row["tokens"]) for row in r["rows"]] == [(s, t) for s in shapes for t in (1, 8)]
    for row in r["rows"]:
        assert row["layers"] == shapes[row["shape"]]
        ref = row["paths"]["sparse24-reference"]
        lo, hi = row["dense_p10_p90_us"]
        assert 0 < lo <= row["dense_us"] <= hi
        assert 0 < ref["p10_p90_us"][0] <= ref["us"] <= ref["p10_p90_us"][1]
        assert ref["max_rel_error"] < 1e-5  # the 2:4 path computes the same product
        assert row["best_path"] == "sparse24-reference" and row["best_speedup"] == ref["speedup"]
        # both sides are rounded to 3 decimals, so small speedups need an absolute tolerance too
        assert ref["speedup"] == pytest.approx(row["dense_us"] / ref["us"], rel=1e-2, abs=1e-3)
        assert isinstance(row["trusted"], bool) and row["spread"] >= 0
        assert row["timing"] == "perf_counter" and "runtime_path" not in row  # no GPU runtime pick on CPU
    assert (tmp_path / "kernels-test.png").is_file()


def test_spread_flag_marks_and_warns(tmp_path, capsys):
    strict = _run(tmp_path, "--max-spread", "0")
    err = capsys.readouterr().err
    assert not any(row["trusted"] for row in strict["rows"]) and strict["untrusted_rows"] == len(strict["rows"])
    assert "not trusted" in err and f"{len(strict['rows'])} of {len(strict['rows'])} rows" in err
    lax = _run(tmp_path, "--max-spread", "1000")
    assert all(row["trusted"] for row in lax["rows"]) and lax["untrusted_rows"] == 0


def test_llama2_7b_shapes():
    shape = configs.resolve("llama2-7b")
    assert shape.linear_shapes() == {"4096x4096": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                     "4096x11008": ["gate_proj", "up_proj"], "11008x4096": ["down_proj"]}
    assert shape.linear_weights() == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert configs.resolve("llama2-7b:8").num_hidden_layers == 8
    assert configs.resolve("smollm2-135m").linear_weights() == 106_168_320  # the count in docs/results.md


def test_shapes_from_a_model_folder(tiny_model_dir):
    shape = configs.resolve(str(tiny_model_dir))
    assert shape.linear_shapes() == configs.CONFIGS["tiny"].linear_shapes()
