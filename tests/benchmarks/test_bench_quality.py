"""The quality benchmark's --quick settings run every stage (prune, learn, perplexity, zero-shot) fast."""

from __future__ import annotations

import json
import math

import pytest

from maskpro.bench import cli


def test_quality_quick_on_tiny_model(tiny_model_dir, data_root, tmp_path):
    out = tmp_path / "quality-quick.json"
    assert cli.main(["quality", "--model", str(tiny_model_dir), "--quick", "--methods", "dense", "maskpro",
                     "--zeroshot", "piqa", "--zs-limit", "8", "--data-dir", str(data_root), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["quick"] is True and r["ppl_seq_len"] == 128 and set(r["methods"]) == {"dense", "maskpro"}
    for name, m in r["methods"].items():
        assert math.isfinite(m["wikitext2_ppl"]) and math.isfinite(m["c4_ppl"])
        assert m["zeroshot"]["piqa"]["n"] == 8
        assert r["env"][name]["command"].startswith("maskpro-bench quality")
    assert r["methods"]["maskpro"]["info"]["learner"]["steps"] == 5  # the quick preset
    assert out.with_suffix(".png").is_file()


def test_refit_suffix_measures_the_method_then_its_refit(tiny_model_dir, data_root, tmp_path):
    out = tmp_path / "quality-block.json"
    assert cli.main(["quality", "--model", str(tiny_model_dir), "--quick", "--methods", "wanda+block",
                     "--recon-epochs", "2", "--zeroshot", "none", "--data-dir", str(data_root),
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())["methods"]
    assert set(r) == {"wanda", "wanda+block"}
    done = r["wanda+block"]["info"]["reconstructed"]
    assert done["method"] == "block" and done["epochs"] == 2
    assert all(b["mse_after"] <= b["mse_before"] for b in done["blocks"])
    assert r["wanda+block"]["reconstruct_s"] > 0 and r["wanda+block"]["prune_s"] >= r["wanda"]["prune_s"]


def test_finetuned_pipelines_over_seeds_give_aggregates_and_a_headline(tiny_model_dir, data_root, tmp_path):
    out = tmp_path / "quality-ft.json"
    assert cli.main(["quality", "--model", str(tiny_model_dir), "--quick", "--methods", "wanda+block+ft",
                     "sparsegpt+ft", "--seeds", "0", "1", "--recon-epochs", "1", "--zeroshot", "piqa",
                     "--zs-limit", "8", "--headline", "sparsegpt+ft", "--prior", "wanda+block+ft",
                     "--data-dir", str(data_root), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["methods"]) == {f"{m} seed {s}" for m in ("wanda+block+ft", "sparsegpt+ft") for s in (0, 1)}
    row = r["methods"]["wanda+block+ft seed 1"]
    assert row["seed"] == 1 and row["info"]["finetune"]["steps_done"] == 3  # the quick preset
    assert row["info"]["reconstructed"]["method"] == "block"                # re-fit, then fine-tune
    agg = r["aggregates"]["sparsegpt+ft"]
    ppl = [r["methods"][f"sparsegpt+ft seed {s}"]["wikitext2_ppl"] for s in (0, 1)]
    assert agg["wikitext2_ppl"]["mean"] == sum(ppl) / 2 and agg["wikitext2_ppl"]["n"] == 2
    head = r["headline"]
    assert head["method"] == "sparsegpt+ft" and head["seeds"] == 2
    assert head["prior_mask_wikitext2_ppl_mean"] == r["aggregates"]["wanda+block+ft"]["wikitext2_ppl"]["mean"]
    assert 0 < head["zeroshot_acc_norm_avg"] < 1 and head["minutes_per_run"] > 0


def test_headline_needs_seeds(tiny_model_dir, tmp_path):
    assert cli.main(["quality", "--model", str(tiny_model_dir), "--quick", "--methods", "sparsegpt+ft",
                     "--headline", "sparsegpt+ft", "--out", str(tmp_path / "q.json")]) != 0


def test_cpu_quick_reruns_one_row_and_keeps_the_others(tiny_model_dir, data_root, tmp_path):
    out = tmp_path / "cpu-quick.json"
    old = {"rows": [{"method": "dense", "perplexity": {"wikitext2": -1.0}},
                    {"method": "sparsegpt (same calibration)", "perplexity": {"wikitext2": 194.2}}],
           "env": {"command": "maskpro-bench cpu-quick"}}
    out.write_text(json.dumps(old))
    assert cli.main(["cpu-quick", "--model", str(tiny_model_dir), "--data-dir", str(data_root), "--only", "dense",
                     "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "sparsegpt (same calibration)"]
    assert rows[0]["perplexity"]["wikitext2"] > 1 and "--only dense" in rows[0]["command"]
    assert rows[1] == {"command": "maskpro-bench cpu-quick", **old["rows"][1]}
    assert cli.main(["cpu-quick", "--only", "ft", "--out", str(out)]) == 2  # the fine-tune row needs its length


def test_separate_runs_merge_resume_and_are_reused(tiny_model_dir, data_root, tmp_path):
    """--workdir/--jobs: one process per (method, seed), two at once; the same command again reuses them all."""
    out, work = tmp_path / "quality-runs.json", tmp_path / "runs"
    argv = ["quality", "--model", str(tiny_model_dir), "--quick", "--methods", "dense", "sparsegpt+ft",
            "--seeds", "0", "1", "--zeroshot", "none", "--data-dir", str(data_root), "--workdir", str(work),
            "--jobs", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["methods"]) == {f"{m} seed {s}" for m in ("dense", "sparsegpt+ft") for s in (0, 1)}
    assert r["methods"]["sparsegpt+ft seed 1"]["info"]["finetune"]["steps_done"] == 3
    assert r["methods"]["sparsegpt+ft seed 1"]["attempts"] == 1
    assert r["env"]["dense seed 0"]["command"] == "maskpro-bench " + " ".join(argv)
    assert r["aggregates"]["sparsegpt+ft"]["wikitext2_ppl"]["n"] == 2
    ft_dir = work / "sparsegpt+ft-seed1"
    assert (ft_dir / "finetune-state.safetensors").is_file()  # the run checkpointed in its own folder
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("*/done.json")}
    assert len(stamps) == 4
    out.unlink()
    assert cli.main(argv) == 0  # nothing left to run: the rows come back from the run folders
    assert json.loads(out.read_text())["methods"] == r["methods"]
    assert {p: p.stat().st_mtime_ns for p in work.glob("*/done.json")} == stamps
    # Other settings are another run: --ft-lr changes the fine-tuned rows, not the dense ones.
    assert cli.main([*argv[:-2], "--ft-lr", "1e-3", "--out", str(out)]) == 0
    changed = {p.parent.name for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert changed == {"sparsegpt+ft-seed0", "sparsegpt+ft-seed1"}


def test_jobs_need_a_workdir(tiny_model_dir, tmp_path):
    assert cli.main(["quality", "--model", str(tiny_model_dir), "--quick", "--methods", "dense", "--jobs", "2",
                     "--out", str(tmp_path / "q.json")]) == 2


def test_reward_snr_correlates_two_runs_per_block_for_each_loss(tiny_model_dir, data_root, tmp_path):
    out = tmp_path / "snr.json"
    assert cli.main(["reward-snr", "--model", str(tiny_model_dir), "--steps", "3", "--rows", "16", "--seq-len", "32",
                     "--batch-size", "4", "--losses", "ce", "local", "row", "--data-dir", str(data_root),
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())["results"]
    assert set(r) == {"ce", "local", "row"}
    for loss in r.values():
        assert set(loss["corr_per_block"]) == {"0", "1"} and len(loss["runs"]) == 2
        assert all(-1 <= c <= 1 for c in loss["corr_per_block"].values())
        assert loss["corr_whole_model"] != 0  # the two sums are real, independent, nonzero estimates


def test_mask_search_reports_row_errors_of_prior_learned_and_greedy_masks(tiny_model_dir, data_root, tmp_path):
    out = tmp_path / "search.json"
    assert cli.main(["mask-search", "--model", str(tiny_model_dir), "--targets", "model.layers.1.*", "--steps", "4",
                     "--variants", "group:3000", "row:1", "--greedy", "--data-dir", str(data_root),
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["variant"] for row in r["rows"]] == ["group:3000", "row:1"]
    prior = r["greedy"]["prior_row_error"]
    for row in r["rows"]:
        assert row["baseline_loss"] == pytest.approx(prior, rel=1e-4)  # both score the same prior the same way
        assert row["final_loss"] > 0 and 0 <= row["changed_fraction"] < 0.5
    assert 0 < r["greedy"]["greedy_row_error"] < prior  # the exact search always finds something better


def test_refit_ceiling_orders_the_four_errors(tiny_model_dir, data_root, tmp_path):
    """Exact least squares is the best re-fit of a mask, and the greedy search only accepts improvements."""
    out = tmp_path / "refit.json"
    assert cli.main(["refit-ceiling", "--model", str(tiny_model_dir), "--layers", "model.layers.1.mlp.gate_proj",
                     "--rows", "3", "--sweeps", "1", "--data-dir", str(data_root), "--out", str(out), "--eval",
                     "--targets", "model.layers.1.*"]) == 0
    result = json.loads(out.read_text())
    assert [p["pipeline"] for p in result["pipelines"]] == ["sparsegpt", "sparsegpt+exact", "sparsegpt+block",
                                                             "maskpro@sparsegpt+exact"]
    assert all(p["perplexity"]["wikitext2"] > 1 for p in result["pipelines"])
    r = result["layers"]["model.layers.1.mlp.gate_proj"]["per_row"]
    for i in range(3):
        seq, exact = r["sparsegpt_seq"][i], r["sparsegpt_exact"][i]
        greedy, greedy_seq = r["greedy_exact"][i], r["greedy_seq"][i]
        assert 0 < exact <= seq * (1 + 1e-9) and greedy <= exact * (1 + 1e-9) and greedy <= greedy_seq * (1 + 1e-9)
    assert sum(r["greedy_exact"]) < sum(r["sparsegpt_exact"])  # a random tiny model leaves the search room
    assert cli.main(["refit-ceiling", "--model", str(tiny_model_dir), "--layers", "model.layers.9.nope",
                     "--data-dir", str(data_root), "--out", str(out)]) != 0
