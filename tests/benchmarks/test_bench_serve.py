"""The serve load benchmark against real maskpro-serve processes on loopback (no mocked server)."""

from __future__ import annotations

import json

import pytest

from maskpro.bench import cli
from maskpro.bench.serve_load import free_port, launch_server


def _levels_ok(r: dict) -> None:
    for lv in r["levels"]:
        assert lv["errors"] == 0 and lv["ok"] == lv["requests"] > 0
        assert lv["requests_per_s"] > 0 and lv["output_tokens_per_s"] > 0
        for key in ("ttft_ms", "itl_ms", "latency_ms"):
            p = lv[key]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"], (key, p)
        assert lv["ttft_ms"]["p99"] <= lv["latency_ms"]["p99"]


@pytest.fixture(scope="module")
def smol_url(smollm2_path, tmp_path_factory):
    with launch_server(str(smollm2_path), ["--served-model-name", "smollm2"], 180,
                       tmp_path_factory.mktemp("serve-logs")) as url:
        yield url


def test_serve_smollm2_two_levels(smol_url, tmp_path):
    out = tmp_path / "serve-smol.json"
    assert cli.main(["serve", "--url", smol_url, "--concurrency", "1", "3", "--requests", "4", "--max-tokens", "8",
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["model"] == "smollm2" and r["errors_total"] == 0 and [lv["concurrency"] for lv in r["levels"]] == [1, 3]
    _levels_ok(r)
    assert all(lv["output_tokens"] == lv["ok"] * 8 for lv in r["levels"])  # ignore_eos: every request gives 8
    assert r["server_health"]["backend"] == "torch" and r["prompts"]["source"].startswith("wikitext2")
    assert r["env"]["command"].startswith("maskpro-bench serve --url") and out.with_suffix(".png").is_file()
    chat = tmp_path / "serve-chat.json"
    assert cli.main(["serve", "--url", smol_url, "--chat", "--concurrency", "2", "--requests", "2", "--max-tokens",
                     "4", "--out", str(chat)]) == 0
    _levels_ok(json.loads(chat.read_text()))


def test_serve_counts_http_errors_and_timeouts(smol_url, tmp_path):
    out = tmp_path / "serve-errors.json"
    assert cli.main(["serve", "--url", smol_url, "--model", "no-such-model", "--concurrency", "2", "--requests", "3",
                     "--out", str(out)]) == 0
    lv = json.loads(out.read_text())["levels"][0]
    assert lv["errors_by_kind"] == {"http_404": 3} and lv["ok"] == 0 and lv["ttft_ms"]["p50"] is None
    assert cli.main(["serve", "--url", smol_url, "--concurrency", "1", "--requests", "2", "--max-tokens", "64",
                     "--timeout", "0.001", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["levels"][0]["errors_by_kind"] == {"timeout": 2}


def test_unreachable_url_is_counted_and_one_line(tmp_path, capsys):
    out = tmp_path / "serve-down.json"
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    assert cli.main(["serve", "--url", url, "--concurrency", "1", "2", "--requests", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"maskpro-bench: error: no request reached {url}")
    r = json.loads(out.read_text())
    assert [(lv["requests"], lv["errors_by_kind"]) for lv in r["levels"]] == [(3, {"connect": 3})] * 2


def test_launch_starts_benchmarks_and_stops_the_server(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "serve-launch.json"
    assert cli.main(["serve", "--launch", str(tiny_model_dir), "--serve-arg=--max-batch-size=2", "--concurrency",
                     "2", "--requests", "2", "--max-tokens", "4", "--out", str(out)]) == 0
    assert "maskpro-serve stopped (exit code 0)" in capsys.readouterr().out
    r = json.loads(out.read_text())
    _levels_ok(r)
    assert r["launched"]["model"] == str(tiny_model_dir) and r["server_health"]["max_batch_size"] == 2


def test_soak_mixed_lengths_disconnects_and_memory(tiny_model_dir, tmp_path):
    """The soak's ingredients on a small scale: random lengths, clients that hang up, memory read from /health."""
    out = tmp_path / "serve-soak.json"
    assert cli.main(["serve", "--launch", str(tiny_model_dir), "--concurrency", "6", "--duration", "8",
                     "--max-tokens", "48", "--mixed", "--disconnect-rate", "0.3", "--sample-memory", "0.25",
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    lv = r["levels"][0]
    assert lv["errors"] == 0 and lv["ok"] > 0 and lv["disconnected"] > 0 and r["mixed"] is True
    assert lv["ok"] + lv["disconnected"] == lv["requests"]
    assert lv["output_tokens"] < 48 * lv["ok"]  # lengths were drawn (ignore_eos would give 48 each)
    mem = lv["memory"]
    assert mem["samples"] >= 10 and 0 < mem["first_bytes"] <= mem["max_bytes"]
    health = r["server_health"]
    assert health["outcomes"].get("client_closed_request", 0) >= 1  # the server saw the hang-ups
    assert health["running"] == 0  # every hung-up request was dropped from the batch
