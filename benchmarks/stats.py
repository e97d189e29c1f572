"""Summaries of repeated timings: median, percentiles and a spread flag, the same in every benchmark.

A number is only worth reporting if repeated runs agree: ``spread = (p90 - p10) / median``, and a result
whose spread exceeds ``max_spread`` (default 10%) is marked ``"trusted": false`` and warned about.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

MAX_SPREAD = 0.10


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ..., "p99": ...}``, None where there were no values."""
    return {f"p{q}": (percentile(values, q) if values else None) for q in qs}


def summarize(values: Sequence[float]) -> dict:
    """Median, p10, p90, spread and count of repeated measurements."""
    med = percentile(values, 50)
    p10, p90 = percentile(values, 10), percentile(values, 90)
    return {"median": med, "p10": p10, "p90": p90, "spread": (p90 - p10) / med if med else math.inf,
            "n": len(values)}


def trusted(*spreads: float, max_spread: float = MAX_SPREAD) -> bool:
    """Whether every measurement behind a result repeated within ``max_spread``."""
    return all(s <= max_spread for s in spreads)


def warn_untrusted(what: str, spreads: dict[str, float], max_spread: float) -> None:
    """One warning line naming the result, the widest spread and what to do about it."""
    name, worst = max(spreads.items(), key=lambda kv: kv[1])
    print(f"warning: {what}: {name} spread (p90-p10)/median is {worst:.1%} > {max_spread:.0%}; not trusted "
          f"(run on an idle machine or raise --reps)", file=sys.stderr, flush=True)
