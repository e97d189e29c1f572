"""Dense against every 2:4 path for each linear shape of a model, at decode and prefill token counts.

  maskpro-bench kernels --config llama2-7b                      # GPU: q/k/v/o, gate/up, down at 1..8192 tokens
  maskpro-bench kernels --model runs/smollm2-2of4 --dtype bf16  # the shapes of a model folder's config.json
  maskpro-bench kernels                                         # CPU: tiny shapes, a check of the harness

Shape ``KxN`` is in_features x out_features (``y = x @ W.T``, W is N x K). Every path runs on many copies of
the weights, rotated so that the compressed 2:4 bytes touched exceed 3x the L2 cache (no call finds its weights
in L2).

- GPU: each path is captured in a CUDA graph of many calls and the replay is timed with CUDA events after
  warm-up (plain CUDA events where a path cannot be captured). Paths: dense cuBLAS, maskpro's ``mma.sp``
  tensor-core kernel (1-64 tokens), Triton 2:4 kernels (best of their configs), the runtime's cuSPARSELt call
  (``sparse24-cusparselt``, past 16 tokens; row-major output) — the paths the runtime can pick — and, for
  reference, PyTorch's semi-structured 2:4 tensor (cuSPARSELt/CUTLASS, column-major output). Decode rows (up
  to 64 tokens) also hold ``read_floor_us``: the time of a kernel that only streams the compressed (and the dense) bytes, the floor
  any decode kernel of that shape is bounded by.
- CPU: ``time.perf_counter`` over the same rotation. Paths: dense torch and the 2:4 reference (decompress,
  then matmul, which is what ``maskpro.serve.sparse24`` does without a GPU). The numbers only check the
  harness; they say nothing about GPUs.

Each row holds the median and p10/p90 of ``--reps`` repetitions for dense and every sparse path, all measured
in this process, and ``trusted: false`` where (p90-p10)/median exceeds ``--max-spread``. ``speedup`` is
dense over the runtime's pick (GPU), ``best_speedup`` dense over the fastest 2:4 path.
Writes ``kernels-<tag>.json`` (after every row, so a cut-off run keeps what it measured) and a PNG.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from maskpro.errors import MaskproError
from maskpro.serve import sparse24, sparse_gemm, sparse_mma, sparse_ops
from maskpro.serve.sparse_linear import candidates, cusparselt_linear, semi_structured

from . import configs, stats
from .env import add_output_args, device_tag, environment, fill_defaults, merge_json, output_path

GPU = {"tokens": [1, 4, 16, 64, 256, 512, 2048, 8192], "dtype": "fp16", "reps": 30, "config": "llama2-7b"}
CPU = {"tokens": [1, 4, 16, 64], "dtype": "fp32", "reps": 20, "config": "tiny"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MAX_COPIES_CPU = 64
COMPRESSED_FRACTION = 0.5625  # 2:4 values plus 2-bit positions, over the dense bytes
# the paths maskpro.serve.sparse_linear chooses from; PyTorch's semi-structured tensor is timed for reference
RUNTIME_PATHS = ("sparse24-mma", "sparse24-gemm", "sparse24-triton", "sparse24-cusparselt")
METHOD = ("Each path runs over weight copies rotated so that even the compressed 2:4 bytes exceed 3x L2; GPU: "
          "CUDA-graph replay timed with CUDA events after warm-up; CPU: perf_counter. Median and p10/p90 of --reps "
          "repetitions, dense and 2:4 in one process.")


def positive_int(text: str) -> int:
    """argparse type for token counts and repetitions: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help=f"model whose linear shapes to time: {', '.join(configs.CONFIGS)} or NAME:LAYERS "
                        f"(default: {GPU['config']} on GPU, {CPU['config']} on CPU)")
    p.add_argument("--model", default=None, help="read the shapes from this model folder's config.json instead")
    p.add_argument("--shapes", nargs="+", default=None, metavar="KxN",
                   help="in x out shapes to time; with --config/--model only these of its shapes (to split a run)")
    p.add_argument("--tokens", nargs="+", type=positive_int, default=None,
                   help=f"token counts (default GPU: {' '.join(map(str, GPU['tokens']))}; "
                        f"CPU: {' '.join(map(str, CPU['tokens']))})")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--reps", type=positive_int, default=None, help="timed repetitions per path (default 30 GPU, "
                                                                    "20 CPU)")
    p.add_argument("--paths", nargs="+", default=None,
                   choices=["mma", "gemm", "triton", "cusparselt", "semi-structured", "reference"],
                   help="2:4 paths to time (default GPU: mma gemm triton cusparselt semi-structured; CPU: "
                        "reference)")
    p.add_argument("--max-spread", type=float, default=stats.MAX_SPREAD,
                   help="flag a row as not trusted when (p90-p10)/median of any path exceeds this")
    p.add_argument("--tag", default=None, help="results name kernels-<tag>.json (default: the device, e.g. h100)")
    add_output_args(p, "kernels-<tag>.json")


