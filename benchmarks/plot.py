"""PNG plots of results JSON: quality per method, speedup vs tokens per shape, generation, latency vs
concurrency, learner cost. Each benchmark draws its own after writing its JSON; ``maskpro-bench report
--plots all`` redraws every one. Without matplotlib (``pip install maskpro[plot]``) plotting is skipped.

  python -m benchmarks.plot        # redraws the committed SmolLM2 quality and learner plots
"""

from __future__ import annotations

import json
from pathlib import Path

from .env import RESULTS
from .report import kernel_rows, kind_of

_warned = False


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (one message per process) when it is not installed."""
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            print("matplotlib is not installed: no PNG plots (pip install 'maskpro[plot]')")
            _warned = True
        return None
    return plt


def quality(d: dict, plt, title: str):
    names = [n for n in d["methods"] if n != "magnitude"] or list(d["methods"])
    ppl = [d["methods"][n]["wikitext2_ppl"] for n in names]
    acc = [d["methods"][n].get("zeroshot", {}).get("average", {}).get("acc_norm", float("nan")) for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 1.6 + 0.45 * len(names)))
    bars = a.barh(names, ppl, color=["#888" if n in ("dense", "wanda", "sparsegpt") else "#2a7" for n in names])
    a.bar_label(bars, fmt="%.1f")
    a.set_xlabel(f"WikiText-2 perplexity @{d.get('ppl_seq_len', '?')} (lower is better)")
    a.invert_yaxis()
    a.set_title(title)
    bars = b.barh(names, acc, color="#37a")
    b.bar_label(bars, fmt="%.3f")
    b.set_xlabel("zero-shot average acc_norm")
    b.invert_yaxis()
    finite = [v for v in acc if v == v]
    if finite:
        b.set_xlim(max(0.0, min(finite) - 0.1), max(finite) + 0.03)
    return fig


def learner(d: dict, plt, title: str):
    if "configs" not in d:  # one model, written before the model-size sweep
        rows = d["rows"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = list(rows)
        bars = ax.barh(names, [rows[n]["ms_per_step"] for n in names], color=["#2a7", "#7b7", "#888"][: len(names)])
        ax.bar_label(bars, fmt="%.1f ms")
        ax.set_xscale("log")
        ax.set_xlabel(f"ms per MaskPro step, batch {d['batch'][0]}x{d['batch'][1]} ({d['device']})")
        ax.invert_yaxis()
        return fig
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    configs = d["configs"]
    variants = sorted({v for c in configs.values() for v, r in c["rows"].items() if "ms_per_step" in r})
    for v in variants:
        pts = sorted((c["linear_weights"], c["rows"][v]["ms_per_step"]) for c in configs.values()
                     if "ms_per_step" in c["rows"].get(v, {}))
        a.plot(*zip(*pts), marker="o", label=v)
    a.set(xscale="log", yscale="log", xlabel="linear weights", ylabel="ms per step", title=title)
    a.legend()
    ws = sorted((c["linear_weights"], c["memory_model"]) for c in configs.values())
    x = [w for w, _ in ws]
    b.plot(x, [m["maskpro"]["total"] / 2**30 for _, m in ws], marker="o", label="MaskPro state (computed)")
    b.plot(x, [m["maskllm"]["total_lower_bound"] / 2**30 for _, m in ws], marker="s",
           label="MaskLLM state, lower bound (computed)")
    peaks = sorted((c["linear_weights"], r["peak_gib"]) for c in configs.values() for v, r in c["rows"].items()
                   if v == "maskpro" and r.get("peak_gib") is not None)
    if peaks:
        b.plot(*zip(*peaks), marker="^", linestyle="--", label="MaskPro measured peak")
    b.set(xscale="log", yscale="log", xlabel="linear weights", ylabel="GiB", title="learner memory")
    b.legend()
    return fig


def kernels(d: dict, plt, title: str):
    rows = [r for r in kernel_rows(d) if r["best"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = [(r["tokens"], r["paths_timed"][r["best"]]["us"], r) for r in rows if r["shape"] == shape]
        xs = [t for t, _, _ in pts]
        ys = [r["dense_us"] / us for _, us, r in pts]
        line, = ax.plot(xs, ys, marker="o", label=f"{shape} ({', '.join(pts[0][2].get('layers', [])) or 'best 2:4'})")
        bad = [(x, y) for (x, y, (_, _, r)) in zip(xs, ys, pts) if not r["trusted"]]
        if bad:
            ax.scatter(*zip(*bad), s=120, facecolors="none", edgecolors="red", zorder=3)
    ax.axhline(1.0, color="#444", linewidth=0.8)
    _ticks(ax, sorted({r["tokens"] for r in rows}))
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="speedup: dense time / fastest 2:4 path time",
           title=title)
    ax.legend(fontsize=8, title="red circle: spread too wide", title_fontsize=8)
    return fig


def generate_fast(d: dict, plt, title: str):
    """Decode step and TTFT per (batch, prompt): vLLM dense, maskpro dense and 2:4 (fast runtime), roofline."""
    sparse = d["sparse"]["rows"]
    dense_at = {(r["batch"], r["prompt"]): r for r in d["dense_compiled"]["rows"]}
    dense = [dense_at.get((r["batch"], r["prompt"]), {}) for r in sparse]
    vllm = {(r["batch"], r["prompt"]): r for r in d.get("vllm_dense", {}).get("rows", [])}
    labels = [f"{r['batch']}x{r['prompt']}" for r in sparse]
    x = range(len(sparse))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    series = [("vLLM dense", [vllm.get((r["batch"], r["prompt"]), {}) for r in sparse], "#888"),
              ("maskpro dense", dense, "#37a"), ("maskpro 2:4", sparse, "#2a7")]
    width = 0.8 / len(series)
    for i, (name, rows, color) in enumerate(series):
        xs = [j + (i - 1) * width for j in x]
        a.bar(xs, [r.get("decode_ms", float("nan")) for r in rows], width, label=name, color=color)
        b.bar(xs, [r.get("ttft_ms", float("nan")) for r in rows], width, label=name, color=color)
    a.scatter([j + width for j in x], [r["roofline_ms"] for r in sparse], marker="_", s=300, color="k", zorder=3,
              label="2:4 roofline (bytes / copy bandwidth)")
    a.set(xticks=list(x), xticklabels=labels, xlabel="batch x prompt tokens", ylabel="ms per decode step",
          title=title)
    b.set(xticks=list(x), xticklabels=labels, xlabel="batch x prompt tokens", ylabel="time to first token, ms",
          title="prefill", yscale="log")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    return fig


def generate(d: dict, plt, title: str):
    if "sparse" in d and "dense_compiled" in d:   # maskpro-bench generate --runtime fast
        return generate_fast(d, plt, title)
    rows = [r for r in d.get("rows", []) if "error" not in r["dense"] and "error" not in r["sparse"]]
    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for prompt in dict.fromkeys(r["prompt_tokens"] for r in rows):
        sel = [r for r in rows if r["prompt_tokens"] == prompt]
        bs = [r["batch"] for r in sel]
        for path, style in (("dense", "--"), ("sparse", "-")):
            label = f"{path}, prompt {prompt}"
            a.plot(bs, [r[path]["decode_tokens_per_s"] for r in sel], style, marker="o", label=label)
            b.plot(bs, [r[path]["ttft_ms"] for r in sel], style, marker="o", label=label)
    a.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s", title=title)
    b.set(xscale="log", yscale="log", xlabel="batch size", ylabel="time to first token, ms", title="prefill")
    for ax in (a, b):
        _ticks(ax, sorted({r["batch"] for r in rows}))
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    return fig


def _ticks(ax, values) -> None:
    """Label a log axis at exactly the values measured (concurrency levels, batch sizes)."""
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()


def serve(d: dict, plt, title: str):
    levels = [lv for lv in d["levels"] if lv["ok"]]
    if not levels:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    c = [lv["concurrency"] for lv in levels]
    for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL")):
        for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            a.plot(c, [lv[key][q] for lv in levels], style, marker="o", label=f"{label} {q}")
    a.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title=title)
    a.legend(fontsize=8)
    lines = b.plot(c, [lv["requests_per_s"] for lv in levels], marker="o", label="requests/s")
    b2 = b.twinx()
    lines += b2.plot(c, [lv["output_tokens_per_s"] for lv in levels], ":", marker="s", color="#a52",
                     label="output tokens/s (right)")
    b.set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title="throughput")
    b2.set_ylabel("output tokens/s")
    b.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
    for ax in (a, b):
        _ticks(ax, c)
    return fig


DRAW = {"quality": quality, "learner": learner, "kernels": kernels, "generate": generate, "serve": serve}


def publish(path: Path) -> Path:
    """Draw the PNG of a results file just written and say where it is (how every benchmark ends)."""
    plot_file(path)
    print(f"wrote {path}")
    return path


def plot_file(path: Path, png: Path | None = None) -> Path | None:
    """Draw the PNG of one results JSON next to it (or at ``png``); None if there is nothing to draw."""
    kind = kind_of(path)
    if kind not in DRAW:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    d = json.loads(path.read_text())
    png = png or path.with_suffix(".png")
    try:
        fig = DRAW[kind](d, plt, f"{path.stem} ({d.get('device', '?')})")
        if fig is None:
            print(f"{path.name}: nothing measured to plot")
            return None
        fig.tight_layout()
        fig.savefig(png, dpi=110)
    except (KeyError, TypeError, ValueError) as e:  # a plot must never cost the measured JSON
        print(f"{path.name}: no PNG ({type(e).__name__}: {e})")
        return None
    finally:
        plt.close("all")
    return png


if __name__ == "__main__":
    for name in ("quality-smollm2-2of4.json", "learner-smollm2-2of4.json"):
        plot_file(RESULTS / name)
