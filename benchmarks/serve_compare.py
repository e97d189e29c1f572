"""Load tests of the same load side by side: each server's output tokens/s against a baseline's, level by level.

  maskpro-bench serve-compare --baseline serve-vllm-dense.json serve-maskpro-2of4.json serve-vllm-plugin.json \\
      --bar 1:1.4 --bar 32:1.2

The speed claim of a 2:4 server is against the dense engine people run (``vllm serve``) under the same load, so
this reads ``maskpro-bench serve`` results (one per server), refuses runs that did not send the same load (other
concurrency levels, max_tokens, ignore_eos, endpoint, prompts or requests per level), and writes
``serve-vs-<baseline tag>.json``: per candidate and concurrency level the two output tokens/s and their ratio,
TTFT and inter-token latency p50, failed requests, and each ``--bar LEVEL:RATIO`` (the candidate's tokens/s at
that level at least RATIO times the baseline's) with "no failed request" as a bar of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maskpro.errors import MaskproError

from .env import add_output_args, environment, output_path

# what must match for two runs to be the same load
SAME_LOAD = ("max_tokens", "ignore_eos", "chat", "requests_per_level", "duration_per_level_s",
             "prompts", "mixed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("candidates", nargs="+", metavar="SERVE_JSON", help="serve-<tag>.json of each server to compare")
    p.add_argument("--baseline", required=True, metavar="SERVE_JSON", help="serve-<tag>.json of the dense baseline")
    p.add_argument("--bar", action="append", default=[], metavar="LEVEL:RATIO",
                   help="candidate tokens/s at concurrency LEVEL at least RATIO x the baseline's (repeat)")
    add_output_args(p, "serve-vs-<baseline tag>.json")


def read_run(path: str) -> dict:
    """A ``maskpro-bench serve`` result, or a one-line error naming what is wrong with the file."""
    file = Path(path)
    try:
        run = json.loads(file.read_text())
    except FileNotFoundError:
        raise MaskproError(f"{path} does not exist; pass serve-<tag>.json files written by maskpro-bench serve")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MaskproError(f"{path} is not JSON ({e}); pass serve-<tag>.json files written by maskpro-bench serve")
    if not isinstance(run, dict) or not isinstance(run.get("levels"), list) or not run["levels"]:
        raise MaskproError(f"{path} holds no load levels; pass a serve-<tag>.json written by maskpro-bench serve")
    return run


def parse_bars(specs: list[str]) -> dict[int, float]:
    bars = {}
    for spec in specs:
        try:
            level, ratio = spec.split(":")
            bars[int(level)] = float(ratio)
        except ValueError:
            raise MaskproError(f"--bar takes LEVEL:RATIO, e.g. 32:1.2; got {spec!r}")
    return bars


def check_same_load(base: dict, other: dict, name: str) -> None:
    """One-line error for the first way ``other`` did not send the baseline's load."""
    levels = [lv["concurrency"] for lv in base["levels"]]
    if [lv["concurrency"] for lv in other["levels"]] != levels:
        raise MaskproError(f"{name} ran concurrency levels {[lv['concurrency'] for lv in other['levels']]}, the "
                           f"baseline {levels}; run both with the same --concurrency")
    for key in SAME_LOAD:
        if base.get(key) != other.get(key):
            raise MaskproError(f"{name} and the baseline differ in {key} ({other.get(key)!r} vs {base.get(key)!r});"
                               f" run both with the same load options")


def _failed(level: dict) -> int:
    return int(level["requests"]) - int(level["ok"])


def compare(base: dict, cand: dict, bars: dict[int, float]) -> dict:
    """Level-by-level rows of ``cand`` against ``base``, and the bars (pure)."""
    rows = []
    for b, c in zip(base["levels"], cand["levels"]):
        ours, theirs = c["output_tokens_per_s"], b["output_tokens_per_s"]
        rows.append({"concurrency": c["concurrency"], "baseline_tokens_per_s": theirs, "tokens_per_s": ours,
                     "speedup": ours / theirs if theirs else None,
                     "baseline_ttft_p50_ms": b["ttft_ms"]["p50"], "ttft_p50_ms": c["ttft_ms"]["p50"],
                     "baseline_itl_p50_ms": b["itl_ms"]["p50"], "itl_p50_ms": c["itl_ms"]["p50"],
                     "baseline_failed": _failed(b), "failed": _failed(c)})
    by_level = {r["concurrency"]: r for r in rows}
    checks = {}
    for level, need in sorted(bars.items()):
        got = by_level.get(level, {}).get("speedup")
        checks[f"tokens_per_s_x{need:g}_at_{level}"] = {"need": need, "got": got,
                                                       "pass": got is not None and got >= need}
    failed = sum(r["failed"] for r in rows)
    checks["no_failed_request"] = {"need": 0, "got": failed, "pass": failed == 0}
    return {"rows": rows, "bars": checks, "all_pass": all(c["pass"] for c in checks.values())}


def _label(run: dict, path: str) -> dict:
    return {"file": Path(path).name, "url": run.get("url"), "model": run.get("model"),
            "launched": run.get("launched") or None, "device": run.get("device")}


def run(a: argparse.Namespace) -> Path:
    bars = parse_bars(a.bar)
    base = read_run(a.baseline)
    candidates = []
    for path in a.candidates:
        cand = read_run(path)
        check_same_load(base, cand, path)
        candidates.append({**_label(cand, path), **compare(base, cand, bars)})
    tag = Path(a.baseline).stem.removeprefix("serve-")
    out = output_path(a, f"serve-vs-{tag}.json")
    env = environment()
    result = {"baseline": _label(base, a.baseline), "load": {k: base.get(k) for k in SAME_LOAD},
              "levels": [lv["concurrency"] for lv in base["levels"]], "candidates": candidates,
              "command": env["command"], "env": env}
    from maskpro.checkpoint import save_json

    save_json(result, out)
    for c in candidates:
        ratios = ", ".join(f"{r['concurrency']}: {r['speedup']:.2f}x" for r in c["rows"] if r["speedup"])
        print(f"{c['file']} vs {result['baseline']['file']}: {ratios}; bars {'met' if c['all_pass'] else 'NOT met'}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("serve-compare"))
