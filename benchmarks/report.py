"""Markdown summary of every results JSON in a folder (SUMMARY.md), and their PNG plots.

  maskpro-bench report                         # benchmarks/results/*.json -> benchmarks/results/SUMMARY.md
  maskpro-bench report --results DIR --plots all

Only what the JSON files hold is rendered: no number is computed here except unit changes and, for kernel
files written before rows carried a ``trusted`` flag, the spread from their recorded p10/p90. Each table
names the command that produced it: one per table, or one per row where rows came from different runs.
Commands recorded before ``maskpro-bench`` existed are shown as the ``python -m benchmarks.X`` call that
made them, marked with a dagger.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

from maskpro.errors import MaskproError

from . import stats
from .env import results_dir

KINDS = ("quality", "kernels", "generate", "serve", "learner", "export", "sweep")
ALIASES = {"learn": "learner"}  # learn-llama2-7b.json: the name the learner-at-scale issue asked for
TITLES = {"quality": "Quality (perplexity, zero-shot)", "kernels": "Kernels: dense vs 2:4 per shape",
          "generate": "End-to-end generation", "serve": "Serving under load", "learner": "Mask-learning cost",
          "export": "Export cost", "sweep": "MaskPro hyper-parameter sweeps"}
LEGACY = "†"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=None, help="folder of results JSON (default: benchmarks/results in a "
                                                   "source checkout, else ./maskpro-bench-results)")
    p.add_argument("--out", default=None, help="the Markdown file (default: RESULTS/SUMMARY.md)")
    p.add_argument("--plots", default="missing", choices=["missing", "all", "none"],
                   help="draw the PNG of each JSON: only where it has none, all of them, or none")


# ------------------------------------------------------------------------------------------------- reading

def kind_of(path: Path) -> str | None:
    """The benchmark that wrote a file, from its name (``kernels-h100.json`` -> ``kernels``)."""
    kind = path.stem.split("-")[0]
    kind = ALIASES.get(kind, kind)
    return kind if kind in KINDS else None


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MaskproError(f"cannot read {path}: {e}; fix or remove the file") from None


def show_command(cmd: str | None) -> str:
    """The command as Markdown code; scripts recorded before maskpro-bench become their ``python -m`` call."""
    if not cmd:
        return "(not recorded)"
    parts = shlex.split(cmd)
    if parts and parts[0].endswith(".py"):
        return f"`{shlex.join(['python', '-m', 'benchmarks.' + Path(parts[0]).stem, *parts[1:]])}` {LEGACY}"
    return f"`{cmd}`"


def kernel_rows(d: dict) -> list[dict]:
    """Rows with ``paths`` (this version) or the older triton_* fields, as one shape: dense and 2:4 timings."""
    out = []
    for r in d.get("rows", []):
        if "paths" in r:
            paths = {k: v for k, v in r["paths"].items() if "us" in v}
        else:
            paths = {"sparse24-triton": {"us": r["triton_us"], "p10_p90_us": r.get("triton_p10_p90_us"),
                                         "speedup": r.get("triton_speedup")}} if "triton_us" in r else {}
        best = r.get("best_path") or (min(paths, key=lambda p: paths[p]["us"]) if paths else None)
        trusted = r.get("trusted")
        if trusted is None:  # older files: the spread from the recorded p10/p90 of each path
            spans = [(r["dense_p10_p90_us"], r["dense_us"])] + [(v["p10_p90_us"], v["us"]) for v in paths.values()
                                                                 if v.get("p10_p90_us")]
            trusted = stats.trusted(*[(hi - lo) / med for (lo, hi), med in spans], max_spread=stats.MAX_SPREAD)
        out.append({**r, "paths_timed": paths, "best": best, "trusted": trusted})
    return out


# ---------------------------------------------------------------------------------------------- formatting

def num(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e5:
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def size(n) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return "-"


def span(pair) -> str:
    return f"{num(pair[0])}-{num(pair[1])}" if pair else "-"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines + [""]


def caption(path: Path, d: dict, extra: str = "", per_row_commands: bool = False) -> list[str]:
    """File link, device and versions, the command behind all rows (unless rows name their own), the PNG."""
    env = d.get("env", {})
    env = env if "command" in env else {}
    bits = [f"device: {d.get('device') or env.get('device', '?')}"]
    for key in ("torch", "cuda", "driver", "triton", "git_commit", "date"):
        if env.get(key):
            bits.append(f"{key}: {env[key][:12] if key == 'git_commit' else env[key]}")
    lines = [f"### [`{path.name}`]({path.name})", "", "; ".join(bits) + (f". {extra}" if extra else ""), ""]
    if env.get("command") and not per_row_commands:
        lines += [f"All rows: {show_command(env['command'])}", ""]
    png = path.with_suffix(".png")
    if png.is_file():
        lines += [f"![{path.stem}]({png.name})", ""]
    return lines


# ------------------------------------------------------------------------------------------------ sections

def quality_section(path: Path, d: dict) -> list[str]:
    envs = d.get("env", {})
    rows = []
    for name, m in d.get("methods", {}).items():
        zs = m.get("zeroshot", {}).get("average", {})
        acc = f"{num(zs.get('acc'), 3)} / {num(zs.get('acc_norm'), 3)}" if zs else "-"
        cmd = envs.get(name, {}).get("command") if "command" not in envs else None
        rows.append([name, num(m.get("wikitext2_ppl")), num(m.get("c4_ppl")), acc, num(m.get("prune_s"), 1),
                     show_command(cmd) if cmd else "see above"])
    extra = f"model: {d.get('model', '?')}; {d.get('dtype', '?')}; perplexity at {d.get('ppl_seq_len', '?')} tokens"
    if d.get("quick"):
        extra += "; **--quick settings: not comparable to full runs**"
    return caption(path, d, extra, per_row_commands=True) + table(
        ["method", "WikiText-2", "C4", "zero-shot acc / acc_norm", "prune s", "command"], rows)


def kernels_section(path: Path, d: dict) -> list[str]:
    rows, krows = [], kernel_rows(d)
    for r in krows:
        best = r["paths_timed"].get(r["best"], {})
        rows.append([r["shape"], ", ".join(r.get("layers", [])) or "-", r["tokens"], r.get("dtype", "-"),
                     f"{num(r['dense_us'])} ({span(r.get('dense_p10_p90_us'))})", r["best"] or "-",
                     f"{num(best.get('us'))} ({span(best.get('p10_p90_us'))})" if best else "-",
                     num(best.get("speedup"), 3), r.get("runtime_path", "-"), num(r.get("speedup"), 3),
                     floor_cell(r.get("read_floor_us")), num(r["trusted"])])
    untrusted = sum(not r["trusted"] for r in krows)
    extra = f"{len(rows)} rows, {untrusted} not trusted (spread above {d.get('max_spread', stats.MAX_SPREAD):.0%})"
    if d.get("device") == "cpu":
        extra += "; **CPU: a check of the harness, not a GPU result**"
    if not d.get("complete", "method" in d):
        extra += "; **the run did not finish**"
    return caption(path, d, extra) + table(
        ["shape (in x out)", "layers", "tokens", "dtype", "dense us (p10-p90)", "best 2:4 path",
         "2:4 us (p10-p90)", "2:4 speedup", "runtime picks", "runtime speedup", "read floor us 2:4 / dense",
         "trusted"], rows)


def floor_cell(floor: dict | None) -> str:
    """A decode row's read floors (streaming the compressed / dense bytes), or "-" where not measured."""
    return f"{num(floor['compressed'])} / {num(floor['dense'])}" if floor else "-"


