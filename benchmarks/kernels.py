"""2:4 linear layers against dense cuBLAS at Llama-2-7B shapes, decode and prefill token counts.

  python -m benchmarks.kernels [--shapes 4096x4096 4096x11008 11008x4096] [--tokens 1 4 16 512 ...]

Shape ``KxN`` is in_features x out_features (``y = x @ W.T``, W is N x K). Every path is captured in a CUDA
graph of many calls, each on a different copy of the weights (more bytes than 3x the L2 cache), so no call
finds its weights in L2 and launch overhead is out of the picture; the graph replay is timed with CUDA
events after warm-up, median of ``--reps`` replays, dense and sparse in the same process. ``sparse_us`` is what
the runtime runs for that token count: the faster of maskpro's Triton 2:4 kernel (best config) and dense.
Writes ``results/kernels-<tag>.json`` (rows: shape, tokens, dtype, dense_us, sparse_us, speedup, ...).
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks.env import RESULTS, environment, merge_json
from maskpro.serve import sparse24
from maskpro.serve.sparse_linear import candidates

L2_BYTES = 50 * 2**20


def graph_time_us(calls, reps: int) -> tuple[float, float, float]:
    """(median, p10, p90) microseconds per call of a list of closures, replayed as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm-up (compiles Triton, initialises cuBLAS) outside the capture
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(calls))
    t = torch.tensor(times)
    return float(t.median()), float(t.quantile(0.1)), float(t.quantile(0.9))


def make_weights(k: int, n: int, copies: int, dtype) -> list[torch.Tensor]:
    out = []
    for i in range(copies):
        w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
        keep = torch.topk(w.reshape(n, k // 4, 4).abs(), 2, dim=-1).indices
        mask = torch.zeros(n, k // 4, 4, device="cuda", dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
        out.append(w * mask)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008", "11008x4096"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--tag", default="h100")
    a = p.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    rows: list[dict] = []
    out = RESULTS / f"kernels-{a.tag}.json"
    if out.is_file():
        out.unlink()  # one run per file; rows are written as they come, so a cut-off run keeps what it measured
    for shape in a.shapes:
        k, n = (int(v) for v in shape.split("x"))
        copies = max(2, math.ceil(3 * L2_BYTES / (n * k * 2)))
        ws = make_weights(k, n, copies, dtype)
        comp = [sparse24.compress_24(w) for w in ws]
        for t in a.tokens:
            xs = [torch.randn(t, k, device="cuda", dtype=dtype) for _ in range(2)]
            dense = [lambda w=w, x=xs[i % 2]: torch.nn.functional.linear(x, w) for i, w in enumerate(ws)]
            d_med, d_p10, d_p90 = graph_time_us(dense * 2, a.reps)
            best = None
            for cfg in candidates(n, k, t):
                calls = [lambda v=v, m=m, x=xs[i % 2], c=cfg: sparse24.sparse24_mm(x, v, m, *c.args())
                         for i, (v, m) in enumerate(comp)]
                try:
                    timing = graph_time_us(calls * 2, a.reps)
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects is skipped
                    print(f"config {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
                    continue
                if best is None or timing[0] < best[0][0]:
                    best = (timing, cfg)
            y_d = torch.nn.functional.linear(xs[0], ws[0]).float()
            if best is None:
                raise SystemExit(f"no Triton config compiled for {shape}; see the messages above")
            c = best[1]
            y_s = sparse24.sparse24_mm(xs[0], *comp[0], *c.args()).float()
            rel = float((y_s - y_d).abs().max() / y_d.abs().max())
            kern = best[0][0]
            runtime = min(kern, d_med)
            row = {"shape": shape, "tokens": t, "dtype": a.dtype, "dense_us": round(d_med, 2),
                   "sparse_us": round(runtime, 2), "speedup": round(d_med / runtime, 3),
                   "runtime_path": "sparse24-triton" if kern < d_med else "dense",
                   "triton_us": round(kern, 2), "triton_speedup": round(d_med / kern, 3),
                   "triton_config": vars(c), "dense_p10_p90_us": [round(d_p10, 2), round(d_p90, 2)],
                   "triton_p10_p90_us": [round(best[0][1], 2), round(best[0][2], 2)],
                   "max_rel_error": rel, "weight_copies": copies}
            print(row, flush=True)
            rows.append(row)
            merge_json(out, {"device": environment()["device"], "env": environment(), "rows": rows})
        del ws, comp
        torch.cuda.empty_cache()
    merge_json(out, {"method": __doc__.split("\n\n")[1].replace("\n", " "), "complete": True})


if __name__ == "__main__":
    main()