def parse_shapes(a: argparse.Namespace, explicit_config: bool) -> tuple[str, dict[str, list[str]]]:
    """(source, {"KxN": [layer names]}): a config's shapes, only those in --shapes if both are given."""
    wanted = {}
    for s in a.shapes or []:
        k, sep, n = s.lower().partition("x")
        if not (sep and k.isdigit() and n.isdigit() and int(k) > 0 and int(n) > 0):
            raise MaskproError(f"bad shape {s!r}; write in_features x out_features, e.g. 4096x11008")
        wanted[f"{int(k)}x{int(n)}"] = []
    if wanted and not explicit_config:
        return "--shapes", wanted
    shape = configs.resolve(a.model or a.config)
    found = shape.linear_shapes()
    if not wanted:
        return shape.name, found
    missing = [s for s in wanted if s not in found]
    if missing:
        raise MaskproError(f"{shape.name} has no {missing[0]} linear; its shapes are {', '.join(found)}")
    return shape.name, {s: found[s] for s in wanted}


def l2_bytes(cuda: bool) -> int:
    if cuda:
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        return int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
    except (OSError, ValueError):
        return 2 * 2**20


def make_weights(k: int, n: int, copies: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """``copies`` random weights (N x K), each magnitude-pruned 2:4 along K."""
    from maskpro.nm import NM, topn_mask

    out = []
    for _ in range(copies):
        w = torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k)
        out.append(w * topn_mask(w.abs(), NM(2, 4)))
    return out


def graph_times_us(calls, reps: int) -> list[float]:
    """Microseconds per call of a list of closures replayed as one CUDA graph, ``reps`` times."""
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
    return event_times_us([g.replay], reps, per_call=len(calls))


def event_times_us(calls, reps: int, per_call: int | None = None) -> list[float]:
    """Microseconds per call, CUDA events around each pass over ``calls`` after 3 warm-up passes."""
    for _ in range(3):
        for c in calls:
            c()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for c in calls:
            c()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / (per_call or len(calls)))
    return times


def cpu_times_us(calls, reps: int) -> list[float]:
    """Microseconds per call, ``time.perf_counter`` around each pass over ``calls`` after one warm-up pass."""
    for c in calls:
        c()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for c in calls:
            c()
        times.append((time.perf_counter() - t0) * 1e6 / len(calls))
    return times


def time_path(calls, reps: int, cuda: bool) -> tuple[list[float], str]:
    """(per-call times, how they were taken): CUDA graph, else CUDA events; perf_counter on CPU."""
    if not cuda:
        return cpu_times_us(calls, reps), "perf_counter"
    try:
        return graph_times_us(calls, reps), "cuda-graph"
    except RuntimeError as e:  # a path that cannot be captured (allocations, host syncs) is timed eagerly
        print(f"graph capture failed ({str(e).splitlines()[0][:120]}); timing with CUDA events", flush=True)
        torch.cuda.synchronize()
        return event_times_us(calls, reps), "cuda-events"


READ_FLOOR_SRC = r"""
extern "C" __global__ void read_floor(const uint4* __restrict__ p, int n16, unsigned* out) {
  unsigned acc = 0;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += gridDim.x * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;  // a store the compiler cannot prove dead keeps every load
}
"""


@functools.cache
def _read_floor_kernel():
    return sparse_mma.compile_kernel(READ_FLOOR_SRC, "read_floor")


