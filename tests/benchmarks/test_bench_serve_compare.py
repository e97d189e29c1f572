"""maskpro-bench serve-compare on committed load tests of real servers: ratios, bars and refusing unequal loads."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from maskpro.bench import cli, serve_compare
from maskpro.errors import MaskproError

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
DENSE = RESULTS / "serve-h100-smollm2-dense-graphs.json"     # maskpro-serve on SmolLM2, dense, CUDA graphs
SPARSE = RESULTS / "serve-h100-smollm2-graphs.json"          # the same load against the 2:4 model
OTHER_PROMPTS = RESULTS / "serve-h100-smollm2-eager.json"    # WikiText-2 prompts instead of the built-in ones


def test_ratios_and_bars_come_from_each_level(tmp_path):
    out = tmp_path / "cmp.json"
    assert cli.main(["serve-compare", "--baseline", str(DENSE), str(SPARSE), "--bar", "1:1.1", "--bar", "32:1.2",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    base, cand = json.loads(DENSE.read_text()), json.loads(SPARSE.read_text())
    (got,) = result["candidates"]
    assert [r["concurrency"] for r in got["rows"]] == result["levels"] == [1, 8, 32]
    for row, b, c in zip(got["rows"], base["levels"], cand["levels"]):
        assert row["speedup"] == pytest.approx(c["output_tokens_per_s"] / b["output_tokens_per_s"])
        assert row["ttft_p50_ms"] == c["ttft_ms"]["p50"] and row["baseline_itl_p50_ms"] == b["itl_ms"]["p50"]
    speedup = {r["concurrency"]: r["speedup"] for r in got["rows"]}
    assert got["bars"]["tokens_per_s_x1.1_at_1"] == {"need": 1.1, "got": speedup[1], "pass": speedup[1] >= 1.1}
    assert got["bars"]["tokens_per_s_x1.2_at_32"]["pass"] is (speedup[32] >= 1.2)
    assert got["bars"]["no_failed_request"]["pass"] is True
    assert got["all_pass"] is all(b["pass"] for b in got["bars"].values())
    assert result["baseline"]["file"] == DENSE.name and result["load"]["max_tokens"] == base["max_tokens"]


def test_failed_requests_fail_their_bar():
    base = json.loads(DENSE.read_text())
    cand = copy.deepcopy(base)
    cand["levels"][2]["ok"] -= 3                      # three requests of the 32-client level failed
    got = serve_compare.compare(base, cand, {32: 1.0})
    assert got["rows"][2]["failed"] == 3 and got["bars"]["no_failed_request"] == {"need": 0, "got": 3, "pass": False}
    assert got["bars"]["tokens_per_s_x1_at_32"]["pass"] is True and got["all_pass"] is False


def test_runs_of_another_load_are_refused(tmp_path):
    with pytest.raises(MaskproError, match="differ in prompts"):
        serve_compare.run(cli.build_parser().parse_args(
            ["serve-compare", "--baseline", str(DENSE), str(OTHER_PROMPTS), "--out", str(tmp_path / "x.json")]))
    fewer = json.loads(SPARSE.read_text())
    fewer["levels"] = fewer["levels"][:2]
    with pytest.raises(MaskproError, match="concurrency levels"):
        serve_compare.check_same_load(json.loads(DENSE.read_text()), fewer, "fewer.json")
    assert not (tmp_path / "x.json").exists()


def test_bad_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"levels\": []}")
    for args, words in ((["--baseline", str(DENSE), str(SPARSE), "--bar", "32"], "LEVEL:RATIO"),
                        (["--baseline", str(tmp_path / "none.json"), str(SPARSE)], "does not exist"),
                        (["--baseline", str(DENSE), str(bad)], "no load levels")):
        assert cli.main(["serve-compare", *args, "--out", str(tmp_path / "o.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