def generate_fast_section(path: Path, d: dict) -> list[str]:
    """``generate --runtime fast``: 2:4 against vLLM dense and maskpro's compiled dense decoder per point."""
    vllm = {(r["batch"], r["prompt"]): r for r in d.get("vllm_dense", {}).get("rows", [])}
    dense = {(r["batch"], r["prompt"]): r for r in d["dense_compiled"]["rows"]}
    rows = []
    for s in d["sparse"]["rows"]:
        v, dn = vllm.get((s["batch"], s["prompt"]), {}), dense.get((s["batch"], s["prompt"]), {})
        best = min(x for x in (v.get("decode_ms"), dn.get("decode_ms"), float("inf")) if x is not None)
        rows.append([s["batch"], s["prompt"], num(v.get("decode_ms"), 3), num(dn.get("decode_ms"), 3),
                     num(s["decode_ms"], 3), num(best / s["decode_ms"], 3), num(s["roofline_fraction"], 3),
                     f"{num(v.get('ttft_ms'))} / {num(dn.get('ttft_ms'))} / {num(s['ttft_ms'])}"])
    extra = (f"model: {d.get('model', '?')}; {d.get('new_tokens', '?')} new tokens; weights "
             f"{num(d['dense_compiled']['weights_gib'])} GiB dense, {num(d['sparse']['weights_gib'])} GiB 2:4")
    return caption(path, d, extra) + table(
        ["batch", "prompt", "ms/step vLLM dense", "maskpro dense", "maskpro 2:4", "speedup vs strongest dense",
         "2:4 roofline fraction", "TTFT ms vLLM / dense / 2:4"], rows)


