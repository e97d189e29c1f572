"""maskpro-bench report renders SUMMARY.md only from what the results JSON hold, with their commands."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from maskpro.bench import cli
from maskpro.bench.env import RESULTS
from maskpro.bench.report import render

# The checkout holding this test: its README and docs quote its committed results (the installed maskpro.bench,
# hence RESULTS, may come from another checkout).
ROOT = Path(__file__).resolve().parents[2]

ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0", "driver": "580.1", "triton": "3.5.0",
       "git_commit": "abc123", "date": "2026-01-01T00:00:00+00:00"}


def _env(command: str) -> dict:
    return {**ENV, "command": command}


FIXTURES = {
    "kernels-fix.json": {
        "device": ENV["device"], "max_spread": 0.1, "complete": True, "env": _env("maskpro-bench kernels --reps 7"),
        "rows": [
            {"shape": "4096x11008", "layers": ["gate_proj", "up_proj"], "tokens": 1, "dtype": "float16",
             "dense_us": 36.04, "dense_p10_p90_us": [35.9, 36.2], "best_path": "sparse24-triton",
             "paths": {"sparse24-triton": {"us": 26.1, "p10_p90_us": [26.0, 26.3], "speedup": 1.381},
                       "torch-semi-structured": {"error": "RuntimeError: not supported"}},
             "runtime_path": "sparse24-triton", "speedup": 1.381, "read_floor_us": {"compressed": 19.1, "dense": 32.2},
             "trusted": True},
            {"shape": "4096x11008", "layers": ["gate_proj", "up_proj"], "tokens": 16, "dtype": "float16",
             "dense_us": 36.7, "dense_p10_p90_us": [30.0, 45.0], "best_path": "sparse24-triton",
             "paths": {"sparse24-triton": {"us": 142.9, "p10_p90_us": [142.0, 143.0], "speedup": 0.257}},
             "runtime_path": "dense", "speedup": 1.0, "trusted": False}]},
    "kernels-old.json": {  # before rows carried paths and trusted
        "device": ENV["device"], "method": "x", "env": _env("kernels.py --reps 20 --tag h100"),
        "rows": [{"shape": "4096x4096", "tokens": 1, "dtype": "fp16", "dense_us": 15.75, "sparse_us": 14.99,
                  "speedup": 1.051, "runtime_path": "sparse24-triton", "triton_us": 14.99, "triton_speedup": 1.051,
                  "dense_p10_p90_us": [15.69, 15.87], "triton_p10_p90_us": [14.91, 15.24]}]},
    "generate-fix.json": {
        "device": ENV["device"], "model": "llama2-7b (random weights)", "dtype": "float16", "new_tokens": 128,
        "env": _env("maskpro-bench generate --batch-sizes 1 64"),
        "rows": [{"batch": 1, "prompt_tokens": 512, "decode_speedup": 1.083, "ttft_speedup": 0.99, "trusted": True,
                  "dense": {"ttft_ms": 41.5, "ms_per_token": 7.25, "decode_tokens_per_s": 137.9, "peak_gib": 13.1},
                  "sparse": {"ttft_ms": 41.9, "ms_per_token": 6.69, "decode_tokens_per_s": 149.4,
                             "peak_gib": 14.2}},
                 {"batch": 64, "prompt_tokens": 512, "dense": {"error": "CUDA out of memory"},
                  "sparse": {"error": "CUDA out of memory"}, "trusted": False}]},
    "serve-fix.json": {
        "device": "cpu", "url": "http://127.0.0.1:8000/v1", "model": "smollm2", "max_tokens": 8,
        "server_health": {"backend": "torch", "device": "cpu"}, "prompts": {"source": "wikitext2 test paragraphs"},
        "env": _env("maskpro-bench serve --url http://127.0.0.1:8000/v1 --concurrency 1 4"),
        "levels": [{"concurrency": c, "requests": 8, "ok": 8 - e, "errors": e,
                    "errors_by_kind": {"timeout": e} if e else {}, "requests_per_s": rps,
                    "output_tokens_per_s": rps * 8, "ttft_ms": {"p50": 210.5, "p90": 320.25, "p99": 359.75},
                    "itl_ms": {"p50": 70.0, "p90": 73.5, "p99": 75.5},
                    "latency_ms": {"p50": 681.5, "p90": 815.0, "p99": 860.75}}
                   for c, e, rps in ((1, 0, 1.375), (4, 1, 3.125))]},
    "learner-fix.json": {
        "device": ENV["device"], "dtype": "float16", "batch": [32, 128], "nm": "2:4",
        "env": _env("maskpro-bench learn --configs llama2-7b --tag fix"),
        "maskllm_assumptions": ["logits: one fp32 logit per candidate mask"],
        "configs": {
            name: {"linear_weights": n, "command": f"maskpro-bench learn --configs {name} --tag fix", "rows": rows,
                   "memory_model": {"maskpro": {"total": 13 * n, "bytes_per_weight": 13.0},
                                    "maskllm": {"total_lower_bound": 38 * n, "bytes_per_weight": 38.0},
                                    "maskllm_over_maskpro": 38 / 13}}
            for name, n, rows in (
                ("smollm2", 106168320, {"maskpro": {"ms_per_step": 13.22, "ms_p10": 13.15, "ms_p90": 13.28,
                                                    "peak_gib": 6.45, "trusted": True}}),
                ("llama2-7b", 6476005376, {"maskpro": {"skipped": "needs about 98.1 GiB (estimate), 78.5 GiB free"}}))
        }},
    "quality-fix.json": {
        "device": ENV["device"], "model": "SmolLM2", "dtype": "fp16", "ppl_seq_len": 2048,
        "methods": {"dense": {"wikitext2_ppl": 21.6123, "c4_ppl": 30.08,
                              "zeroshot": {"average": {"acc": 0.4071, "acc_norm": 0.4432}}},
                    "sparsegpt": {"wikitext2_ppl": 98.9361, "c4_ppl": 116.32, "prune_s": 42.6}},
        "env": {"dense": _env("maskpro-bench quality --methods dense"),
                "sparsegpt": _env("quality.py --methods sparsegpt")}},
}


def test_report_renders_fixture_json(tmp_path):
    for name, d in FIXTURES.items():
        (tmp_path / name).write_text(json.dumps(d))
    (tmp_path / "notes.json").write_text("{}")  # not a results file: ignored
    assert cli.main(["report", "--results", str(tmp_path)]) == 0
    md = (tmp_path / "SUMMARY.md").read_text()
    # every table names its command; pre-CLI ones as the python -m call that made them
    for cmd in ("maskpro-bench kernels --reps 7", "maskpro-bench generate --batch-sizes 1 64",
                "maskpro-bench serve --url http://127.0.0.1:8000/v1 --concurrency 1 4",
                "maskpro-bench quality --methods dense"):
        assert f"`{cmd}`" in md
    assert "`python -m benchmarks.kernels --reps 20 --tag h100` †" in md
    assert "`python -m benchmarks.quality --methods sparsegpt` †" in md
    lines = md.splitlines()
    row = next(ln for ln in lines if ln.startswith("| 4096x11008 | gate_proj, up_proj | 1 |"))
    assert "36.04 (35.90-36.20)" in row and "26.10 (26.00-26.30)" in row and "1.381" in row and row.endswith("yes |")
    assert "| 19.10 / 32.20 |" in row  # the read floors of a decode row
    assert next(ln for ln in lines if ln.startswith("| 4096x11008 | gate_proj, up_proj | 16 |")).endswith("- | **no** |")
    assert "2 rows, 1 not trusted" in md
    old = next(ln for ln in lines if ln.startswith("| 4096x4096 | - | 1 |"))
    assert "14.99 (14.91-15.24)" in old and old.endswith("yes |")  # spread from the recorded p10/p90
    assert "| 1 | 512 | 41.50 / 41.90 | 7.250 / 6.690 | 137.9 / 149.4 | 1.083 | 0.990 | 13.10 / 14.20 GiB | - | - | yes |" in md
    assert "| 64 | 512 | CUDA out of memory |" in md
    assert "| 4 | 7/8 | 1 | timeout 1 | 3.125 | 25.0 | 210.5 / 320.2 / 359.8 | 70.0 / 73.5 / 75.5 |" in md
    # a learner file filled config by config names each config's command
    assert ("| smollm2 | 106,168,320 | maskpro | 13.22 (13.15-13.28) | 6.45 GiB | yes | "
            "`maskpro-bench learn --configs smollm2 --tag fix` |") in md
    assert "| llama2-7b | 6,476,005,376 | maskpro | needs about 98.1 GiB" in md
    assert "All rows: `maskpro-bench learn" not in md
    assert "needs about 98.1 GiB (estimate)" in md and "(38.0 B/weight)" in md
    assert "| dense | 21.61 | 30.08 | 0.407 / 0.443 | - |" in md and "| sparsegpt | 98.94 | 116.32 | - | 42.6 |" in md
    assert "notes.json" not in md
    for name in ("kernels-fix", "generate-fix", "serve-fix", "learner-fix", "quality-fix"):  # --plots missing
        assert (tmp_path / f"{name}.png").is_file() and f"![{name}]({name}.png)" in md


def quality_table_figures() -> list[str]:
    """The WikiText-2 and C4 perplexities of the quality results table (docs/results.md), as printed there."""
    section = (ROOT / "docs" / "results.md").read_text().split("## Quality results")[1]
    table = section[section.index("| method"):].split("\n\n")[0]  # the first table of the section
    rows = [l for l in table.splitlines() if not l.startswith(("| method", "|---"))]
    return [c.strip().strip("*") for r in rows for c in r.strip("|").split("|")[1:3]]


def test_report_of_committed_results_is_current(tmp_path):
    """SUMMARY.md (which the README links) matches the committed JSON; rerun `maskpro-bench report` if not.
    Every figure of the quality results table (docs/results.md) is in it."""
    assert (RESULTS / "SUMMARY.md").read_text() == render(RESULTS), \
        "benchmarks/results/SUMMARY.md is stale: run `maskpro-bench report --plots none` and commit it"
    summary = (ROOT / "benchmarks" / "results" / "SUMMARY.md").read_text()
    figures = quality_table_figures()
    assert len(figures) >= 24 and "43.29" in figures
    assert [f for f in figures if f not in summary] == [], "a figure of docs/results.md is in no committed result"
    # rendering elsewhere reads only: a copy renders the same text with no file written next to the results
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    assert cli.main(["report", "--results", str(copy), "--plots", "none", "--out", str(tmp_path / "S.md")]) == 0
    assert (tmp_path / "S.md").read_text() == render(RESULTS)


# Every figure the README quotes, with the committed result it comes from:
# (as printed, result file, path to the value in its JSON, divisor: 60 for seconds printed as minutes).
VS_VLLM = "vs-vllm-dense.json"
QUALITY = "quality-smollm2-2of4.json"
CPU_QUICK = "cpu-quick.json"
README_FIGURES = [
    ("7.27 GiB", VS_VLLM, ("weights_gib", "sparse"), 1),
    ("12.55 GiB", VS_VLLM, ("weights_gib", "dense"), 1),
    ("1.72x", VS_VLLM, ("rows", 0, "speedup"), 1),  # batch 1
    ("1.66x", VS_VLLM, ("rows", 0, "speedup_vs_strongest_dense"), 1),
    ("1.57x", VS_VLLM, ("rows", 1, "speedup_vs_strongest_dense"), 1),  # batch 4: vLLM was the faster dense there
    ("1.37x", VS_VLLM, ("rows", 2, "speedup"), 1),  # batch 16
    ("1.00x", VS_VLLM, ("rows", 3, "speedup"), 1),  # batch 64
    ("1.58x", VS_VLLM, ("rows", 0, "ttft_vs_strongest_dense"), 1),
    ("43.29", QUALITY, ("methods", "maskpro@sparsegpt-block-12k", "wikitext2_ppl"), 1),  # the main job
    ("98.94", QUALITY, ("methods", "sparsegpt", "wikitext2_ppl"), 1),
    ("21.61", QUALITY, ("methods", "dense", "wikitext2_ppl"), 1),
    ("43.86", QUALITY, ("methods", "sparsegpt+block", "wikitext2_ppl"), 1),
    ("5.5 minutes", QUALITY, ("methods", "maskpro@sparsegpt-block-12k", "prune_s"), 60),
    ("6.6 minutes", CPU_QUICK, ("rows", 2, "prune_s"), 60),  # the cpu-quick preset
    ("154.7", CPU_QUICK, ("rows", 2, "perplexity", "wikitext2"), 1),
    ("194.2", CPU_QUICK, ("rows", 1, "perplexity", "wikitext2"), 1),  # SparseGPT, same calibration
    ("36.6", CPU_QUICK, ("rows", 0, "perplexity", "wikitext2"), 1),  # dense
    ("88.7", CPU_QUICK, ("rows", 3, "perplexity", "wikitext2"), 1),  # the preset + 120 fine-tune steps
    ("108.0", CPU_QUICK, ("rows", 2, "perplexity", "c4"), 1),
    ("65.4", CPU_QUICK, ("rows", 3, "perplexity", "c4"), 1),
]


def readme_prose_decimals(text: str) -> list[str]:
    """Decimal figures in the README outside code blocks and code spans, versions and identifiers left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    prose = " ".join(line for line in text.splitlines() if not line.startswith("    "))  # indented: code
    prose = re.sub(r"`[^`]*`", "", prose)
    prose = re.sub(r"(arXiv|vLLM) \d+\.\d+", "", prose)
    return re.findall(r"(?<!\d)(?<!\d\.)\d+\.\d+(?!\.?\d)", prose)  # a sentence may end right after one


def test_readme_figures_are_committed_results():
    """Every figure the README quotes is a committed result's value, rounded as printed; no figure goes unchecked."""
    readme = (ROOT / "README.md").read_text()
    printed = set()
    for text, name, path, divisor in README_FIGURES:
        assert text in readme, f"the README no longer quotes {text!r}: update README_FIGURES"
        value = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
        for key in path:
            value = value[key]
        number = text.split()[0].rstrip("x")
        decimals = len(number.split(".")[1])
        assert f"{value / divisor:.{decimals}f}" == number, f"README {text!r}: {name} holds {value}"
        printed.add(number)
    unchecked = [f for f in readme_prose_decimals(readme) if f not in printed]
    assert unchecked == [], f"README figures with no committed result in README_FIGURES: {unchecked}"