def read_floor_us(nbytes: int, copies: int, reps: int) -> float:
    """Median microseconds of a kernel that only streams ``nbytes`` (rotating over ``copies`` buffers, in a CUDA
    graph, like the paths): what any kernel that reads those bytes needs, launch included. Fastest of 3 grids."""
    kernel = _read_floor_kernel()  # compiled once per process, not twice per shape
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(copies)]
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best = math.inf
    for blocks in (4 * sms, 8 * sms, 16 * sms):
        calls = [lambda b=b, g=blocks: kernel(grid=(g, 1, 1), block=(256, 1, 1), args=[b, b.numel() // 16, sink])
                 for b in bufs]
        best = min(best, stats.summarize(graph_times_us(calls * 2, reps))["median"])
    return round(best, 3)


def _summary(times: list[float]) -> dict:
    s = stats.summarize(times)
    return {"us": round(s["median"], 3), "p10_p90_us": [round(s["p10"], 3), round(s["p90"], 3)],
            "spread": round(s["spread"], 4)}


def sparse_paths(names: list[str], ws: list[torch.Tensor], comp, xs, n: int, k: int, t: int, lay=None):
    """Yield (path name, closures, extra row fields) for each 2:4 path that can run this shape."""
    if "mma" in names and lay:
        for cfg in sparse_mma.candidates(n, k, t):  # none past 64 tokens, where prefill is compute-bound
            yield "sparse24-mma", [lambda L=L, x=xs[i % 2], c=cfg: sparse_mma.sparse_mma_mm(x, *L, n, c)
                                   for i, L in enumerate(lay)], {"config": vars(cfg)}
    if "gemm" in names and lay and sparse_ops.MEDIUM_TOKENS <= t <= sparse_mma.MAX_TOKENS:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for cfg in sparse_gemm.medium_candidates(n, k, t, sms):
            yield "sparse24-gemm", [lambda L=L, x=xs[i % 2], c=cfg: sparse_gemm.sparse_gemm(x, *L, n, c)
                                    for i, L in enumerate(lay)], {"config": vars(cfg)}
    if "reference" in names:
        yield "sparse24-reference", [lambda v=v, m=m, x=xs[i % 2]: x @ sparse24.decompress_24(v, m).T
                                     for i, (v, m) in enumerate(comp)], {}
    if "triton" in names:
        if not candidates(n, k, t):
            yield "sparse24-triton", None, {"error": "no Triton kernel config fits this shape (or no Triton)"}
        for cfg in candidates(n, k, t):
            yield "sparse24-triton", [lambda v=v, m=m, x=xs[i % 2], c=cfg: sparse24.sparse24_mm(x, v, m, *c.args())
                                      for i, (v, m) in enumerate(comp)], {"config": vars(cfg)}
    if "cusparselt" in names and t > sparse_mma.MAX_TOKENS:  # the runtime never runs it at decode sizes
        packed = [semi_structured(w) for w in ws]
        if any(pk is None for pk in packed):
            yield "sparse24-cusparselt", None, {"error": "no cuSPARSELt for this GPU, build or shape"}
        else:
            yield "sparse24-cusparselt", [lambda pk=pk, x=xs[i % 2]: cusparselt_linear(x, pk)
                                          for i, pk in enumerate(packed)], {}
    if "semi-structured" in names:
        try:
            sp = [torch.sparse.to_sparse_semi_structured(w) for w in ws]
        except (RuntimeError, ValueError, NotImplementedError) as e:
            yield "torch-semi-structured", None, {"error": str(e).splitlines()[0][:200]}
        else:
            yield "torch-semi-structured", [lambda w=w, x=xs[i % 2]: torch.nn.functional.linear(x, w)
                                            for i, w in enumerate(sp)], {}


def measure_shape(shape: str, layers: list[str], tokens: list[int], a: argparse.Namespace, device: str,
                  dtype: torch.dtype, write) -> None:
    """Time dense and every 2:4 path of one shape at each token count; ``write(row)`` after every row."""
    cuda = device == "cuda"
    k, n = (int(v) for v in shape.split("x"))
    if k % 8:
        print(f"{shape}: in_features {k} is not a multiple of 8, which the 2:4 format needs; skipped", flush=True)
        return
    l2 = l2_bytes(cuda)
    # enough copies that even the compressed weights (56% of the bytes) exceed 3x L2: no path finds its weights there
    copies = max(2, math.ceil(3 * l2 / (n * k * dtype.itemsize * COMPRESSED_FRACTION)))
    if not cuda:
        copies = min(copies, MAX_COPIES_CPU)
    ws = make_weights(k, n, copies, dtype, device)
    comp = [sparse24.compress_24(w) for w in ws]
    lay = ([sparse_mma.mma_layout(v, m) for v, m in comp]
           if {"mma", "gemm"} & set(a.paths) and sparse_mma.available() and sparse_mma.mma_ok(n, k) else None)
    floor = None  # how close decode gets to streaming its bytes: dense and compressed read floors
    if sparse_mma.available() and dtype.itemsize == 2 and min(tokens) <= sparse_mma.MAX_TOKENS:
        dense_bytes = n * k * dtype.itemsize
        floor = {"compressed": read_floor_us(int(dense_bytes * COMPRESSED_FRACTION), copies, a.reps),
                 "dense": read_floor_us(dense_bytes, copies, a.reps)}
    for t in tokens:
        xs = [torch.randn(t, k, device=device, dtype=dtype) for _ in range(2)]
        dense_calls = [lambda w=w, x=xs[i % 2]: torch.nn.functional.linear(x, w) for i, w in enumerate(ws)]
        times, how = time_path(dense_calls * 2 if cuda else dense_calls, a.reps, cuda)
        dense = _summary(times)
        paths: dict[str, dict] = {}
        y_dense = dense_calls[0]().float()
        for name, calls, extra in sparse_paths(a.paths, ws, comp, xs, n, k, t, lay):
            if calls is None:
                paths.setdefault(name, extra)
                continue
            try:
                timing = _summary(time_path(calls * 2 if cuda else calls, a.reps, cuda)[0])
                error = float((calls[0]().float() - y_dense).abs().max() / y_dense.abs().max().clamp_min(1e-30))
            except Exception as e:  # noqa: BLE001 - a config the compiler or library rejects is skipped
                print(f"{shape} @ {t}: {name} {extra.get('config', '')} failed: {type(e).__name__}: "
                      f"{str(e)[:120]}", flush=True)
                paths.setdefault(name, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                continue
            if "us" not in paths.get(name, {}) or timing["us"] < paths[name]["us"]:
                paths[name] = {**timing, **extra, "speedup": round(dense["us"] / timing["us"], 3),
                               "max_rel_error": error}
        row = {"shape": shape, "layers": layers, "tokens": t, "dtype": str(dtype).removeprefix("torch."),
               "dense_us": dense["us"], "dense_p10_p90_us": dense["p10_p90_us"], "paths": paths,
               "timing": how, "weight_copies": copies,
               "rotating_mib": round(copies * n * k * dtype.itemsize / 2**20, 1), "l2_mib": round(l2 / 2**20, 1)}
        if floor and t <= sparse_mma.MAX_TOKENS:
            row["read_floor_us"] = floor
        timed = {p: d for p, d in paths.items() if "us" in d}
        if timed:
            best = min(timed, key=lambda p: timed[p]["us"])
            row.update(best_path=best, best_us=timed[best]["us"], best_speedup=timed[best]["speedup"])
        runtime = {p: d["us"] for p, d in timed.items() if p in RUNTIME_PATHS}
        if cuda and runtime:  # what maskpro's runtime picks between: its kernel, cuSPARSELt, or dense
            pick = min({**runtime, "dense": dense["us"]}.items(), key=lambda kv: kv[1])
            row.update(runtime_path=pick[0], sparse_us=pick[1], speedup=round(dense["us"] / pick[1], 3))
        spreads = {"dense": dense["spread"], **{p: d["spread"] for p, d in timed.items()}}
        row["spread"] = round(max(spreads.values()), 4)
        row["trusted"] = stats.trusted(*spreads.values(), max_spread=a.max_spread)
        if not row["trusted"]:
            stats.warn_untrusted(f"{shape} @ {t} tokens", spreads, a.max_spread)
        print({k2: v for k2, v in row.items() if k2 not in ("paths", "layers")}, flush=True)
        write(row)
    del ws, comp, lay
    if cuda:
        torch.cuda.empty_cache()


def run(a: argparse.Namespace) -> Path:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    explicit_config = bool(a.config or a.model)
    fill_defaults(a, GPU if cuda else CPU)
    fill_defaults(a, {"paths": ["mma", "gemm", "triton", "cusparselt", "semi-structured"] if cuda else ["reference"]})
    if not cuda and a.paths != ["reference"]:
        raise MaskproError(f"--paths {' '.join(a.paths)} need a CUDA GPU; on CPU only 'reference' runs")
    source, shapes = parse_shapes(a, explicit_config)
    dtype = DTYPES[a.dtype]
    out = output_path(a, f"kernels-{a.tag or device_tag()}.json")
    if out.is_file():
        out.unlink()  # one run per file; rows are written as they come, so a cut-off run keeps what it measured
    env = environment()
    rows: list[dict] = []

    def write(row: dict) -> None:
        rows.append(row)
        merge_json(out, {"device": env["device"], "source": source, "max_spread": a.max_spread,
                         "untrusted_rows": sum(not r["trusted"] for r in rows), "env": env, "rows": rows})

    torch.manual_seed(0)
    for shape, layers in tqdm(shapes.items(), desc="kernels", unit="shape", disable=None):
        measure_shape(shape, layers, a.tokens, a, device, dtype, write)
    if not rows:
        raise MaskproError(f"no shape of {source} could be timed (in_features must be a multiple of 8)")
    merge_json(out, {"method": METHOD, "complete": True})
    untrusted = sum(not r["trusted"] for r in rows)
    if untrusted:
        print(f"warning: {untrusted} of {len(rows)} rows are not trusted (spread > {a.max_spread:.0%})",
              file=sys.stderr)
    from .plot import publish

    return publish(out)


if __name__ == "__main__":
    from .cli import main_for

    sys.exit(main_for("kernels"))