def generate_section(path: Path, d: dict) -> list[str]:
    if "sparse" in d and "dense_compiled" in d:
        return generate_fast_section(path, d)
    rows = []
    for r in d.get("rows") or [{"batch": d.get("batch"), "prompt_tokens": d.get("prompt_tokens"),
                                **d.get("detail", {}), "decode_speedup": d.get("decode_speedup")}]:
        dn, sp = r.get("dense", {}), r.get("sparse", {})
        if "error" in dn or "error" in sp:
            rows.append([r["batch"], r["prompt_tokens"], dn.get("error") or sp.get("error")] + ["-"] * 8)
            continue
        weights = d.get("weights_gib") or {}
        mem = (weights.get("dense"), weights.get("sparse")) if weights.get("dense") else (dn.get("peak_gib"),
                                                                                           sp.get("peak_gib"))
        mem_s = (f"{num(mem[0])} / {num(mem[1])} GiB" if mem[0] is not None else
                 f"{num(dn.get('peak_rss_mib'), 0)} / {num(sp.get('peak_rss_mib'), 0)} MiB RSS"
                 if dn.get("peak_rss_mib") else "-")
        rows.append([r["batch"], r["prompt_tokens"], f"{num(dn.get('ttft_ms'))} / {num(sp.get('ttft_ms'))}",
                     f"{num(dn.get('ms_per_token'), 3)} / {num(sp.get('ms_per_token'), 3)}",
                     f"{num(dn.get('decode_tokens_per_s'), 1)} / {num(sp.get('decode_tokens_per_s'), 1)}",
                     num(r.get("decode_speedup"), 3), num(r.get("ttft_speedup"), 3), mem_s,
                     num(r.get("decode_speedup_vs_fused"), 3), num(r.get("dense_fused", {}).get("ttft_ms")),
                     num(r.get("trusted"))])
    extra = f"model: {d.get('model', '?')}; {d.get('dtype', '?')}; {d.get('new_tokens', '?')} new tokens"
    if d.get("order") == "interleaved":
        extra += "; variants' repetitions interleaved"
    if d.get("device") == "cpu":
        extra += "; **CPU: a check of the harness**"
    return caption(path, d, extra) + table(
        ["batch", "prompt", "TTFT ms dense / 2:4", "ms per token dense / 2:4", "decode tok/s dense / 2:4",
         "decode speedup", "TTFT speedup", "GPU memory dense / 2:4 (weights, or peak)",
         "decode speedup vs fused dense", "TTFT fused dense", "trusted"], rows)


def serve_section(path: Path, d: dict) -> list[str]:
    def pct(m: dict) -> str:
        return " / ".join(num(m.get(k), 1) for k in ("p50", "p90", "p99"))

    rows = [[lv["concurrency"], f"{lv['ok']}/{lv['requests']}", lv["errors"],
             ", ".join(f"{k} {v}" for k, v in lv.get("errors_by_kind", {}).items()) or "-",
             num(lv["requests_per_s"], 3), num(lv["output_tokens_per_s"], 1), pct(lv["ttft_ms"]), pct(lv["itl_ms"]),
             pct(lv["latency_ms"])] for lv in d.get("levels", [])]
    health = d.get("server_health") or {}
    extra = (f"server: {d.get('url')} model {d.get('model')} (backend {health.get('backend', '?')}, "
             f"device {health.get('device', '?')}); {d.get('max_tokens')} tokens per request, "
             f"{'chat' if d.get('chat') else 'completions'}, prompts: {d.get('prompts', {}).get('source', '?')}")
    return caption(path, d, extra) + table(
        ["concurrency", "ok", "errors", "error kinds", "requests/s", "output tok/s", "TTFT ms p50 / p90 / p99",
         "ITL ms p50 / p90 / p99", "latency ms p50 / p90 / p99"], rows)


def _learner_row(config: str, weights, variant: str, r: dict) -> list:
    if "ms_per_step" not in r:
        return [config, num(weights), variant, r.get("skipped") or r.get("error", "-"), "-", "-"]
    mem = f"{num(r['peak_gib'])} GiB" if r.get("peak_gib") is not None else (
        f"{num(r.get('peak_rss_mib'), 0)} MiB RSS" if r.get("peak_rss_mib") else "-")
    spread, trusted = "", r.get("trusted")
    if r.get("ms_p10") is not None:
        spread = f" ({num(r['ms_p10'])}-{num(r['ms_p90'])})"
        if trusted is None:  # older files: the spread from the recorded p10/p90
            trusted = stats.trusted((r["ms_p90"] - r["ms_p10"]) / r["ms_per_step"])
    return [config, num(weights), variant, f"{num(r['ms_per_step'])}{spread}", mem, num(trusted)]


