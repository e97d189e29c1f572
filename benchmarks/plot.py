"""PNG plots of the committed results: quality per method, and the learner's cost.

  python -m benchmarks.plot        # writes benchmarks/results/*.png
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.env import RESULTS  # noqa: E402


def quality(tag: str = "smollm2-2of4") -> None:
    d = json.loads((RESULTS / f"quality-{tag}.json").read_text())
    names = [n for n in d["methods"] if n != "magnitude"]
    ppl = [d["methods"][n]["wikitext2_ppl"] for n in names]
    acc = [d["methods"][n].get("zeroshot", {}).get("average", {}).get("acc_norm", float("nan")) for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    bars = a.barh(names, ppl, color=["#888" if n in ("dense", "wanda", "sparsegpt") else "#2a7" for n in names])
    a.bar_label(bars, fmt="%.1f")
    a.set_xlabel("WikiText-2 perplexity @2048 (lower is better)")
    a.invert_yaxis()
    a.set_title(f"SmolLM2-135M-Instruct ({tag}), {d['device']}")
    bars = b.barh(names, acc, color="#37a")
    b.bar_label(bars, fmt="%.3f")
    b.set_xlabel("zero-shot average acc_norm (7 tasks)")
    b.invert_yaxis()
    b.set_xlim(0.3, max(acc) + 0.03)
    fig.tight_layout()
    fig.savefig(RESULTS / f"quality-{tag}.png", dpi=110)


def learner(tag: str = "smollm2-2of4") -> None:
    d = json.loads((RESULTS / f"learner-{tag}.json").read_text())
    rows = d["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(rows)
    vals = [rows[n]["ms_per_step"] for n in names]
    bars = ax.barh(names, vals, color=["#2a7", "#7b7", "#888"][: len(names)])
    ax.bar_label(bars, fmt="%.1f ms")
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per MaskPro step, batch {d['batch'][0]}x{d['batch'][1]} ({d['device']})")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(RESULTS / f"learner-{tag}.png", dpi=110)


if __name__ == "__main__":
    quality()
    learner()
