"""2:4 products of many tokens (prefill, large batches) on the sparse tensor cores, from the decode layout.

Why: a model that keeps only its compressed weights (56% of the dense bytes) must still prefill. Expanding
each layer to dense for cuBLAS costs a read of the compressed bytes and a write of the dense ones per layer,
so this kernel multiplies the fragment-ordered weights of :func:`maskpro.serve.sparse_mma.mma_layout` as they
are, with ``mma.sp``. It is slower than expansion on Llama-2-7B shapes (docs/runtime.md); the runtime's plans
decide.

Structure (a classic tiled GEMM, weights as the sparse A operand): a block computes ``BM`` output rows x
``BN`` tokens; its warps form a WM x WN grid, each owning MT row tiles of 16 and NT token tiles of 8. Per
128-wide K group the inputs are staged in shared memory by ``cp.async`` (two stages, the next group loading
while this one computes) and read with ``ldmatrix``; the weights need no staging, as each lane's fragment is
one coalesced 16-byte load. The layout stores a tile's groups of 4 in the order ``0 4 1 5 2 6 3 7`` (the
decode kernel wants each lane's inputs contiguous), so the inputs are staged with their groups of 4 put in the
same order (8-byte copies), after which ``ldmatrix`` yields the instruction's B fragments directly. The result
tile goes through shared memory so that rows of the row-major output are written whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from . import sparse_mma


@dataclass(frozen=True)
class GemmConfig:
    wm: int = 4   # warps along output rows
    wn: int = 2   # warps along tokens
    mt: int = 2   # 16-row tiles per warp
    nt: int = 4   # 8-token tiles per warp

    @property
    def bm(self) -> int:
        return self.wm * self.mt * 16

    @property
    def bn(self) -> int:
        return self.wn * self.nt * 8


# Blocks of 128 output rows x 64 tokens (two input stages then fill 34 KB of the 48 KB of static shared
# memory), with the warps arranged four ways.
GEMM_CANDIDATES = [GemmConfig(4, 2, 2, 4), GemmConfig(2, 2, 4, 4), GemmConfig(4, 1, 2, 8), GemmConfig(2, 4, 4, 2),
                   GemmConfig(8, 1, 1, 8)]


def gemm_ok(n: int, k: int, cfg: GemmConfig = GemmConfig()) -> bool:
    return n % cfg.bm == 0 and k % 128 == 0


_SOURCE = r"""
#define WM __WM__
#define WN __WN__
#define MT __MT__
#define NT __NT__
#define BM (WM * MT * 16)
#define BN (WN * NT * 8)
#define XS 136   // halves per staged token row: 128 + 8 of padding, so ldmatrix rows fall in distinct banks
#define CS (BM + 8)
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
""" + sparse_mma.DEVICE_HELPERS + r"""// Stage the inputs of K group kg (128 wide) for this block's BN tokens into xs_stage, each 32-wide tile's
// groups of 4 reordered as the weight layout stores them (actual group 4h + i goes to slot 2i + h).
__device__ __forceinline__ void stage(unsigned short* xs_stage, const unsigned short* __restrict__ x, int tok0,
                                      int T, int K, int kg) {
  for (int idx = threadIdx.x; idx < BN * 32; idx += 32 * WM * WN) {
    const int tok = idx >> 5, grp = idx & 31, tile = grp >> 3, ag = grp & 7;
    const int slot = 2 * (ag & 3) + (ag >> 2);
    const bool ok = tok0 + tok < T;
    const unsigned short* src = x + (size_t)(ok ? tok0 + tok : 0) * K + kg * 128 + grp * 4;
    const unsigned dst = smem_addr(xs_stage + tok * XS + tile * 32 + slot * 4);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" :: "r"(dst), "l"(src), "r"(ok ? 8 : 0));
  }
  asm volatile("cp.async.commit_group;\n" ::);
}
extern "C" __global__ void __launch_bounds__(32 * WM * WN, __MINB__) sp24_gemm(
    const uint4* __restrict__ tiles, const uint4* __restrict__ pos, const unsigned short* __restrict__ x,
    unsigned short* __restrict__ y, int T, int K, int O) {
  __shared__ __align__(16) unsigned short xs[2 * BN * XS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wm = warp / WN, wn = warp % WN;
  const int KT = K >> 5, KG = K >> 7;
  const int row0 = blockIdx.x * BM, tok0 = blockIdx.y * BN;
  const int rt0 = row0 / 16 + wm * MT;       // this warp's first 16-row tile
  const int plane = g * 2 + (t & 1);
  float c[MT][NT][4];
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
      for (int j = 0; j < 4; j++) c[m][n][j] = 0.f;
  stage(xs, x, tok0, T, K, 0);
  for (int kg = 0; kg < KG; kg++) {
    uint4 a[MT][4], e[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) {
      const uint4* tp = tiles + ((size_t)(rt0 + m) * KT + kg * 4) * 32 + lane;
#pragma unroll
      for (int j = 0; j < 4; j++) a[m][j] = ldnc(tp + j * 32);
      e[m] = ldnc(pos + ((size_t)(rt0 + m) * KG + kg) * 16 + plane);
    }
    if (kg + 1 < KG) {
      stage(xs + ((kg + 1) & 1) * BN * XS, x, tok0, T, K, kg + 1);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
    const unsigned short* xst = xs + (kg & 1) * BN * XS;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      unsigned b[NT][4];
#pragma unroll
      for (int n = 0; n < NT; n++) {
        const unsigned addr = smem_addr(xst + (wn * NT * 8 + n * 8 + (lane & 7)) * XS + j * 32 + (lane >> 3) * 8);
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(b[n][0]), "=r"(b[n][1]), "=r"(b[n][2]), "=r"(b[n][3]) : "r"(addr));
      }
#pragma unroll
      for (int m = 0; m < MT; m++) {
        const unsigned ej = j == 0 ? e[m].x : (j == 1 ? e[m].y : (j == 2 ? e[m].z : e[m].w));
#pragma unroll
        for (int n = 0; n < NT; n++) mma(c[m][n], a[m][j], b[n], ej);
      }
    }
    __syncthreads();   // this stage is overwritten by the load issued in the next iteration but one
  }
  // the result tile [BN tokens][BM rows] through shared memory, then whole output rows
  unsigned short* cs = xs;
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int n = 0; n < NT; n++) {
      const int row = (wm * MT + m) * 16 + g, tok = wn * NT * 8 + n * 8 + 2 * t;
      cs[tok * CS + row] = to16(c[m][n][0]);
      cs[(tok + 1) * CS + row] = to16(c[m][n][1]);
      cs[tok * CS + row + 8] = to16(c[m][n][2]);
      cs[(tok + 1) * CS + row + 8] = to16(c[m][n][3]);
    }
  __syncthreads();
  for (int idx = threadIdx.x; idx < BN * (BM / 8); idx += 32 * WM * WN) {
    const int tok = idx / (BM / 8), chunk = idx % (BM / 8);
    if (tok0 + tok < T)
      *(uint4*)(y + (size_t)(tok0 + tok) * O + row0 + chunk * 8) = *(const uint4*)(cs + tok * CS + chunk * 8);
  }
}
"""


@cache
def _kernel(cfg: GemmConfig, dtype: torch.dtype, device: int):
    ty = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    threads = 32 * cfg.wm * cfg.wn
    src = (_SOURCE.replace("__WM__", str(cfg.wm)).replace("__WN__", str(cfg.wn)).replace("__MT__", str(cfg.mt))
           .replace("__NT__", str(cfg.nt)).replace("__TY__", ty).replace("__MINB__", "2" if threads <= 256 else "1"))
    return sparse_mma.build_kernel(src, "sp24_gemm", 4, 3, device)


def sparse_gemm(x: torch.Tensor, tiles: torch.Tensor, positions: torch.Tensor, out_features: int,
                cfg: GemmConfig = GemmConfig()) -> torch.Tensor:
    """``x @ W.T`` for 2-D fp16/bf16 ``x`` (T, K) on CUDA, any T, and W in ``mma_layout`` order."""
    t, k = x.shape
    if not gemm_ok(out_features, k, cfg):
        raise ValueError(f"the mma.sp GEMM with {cfg} needs out % {cfg.bm} == 0 and in % 128 == 0, "
                         f"got {out_features}x{k}")
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    y = torch.empty(t, out_features, dtype=x.dtype, device=x.device)
    launch = _kernel(cfg, x.dtype, x.device.index or 0)
    launch((out_features // cfg.bm, (t + cfg.bn - 1) // cfg.bn), 32 * cfg.wm * cfg.wn,
           [tiles.data_ptr(), positions.data_ptr(), x.data_ptr(), y.data_ptr()], [t, k, out_features])
    return y