def learner_section(path: Path, d: dict) -> list[str]:
    header = ["model", "linear weights", "variant", "ms / step (p10-p90)", "peak memory", "trusted"]
    if "configs" not in d:  # one model, written before the model-size sweep
        rows = [_learner_row("-", d.get("linear_weights"), v, r) for v, r in d.get("rows", {}).items()]
        return caption(path, d, f"batch {d.get('batch')}, {d.get('dtype')}") + table(header, rows)
    rows, mem = [], []
    commands = {c.get("command") for c in d["configs"].values()}
    per_row = len(commands) > 1
    for name, c in d["configs"].items():
        cmd = [show_command(c.get("command"))] if per_row else []
        rows += [_learner_row(name, c.get("linear_weights"), v, r) + cmd for v, r in c.get("rows", {}).items()]
        mm = c.get("memory_model", {})
        mp, ml = mm.get("maskpro", {}), mm.get("maskllm", {})
        mem.append([name, num(c.get("linear_weights")),
                    f"{size(mp.get('total'))} ({num(mp.get('bytes_per_weight'), 1)} B/weight)",
                    f"{size(ml.get('total_lower_bound'))} ({num(ml.get('bytes_per_weight'), 1)} B/weight)",
                    num(mm.get("maskllm_over_maskpro"))])
    lines = caption(path, d, f"batch {d.get('batch')}, {d.get('dtype')}, {d.get('nm', '2:4')}", per_row) + table(
        header + (["command"] if per_row else []), rows)
    lines += ["Learner state, computed from the weight count (MaskLLM's assumptions: "
              + "; ".join(d.get("maskllm_assumptions", [])) + "):", ""]
    return lines + table(["model", "linear weights", "MaskPro state", "MaskLLM state (lower bound)",
                          "MaskLLM / MaskPro"], mem)


def export_section(path: Path, d: dict) -> list[str]:
    rows = [[e, r.get("exit_code"), num(r.get("wall_s")), num(r.get("peak_rss_mib"), 1),
             num(r.get("above_baseline_over_weights"), 3)] for e, r in d.get("engines", {}).items()]
    extra = (f"source: {d.get('source')} ({num(d.get('source_weight_mib'), 1)} MiB); the file merges runs, "
             "the command is the last run's")
    return caption(path, d, extra) + table(
        ["engine", "exit code", "wall s", "peak RSS MiB", "memory above baseline / weights"], rows)


def sweep_section(path: Path, d: dict) -> list[str]:
    rows = [[spec, num(r.get("wikitext2")), num(r.get("recon_wikitext2")), num(r.get("changed_fraction"), 4)]
            for spec, r in d.get("rows", {}).items()]
    extra = "config = learn_on:scale:lr:steps[:seq_len[:batch]]; the file merges runs, the command is the last run's"
    if d.get("note"):
        extra += f". Note: {d['note']}"
    return caption(path, d, extra) + table(["config", "WikiText-2", "after OBS re-fit", "mask changed"], rows)


SECTIONS: dict[str, Callable[[Path, dict], list[str]]] = {
    "quality": quality_section, "kernels": kernels_section, "generate": generate_section, "serve": serve_section,
    "learner": learner_section, "export": export_section, "sweep": sweep_section}


def render(folder: Path) -> str:
    """The Markdown for every results JSON in ``folder``."""
    files = sorted(p for p in folder.glob("*.json") if kind_of(p))
    if not files:
        raise MaskproError(f"no results JSON (quality-*, kernels-*, generate-*, serve-*, learner-*, ...) in "
                           f"{folder}; run a maskpro-bench subcommand first or pass --results DIR")
    lines = ["# Benchmark results", "",
             f"Generated by `maskpro-bench report` from the {len(files)} JSON files in this folder; do not edit "
             "by hand. Every number is copied from the JSON file named above its table, and each table names the "
             "command that produced it: rerun that command to reproduce it (on the device named). "
             f"{LEGACY} marks commands recorded before `maskpro-bench` existed; they still run from a source "
             "checkout, but their defaults may have changed since. \"trusted\" is **no** where repeated runs "
             f"spread by more than {stats.MAX_SPREAD:.0%} ((p90-p10)/median).", ""]
    for kind in KINDS:
        of_kind = [p for p in files if kind_of(p) == kind]
        if of_kind:
            lines += [f"## {TITLES[kind]}", ""]
            for p in of_kind:
                lines += SECTIONS[kind](p, load(p))
    return "\n".join(lines).rstrip() + "\n"


def run(a: argparse.Namespace) -> Path:
    folder = Path(a.results) if a.results else results_dir(None)
    if not folder.is_dir():
        raise MaskproError(f"results folder {folder} does not exist; pass --results DIR")
    if a.plots != "none":
        from .plot import plot_file

        for p in sorted(folder.glob("*.json")):
            if kind_of(p) and (a.plots == "all" or not p.with_suffix(".png").is_file()):
                plot_file(p)
    text = render(folder)
    out = Path(a.out) if a.out else folder / "SUMMARY.md"
    out.write_text(text)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("report"))
