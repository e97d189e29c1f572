"""2:4 weights on the sparse tensor cores: a CUDA kernel around ``mma.sp`` (m16n8k32), compiled with NVRTC.

Why: decode is memory-bound, so a 2:4 layer can only win by reading fewer bytes (56% of dense), and at 4-64
tokens the Triton kernels lose that gain again expanding the weights in registers. ``mma.sp`` takes the
compressed values and their 2-bit positions as they are, so nothing is expanded.

The weights are stored once, off line, in the exact per-lane order of the instruction's fragments
(:func:`mma_layout`): one 16-byte load per lane per 16x32 tile of values and one per four tiles of positions,
all coalesced. A block owns ``rows`` tiles of 16 output rows; its ``warps`` split K and add up through shared
memory. Tokens are the instruction's N side (8 per MMA), so 1-64 tokens are one to eight MMAs per tile.

Two things bring it near the read floor, a kernel that only streams the same bytes (docs/kernels.md): the
weights are read with ``ld.global.nc.L1::no_allocate`` (used once, they do not evict the inputs, which every
block reads through L1), and small blocks of 4-8 warps with ``__launch_bounds__`` minimum-blocks hints that
keep 2-3 blocks resident per SM, each with its whole share of loads in flight (a 16-warp block's registers
leave room for only one per SM).

Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k32" with sparse A, f16/bf16, selector 0), with
``g = lane // 4`` and ``t = lane % 4``:
- A (16x16 kept values of a 16x32 tile): regs hold rows (g, g+8, g, g+8) at kept columns (2t, 2t, 2t+8, 2t+8)
  and the next one, i.e. group t and group t+4 of the tile's 8 groups of 4.
- positions: lanes with t in (0, 1) hold a 32-bit word, low half row g and high half row g+8, of the tile's
  groups 4t..4t+3, 4 bits per group (first position, then second).
- B (32x8 inputs): reg i holds token g at k = 2t + 8i and the next one. C: rows (g, g, g+8, g+8), token 2t, 2t+1.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from functools import cache

import torch

from .sparse24 import group_nibbles

log = logging.getLogger(__name__)

MAX_TOKENS = 64  # eight 8-token MMAs per tile; past that prefill is compute-bound and cuBLAS/cuSPARSELt win


@dataclass(frozen=True)
class MmaConfig:
    rows: int = 1   # tiles of 16 output rows per block (each input load is shared by them)
    warps: int = 8  # warps per block, splitting K
    split: int = 1  # blocks per row tile, splitting K further (the last one to finish adds up)
    unroll: int = 2
    min_blocks: int = 1  # blocks per SM the compiler must leave registers for (``__launch_bounds__``)


# Configs worth timing, each one NVRTC compile per token tile count. One of the first three is near the fastest
# for every Llama-2-7B decode shape at 1-16 tokens (docs/kernels.md); the others are for 32-64 tokens, or split
# K for layers with few output rows (SmolLM2's 192-576).
MMA_CANDIDATES = [MmaConfig(1, 8, unroll=4, min_blocks=2), MmaConfig(1, 4, unroll=8, min_blocks=3),
                  MmaConfig(2, 4, min_blocks=3), MmaConfig(1, 8, split=2, unroll=4, min_blocks=2),
                  MmaConfig(1, 4, split=4, unroll=4, min_blocks=4),
                  MmaConfig(1, 16), MmaConfig(1, 32), MmaConfig(2, 8), MmaConfig(2, 16), MmaConfig(2, 32),
                  MmaConfig(2, 16, unroll=4), MmaConfig(4, 8), MmaConfig(4, 8, split=2)]


def mma_ok(n: int, k: int, cfg: MmaConfig = MmaConfig()) -> bool:
    """Whether the kernel covers an (out n, in k) layer: whole 16-row tiles per block and 128-wide K groups."""
    return n % (16 * cfg.rows) == 0 and k % 128 == 0


def candidates(n: int, k: int, tokens: int) -> list[MmaConfig]:
    """The configs that can run an (out n, in k) layer on ``tokens`` tokens here (none without the kernel)."""
    if tokens > MAX_TOKENS or not available():
        return []
    return [c for c in MMA_CANDIDATES if mma_ok(n, k, c)]


def mma_layout(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fragment-ordered copy of ``compress_24``'s (values, meta) for an (N, K) weight.

    Returns ``tiles`` (N/16, K/32, 32 lanes, 4) int32 (each int32 two 16-bit values) and ``positions``
    (N/16, K/128, 16 lanes, 4) int32 (each int32 one tile's position word for one lane, four tiles per lane).
    """
    n, k = values.shape[0], values.shape[1] * 2
    if n % 16 or k % 128:
        raise ValueError(f"the mma.sp layout needs out % 16 == 0 and in % 128 == 0, got {n}x{k}")
    kt = k // 32
    pairs = values.contiguous().view(torch.int32)                       # (n, k/4): one group's two values
    nib = group_nibbles(meta)
    # hardware group 2i + h of a tile takes group 4h + i, so a lane's inputs are 32 contiguous bytes
    i = torch.arange(8, device=values.device)   # built on the device: no host copy, so capturable in a graph
    order = (i % 2) * 4 + i // 2                  # 0 4 1 5 2 6 3 7
    pairs = pairs.reshape(n, kt, 8)[:, :, order].reshape(n, k // 4)
    nib = nib.reshape(n, kt, 8)[:, :, order].reshape(n, k // 4)
    # (tile row, row half h, g, k tile, group half s, t) -> (tile row, k tile, g, t, s, h)
    tiles = pairs.reshape(n // 16, 2, 8, kt, 2, 4).permute(0, 3, 2, 5, 4, 1).reshape(n // 16, kt, 32, 4)
    # (tile row, h, g, k tile, lane pair t, group j) -> a 32-bit word per (tile row, g, k tile, t)
    shift = (4 * torch.arange(4, device=meta.device))[None, None, None, None, None, :] \
        + (16 * torch.arange(2, device=meta.device))[None, :, None, None, None, None]
    words = (nib.reshape(n // 16, 2, 8, kt, 2, 4) << shift).sum(dim=(1, 5))        # (n/16, 8, kt, 2)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)       # as int32 bits
    positions = words.reshape(n // 16, 8, k // 128, 4, 2).permute(0, 2, 1, 4, 3).reshape(n // 16, k // 128, 16, 4)
    return tiles.contiguous(), positions.contiguous()


def mma_unlayout(tiles: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``compress_24``'s (values, meta) back from :func:`mma_layout`'s output (the same bytes, reordered), so a
    layer that stores only the fragment-ordered copy can still be expanded where dense is faster (prefill)."""
    n, kt = tiles.shape[0] * 16, tiles.shape[1]
    k = kt * 32
    # tiles: (tile row, k tile, g, t, s, h) -> (tile row, h, g, k tile, s, t), then the tile's group order undone
    pairs = tiles.reshape(n // 16, kt, 8, 4, 2, 2).permute(0, 5, 2, 1, 4, 3).reshape(n, kt, 8)
    i = torch.arange(8, device=tiles.device)     # built on the device: no host copy, so capturable in a graph
    inverse = (i % 4) * 2 + i // 4                # 0 2 4 6 1 3 5 7
    values = pairs[:, :, inverse].reshape(n, k // 4).contiguous().view(dtype).reshape(n, k // 2)
    words = positions.reshape(n // 16, k // 128, 8, 2, 4).permute(0, 2, 1, 4, 3).reshape(n // 16, 1, 8, kt, 2, 1)
    shift = ((4 * torch.arange(4, device=tiles.device))[None, None, None, None, None, :]
             + (16 * torch.arange(2, device=tiles.device))[None, :, None, None, None, None])
    nib = ((words.to(torch.int64) & 0xFFFFFFFF) >> shift) & 15                     # (n/16, 2, 8, kt, 2, 4)
    nib = nib.reshape(n, kt, 8)[:, :, inverse].reshape(n, k // 4)
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return values.contiguous(), meta


# The config used where no plan was measured (the vLLM plugin, whose CUDA-graph capture forbids timing): the
# fastest at as many Llama-2-7B decode points as any other config, 16 tokens included (docs/kernels.md).
DEFAULT_CONFIG = MmaConfig(1, 8, unroll=4, min_blocks=2)


# Device functions of both mma.sp kernels (this decode kernel and sparse_gemm's); __TY__ and __MMA__ are
# filled in per build.
DEVICE_HELPERS = r"""// weights are read once: stream them past L1 so the inputs, read by every block, stay there
__device__ __forceinline__ uint4 ldnc(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ unsigned short to16(float f) {
  unsigned short h; asm("cvt.rn.__TY__.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ void mma(float* c, const uint4& a, const unsigned* b, unsigned e) {
  asm volatile("__MMA__.sync.aligned.m16n8k32.row.col.f32.__TY__.__TY__.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}
"""

_SOURCE = r"""
#define R __ROWS__
#define W __WARPS__
#define NT __NTILES__
#define S __SPLIT__
""" + DEVICE_HELPERS + r"""// grid: (O / (16 R), S). Block (i, s) adds up K groups s, s+S, ... of its R row tiles over its W warps; with
// S > 1 each block leaves its partial sums in ws and the last block of a row tile to finish adds them, in
// order (so the result does not depend on timing), and resets the tile's counter for the next call.
extern "C" __global__ void __launch_bounds__(32 * W, __MINB__) sp24_mma(
    const uint4* __restrict__ tiles, const uint4* __restrict__ pos, const unsigned* __restrict__ x,
    unsigned short* __restrict__ y, float* __restrict__ ws, unsigned* __restrict__ counters, int T, int K, int O) {
  __shared__ float acc[R * 16 * NT * 8];
  __shared__ unsigned last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int KT = K >> 5, KG = K >> 7, K2 = K >> 1, rt0 = blockIdx.x * R, s = blockIdx.y;
  for (int i = threadIdx.x; i < R * 16 * NT * 8; i += 32 * W) acc[i] = 0.f;
  float c[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
      for (int j = 0; j < 4; j++) c[r][n][j] = 0.f;
  const int plane = g * 2 + (t & 1);
#pragma unroll __UNROLL__
  for (int kg = s + S * warp; kg < KG; kg += S * W) {
    uint4 a[R][4], e[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
      const uint4* tp = tiles + ((size_t)(rt0 + r) * KT + kg * 4) * 32 + lane;
#pragma unroll
      for (int j = 0; j < 4; j++) a[r][j] = ldnc(tp + j * 32);
      e[r] = ldnc(pos + ((size_t)(rt0 + r) * KG + kg) * 16 + plane);
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
      unsigned b[NT][4];
#pragma unroll
      for (int n = 0; n < NT; n++) {
        const int tok = n * 8 + g;
        // one 32-byte read of the 4 groups this lane's half of the tile holds (see mma_layout's group order)
        const uint4* xp = (const uint4*)(x + (size_t)tok * K2 + (kg * 4 + j) * 16 + (t >> 1) * 8);
        const uint4 zero = {0u, 0u, 0u, 0u}, lo = tok < T ? xp[0] : zero, hi = tok < T ? xp[1] : zero;
        b[n][0] = (t & 1) ? lo.y : lo.x; b[n][1] = (t & 1) ? lo.w : lo.z;
        b[n][2] = (t & 1) ? hi.y : hi.x; b[n][3] = (t & 1) ? hi.w : hi.z;
      }
#pragma unroll
      for (int r = 0; r < R; r++) {
        const unsigned ej = j == 0 ? e[r].x : (j == 1 ? e[r].y : (j == 2 ? e[r].z : e[r].w));
#pragma unroll
        for (int n = 0; n < NT; n++) mma(c[r][n], a[r][j], b[n], ej);
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int n = 0; n < NT; n++) {
      const int row = r * 16 + g, tok = n * 8 + 2 * t;
      atomicAdd(&acc[tok * R * 16 + row], c[r][n][0]);
      atomicAdd(&acc[(tok + 1) * R * 16 + row], c[r][n][1]);
      atomicAdd(&acc[tok * R * 16 + row + 8], c[r][n][2]);
      atomicAdd(&acc[(tok + 1) * R * 16 + row + 8], c[r][n][3]);
    }
  __syncthreads();
  const int TILE = R * 16 * NT * 8;
#if S > 1
  float* part = ws + ((size_t)blockIdx.x * S + s) * TILE;
  for (int i = threadIdx.x; i < TILE; i += 32 * W) part[i] = acc[i];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1u) == S - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = threadIdx.x; i < TILE; i += 32 * W) {
    float v = 0.f;
    for (int p = 0; p < S; p++) v += ((volatile float*)ws)[((size_t)blockIdx.x * S + p) * TILE + i];
    acc[i] = v;
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
  __syncthreads();
#endif
  for (int i = threadIdx.x; i < TILE; i += 32 * W) {
    const int tok = i / (R * 16), row = i % (R * 16);
    if (tok < T) y[(size_t)tok * O + rt0 * 16 + row] = to16(acc[i]);
  }
}
"""


def _ntiles(tokens: int) -> int:
    return 1 if tokens <= 8 else (2 if tokens <= 16 else (4 if tokens <= 32 else 8))


@cache
def _kernel(cfg: MmaConfig, ntiles: int, dtype: torch.dtype, device: int):
    """The compiled kernel for one config, token tile count and dtype (NVRTC, cached per process)."""
    ty = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    src = (_SOURCE.replace("__ROWS__", str(cfg.rows)).replace("__WARPS__", str(cfg.warps))
           .replace("__NTILES__", str(ntiles)).replace("__TY__", ty).replace("__SPLIT__", str(cfg.split))
           .replace("__UNROLL__", str(cfg.unroll)).replace("__MINB__", str(cfg.min_blocks)))
    return build_kernel(src, "sp24_mma", 6, 3, device)


def build_kernel(src: str, name: str, pointers: int, ints: int, device: int, shared: int = 0) -> Launcher:
    """NVRTC-compile kernel ``name`` of ``src`` (its ``__MMA__`` still to fill in) for ``device`` and wrap it
    in a :class:`Launcher` of ``pointers`` pointer and ``ints`` int arguments and ``shared`` bytes of dynamic
    shared memory."""
    last = None
    # ``mma.sp::ordered_metadata`` is the form newer PTX asks for; plain ``mma.sp`` is its older spelling.
    for op in ("mma.sp::ordered_metadata", "mma.sp"):
        try:
            with torch.cuda.device(device):
                return Launcher(compile_kernel(src.replace("__MMA__", op), name), pointers, ints, shared)
        except RuntimeError as e:
            last = e
    raise RuntimeError(f"NVRTC could not build the {name} kernel: {last}")


class Launcher:
    """``cuLaunchKernel`` for a kernel of ``pointers`` pointer arguments then ``ints`` int arguments, with its
    argument block built once: PyTorch's generic launcher rebuilds it with ctypes on every call, which takes
    longer on the host than the kernel on the device and would count in eager plan timings (docs/kernels.md)."""

    def __init__(self, kernel, pointers: int, ints: int, shared: int = 0) -> None:
        from torch.cuda._utils import _get_gpu_runtime_library

        self.kernel, self.lib, self.shared = kernel, _get_gpu_runtime_library(), shared
        if shared > 48 * 1024:  # past 48 KB a kernel must opt in (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
            err = self.lib.cuFuncSetAttribute(kernel.func, 8, shared)
            if err:
                raise RuntimeError(f"this GPU cannot give a block {shared} bytes of shared memory (CUDA error {err})")
        self.ptrs = [ctypes.c_void_p() for _ in range(pointers)]
        self.ints = [ctypes.c_int() for _ in range(ints)]
        self.argv = (ctypes.c_void_p * (pointers + ints))(*[ctypes.addressof(o) for o in self.ptrs + self.ints])
        self.lock = threading.Lock()  # the argument block is shared; launches copy it, so only this is guarded

    def __call__(self, grid: tuple[int, ...], block: int, ptrs: list[int], ints: list[int]) -> None:
        gx, gy, gz = (*grid, 1, 1)[:3]
        with self.lock:
            for o, v in zip(self.ptrs, ptrs):
                o.value = v
            for o, v in zip(self.ints, ints):
                o.value = v
            err = self.lib.cuLaunchKernel(self.kernel.func, gx, gy, gz, block, 1, 1, self.shared,
                                          ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), self.argv, None)
        if err:
            raise RuntimeError(f"launching a maskpro kernel failed with CUDA error {err}")


def compile_kernel(src: str, name: str):
    """A header-free CUDA C++ kernel compiled with NVRTC through PyTorch (its include-path lookup wants a
    CUDA_HOME, which pip-only images lack)."""
    import torch.utils.cpp_extension as ext

    if ext.CUDA_HOME is None:  # the kernel includes no headers, so any directory will do
        ext.CUDA_HOME = str(torch.__path__[0])
    return torch.cuda._compile_kernel(src, name)


@cache
def available() -> bool:
    """Whether this process can run the kernel (a CUDA GPU with sparse tensor cores and NVRTC); asked per call
    on the untimed decode path, and the answer cannot change within a process."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


_SCRATCH: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
# fp32 partial sums per output row that split K may leave: up to 8 splits of up to 64 tokens (this kernel's
# splits and sparse_gemm's medium-batch ones)
SCRATCH_PER_ROW = 8 * MAX_TOKENS


def reserve(out_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K scratch (partial sums, per-tile counters) for layers up to ``out_features`` on ``device``.

    Shared by all layers of a device: a call leaves its counters at zero, so calls on one stream (or one
    CUDA graph) can follow each other; layers must not run concurrently on several streams.
    """
    idx = device.index or 0
    ws, counters = _SCRATCH.get(idx, (None, None))
    need = out_features * SCRATCH_PER_ROW
    if ws is None or ws.numel() < need:
        ws = torch.empty(need, dtype=torch.float32, device=device)
        counters = torch.zeros(out_features // 16, dtype=torch.int32, device=device)
        _SCRATCH[idx] = (ws, counters)
    return ws, counters


def sparse_mma_mm(x: torch.Tensor, tiles: torch.Tensor, positions: torch.Tensor, out_features: int,
                  cfg: MmaConfig = MmaConfig()) -> torch.Tensor:
    """``x @ W.T`` for 2-D fp16/bf16 ``x`` (T <= 64, K) on CUDA and W in :func:`mma_layout` order."""
    t, k = x.shape
    if t > MAX_TOKENS:
        raise ValueError(f"the mma.sp kernel takes at most {MAX_TOKENS} tokens, got {t}")
    x = x.contiguous()
    if x.data_ptr() % 16:  # the kernel reads inputs 16 bytes at a time
        x = x.clone()
    y = torch.empty(t, out_features, dtype=x.dtype, device=x.device)
    ws, counters = reserve(out_features, x.device)
    launch = _kernel(cfg, _ntiles(t), x.dtype, x.device.index or 0)
    launch((out_features // (16 * cfg.rows), cfg.split), 32 * cfg.warps,
           [tiles.data_ptr(), positions.data_ptr(), x.data_ptr(), y.data_ptr(), ws.data_ptr(), counters.data_ptr()],
           [t, k, out_features])
    return y
