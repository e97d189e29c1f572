"""2:4 products of many tokens (prefill, large batches) on the sparse tensor cores, from the decode layout.

Why: a model that keeps only its compressed weights (56% of the dense bytes) must still prefill. Expanding
each layer to dense for cuBLAS costs a read of the compressed bytes and a write of the dense ones per layer,
so this kernel multiplies the fragment-ordered weights of :func:`maskpro.serve.sparse_mma.mma_layout` as they
are, with ``mma.sp``. It is slower than expansion on Llama-2-7B shapes (docs/runtime.md); the runtime's plans
decide.

Structure (a classic tiled GEMM, weights as the sparse A operand): a block computes ``BM`` output rows x
``BN`` tokens; its warps form a WM x WN grid, each owning MT row tiles of 16 and NT token tiles of 8. Per
128-wide K group the block's weights (each row tile's values and positions lie contiguous in the layout) and
inputs are staged in shared memory by ``cp.async``, ``stages - 1`` groups in flight while one is multiplied, and
the inputs are read with ``ldmatrix``. The layout stores a tile's groups of 4 in the order ``0 4 1 5 2 6 3 7``
(the decode kernel wants each lane's inputs contiguous), so the inputs are staged with their groups of 4 put in
the same order (8-byte copies), after which ``ldmatrix`` yields the instruction's B fragments directly. With
one block of tokens (16-64, continuous batching's steps) K may be split over blocks, which add up through a
scratch buffer. The result tile goes through shared memory so that rows of the row-major output are written
whole.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch

from . import sparse_mma


MAX_SHARED = 227 * 1024  # dynamic shared memory one block may have on sm_90 (sm_80: 163 KB; a bigger config fails to
                         # launch there and is no candidate)


@dataclass(frozen=True)
class GemmConfig:
    wm: int = 4   # warps along output rows
    wn: int = 2   # warps along tokens
    mt: int = 2   # 16-row tiles per warp
    nt: int = 4   # 8-token tiles per warp
    split: int = 1  # blocks per output tile, splitting K (used where all tokens fit one block's BN)
    stages: int = 3  # K groups staged in shared memory: stages - 1 in flight while one is multiplied

    def __post_init__(self) -> None:
        if min(self.wm, self.wn, self.mt, self.nt, self.split) < 1 or self.stages < 2 or self.bm > 128:
            raise ValueError(f"a GEMM config needs positive fields, two stages or more and at most 128 rows a "
                             f"block, got {self}")
        if self.shared_bytes > MAX_SHARED:
            raise ValueError(f"{self} stages {self.shared_bytes} bytes, more than the {MAX_SHARED} a block gets")

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory of a block: per stage its weights (values and positions of every row tile,
        2304 bytes per 16 rows) and its inputs (BN padded rows of 128 halves)."""
        return self.stages * (self.bm // 16 * 2304 + self.bn * 136 * 2)

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


# Continuous batching's 16-64-token steps: still bound by the weight bytes, but the decode kernel's 16-row
# blocks each re-read all the inputs. Here a block owns 64 or 128 rows and all tokens, weights and inputs
# staged once per block (4 warps, or 8 splitting the tokens or holding two row tiles each); splitting K over
# blocks fills the GPU when a layer has few row blocks.
MEDIUM_SHAPES = ((4, 1, 1), (4, 2, 1), (8, 1, 1), (4, 2, 2))   # (wm, wn, mt)
MEDIUM_SPLITS = (1, 2, 4, 8)


def gemm_ok(n: int, k: int, cfg: GemmConfig = GemmConfig()) -> bool:
    return n % cfg.bm == 0 and k % 128 == 0 and cfg.split <= k // 128


def medium_candidates(n: int, k: int, tokens: int, sms: int) -> list[GemmConfig]:
    """The configs worth timing for an (out n, in k) layer at ``tokens`` (16-64) tokens on ``sms``
    multiprocessors: one block of tokens as small as the count allows, K split only as far as a few blocks
    per multiprocessor, as many stages as leave two blocks per multiprocessor."""
    tiles = 2 if tokens <= 16 else (4 if tokens <= 32 else 8)   # 8-token tiles
    out = []
    for wm, wn, mt in MEDIUM_SHAPES:
        for split in MEDIUM_SPLITS:
            cfg = GemmConfig(wm, wn, mt, max(1, tiles // wn), split, stages=4 if wm * mt == 4 else 3)
            if gemm_ok(n, k, cfg) and (split == 1 or n // cfg.bm * split <= 4 * sms):
                out.append(cfg)
    return out


def medium_default(n: int, k: int, tokens: int, sms: int) -> GemmConfig | None:
    """A medium-batch config for callers that cannot time one (the vLLM plugin, whose graph capture forbids
    timing): 128-row blocks of 4 warps x 2 token halves, K split as far as 4 while the blocks stay within three
    per multiprocessor, the shape the plans picked at 64 tokens for all four Llama-2-7B layers
    (docs/kernels.md). None where no such config tiles the layer."""
    tiles = 2 if tokens <= 16 else (4 if tokens <= 32 else 8)
    for split in (4, 2, 1):
        cfg = GemmConfig(4, 2, 2, tiles // 2, split, stages=3)
        if gemm_ok(n, k, cfg) and (split == 1 or n // cfg.bm * split <= 3 * sms):
            return cfg
    return None


_SOURCE = r"""
#define WM __WM__
#define WN __WN__
#define MT __MT__
#define NT __NT__
#define S __SPLIT__
#define STAGES __STAGES__
#define BM (WM * MT * 16)
#define BN (WN * NT * 8)
#define NTHR (32 * WM * WN)
#define RT (BM / 16)       // row tiles per block
#define WROW 144           // uint4 per row tile and K group: 4 tiles x 32 lanes of values, then 16 of positions
#define WSTAGE (RT * WROW) // uint4 of weights per stage
#define XS 136             // halves per staged token row: 128 + 8 of padding, so ldmatrix rows fall in distinct banks
#define XSTAGE (BN * XS)   // halves of inputs per stage
#define CS (BM + 8)
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
""" + sparse_mma.DEVICE_HELPERS + r"""
// Stage K group kg (128 wide): the weights of this block's row tiles (per row tile its 4 value tiles and its
// position words lie contiguous in the layout, 16-byte copies that skip L1), and the inputs of its BN tokens,
// each 32-wide tile's groups of 4 reordered as the weight layout stores them (actual group 4h + i goes to slot
// 2i + h; 8-byte copies, zero past T). The caller commits the group.
__device__ __forceinline__ void stage(uint4* wst, unsigned short* xst, const uint4* __restrict__ tiles,
                                      const uint4* __restrict__ pos, const unsigned short* __restrict__ x,
                                      int rtb, int tok0, int T, int K, int KT, int KG, int kg) {
  for (int i = threadIdx.x; i < WSTAGE; i += NTHR) {
    const int r = i / WROW, q = i % WROW;
    const uint4* src = q < 128 ? tiles + ((size_t)(rtb + r) * KT + kg * 4) * 32 + q
                               : pos + ((size_t)(rtb + r) * KG + kg) * 16 + (q - 128);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(smem_addr(wst + i)), "l"(src));
  }
  for (int idx = threadIdx.x; idx < BN * 32; idx += NTHR) {
    const int tok = idx >> 5, grp = idx & 31, tile = grp >> 3, ag = grp & 7;
    const int slot = 2 * (ag & 3) + (ag >> 2);
    const bool ok = tok0 + tok < T;
    const unsigned short* src = x + (size_t)(ok ? tok0 + tok : 0) * K + kg * 128 + grp * 4;
    const unsigned dst = smem_addr(xst + tok * XS + tile * 32 + slot * 4);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" :: "r"(dst), "l"(src), "r"(ok ? 8 : 0));
  }
}
// grid: (O / BM, ceil(T / BN), S). Block (i, j, s) takes K groups [s KG / S, (s+1) KG / S), STAGES - 1 of them in
// flight while one is multiplied. With S > 1 (one block of tokens) each block leaves its fp32 partial tile in ws
// and the last of the S to finish adds them in order (so the result does not depend on timing) and resets the
// tile's counter for the next call.
extern "C" __global__ void __launch_bounds__(NTHR, __MINB__) sp24_gemm(
    const uint4* __restrict__ tiles, const uint4* __restrict__ pos, const unsigned short* __restrict__ x,
    unsigned short* __restrict__ y, float* __restrict__ ws, unsigned* __restrict__ counters, int T, int K, int O) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* wsm = (uint4*)smem;
  unsigned short* xsm = (unsigned short*)(smem + STAGES * WSTAGE * 16);
  __shared__ unsigned last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wm = warp / WN, wn = warp % WN;
  const int KT = K >> 5, KG = K >> 7;
  const int s = blockIdx.z, kg0 = (int)((long long)KG * s / S), kg1 = (int)((long long)KG * (s + 1) / S);
  const int row0 = blockIdx.x * BM, tok0 = blockIdx.y * BN, rtb = row0 / 16;
  const int plane = g * 2 + (t & 1);
  float c[MT][NT][4];
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
      for (int j = 0; j < 4; j++) c[m][n][j] = 0.f;
#pragma unroll
  for (int p = 0; p < STAGES - 1; p++) {
    if (kg0 + p < kg1) stage(wsm + p * WSTAGE, xsm + p * XSTAGE, tiles, pos, x, rtb, tok0, T, K, KT, KG, kg0 + p);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  for (int kg = kg0; kg < kg1; kg++) {
    const int i = kg - kg0, cur = i % STAGES;
    asm volatile("cp.async.wait_group %0;\n" :: "n"(STAGES - 2));   // group kg has landed, for this thread
    __syncthreads();                                                // ... and for all; group kg - 1 is consumed
    {
      const int nxt = kg + STAGES - 1, buf = (i + STAGES - 1) % STAGES;   // the buffer group kg - 1 used
      if (nxt < kg1) stage(wsm + buf * WSTAGE, xsm + buf * XSTAGE, tiles, pos, x, rtb, tok0, T, K, KT, KG, nxt);
      asm volatile("cp.async.commit_group;\n" ::);
    }
    const uint4* wst = wsm + cur * WSTAGE;
    const unsigned short* xst = xsm + cur * XSTAGE;
    uint4 e[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) e[m] = wst[(wm * MT + m) * WROW + 128 + plane];
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
        const uint4 a = wst[(wm * MT + m) * WROW + j * 32 + lane];
        const unsigned ej = j == 0 ? e[m].x : (j == 1 ? e[m].y : (j == 2 ? e[m].z : e[m].w));
#pragma unroll
        for (int n = 0; n < NT; n++) mma(c[m][n], a, b[n], ej);
      }
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();   // every warp is done with the stages: the result tile reuses them
#if S > 1
  float* cf = (float*)smem;   // the fp32 tile [BN tokens][BM rows], then whole rows of it to ws
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int n = 0; n < NT; n++) {
      const int row = (wm * MT + m) * 16 + g, tok = wn * NT * 8 + n * 8 + 2 * t;
      cf[tok * BM + row] = c[m][n][0];
      cf[(tok + 1) * BM + row] = c[m][n][1];
      cf[tok * BM + row + 8] = c[m][n][2];
      cf[(tok + 1) * BM + row + 8] = c[m][n][3];
    }
  __syncthreads();
  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  float4* part = (float4*)(ws + ((size_t)tile * S + s) * (BM * BN));
  for (int i = threadIdx.x; i < BM * BN / 4; i += NTHR) part[i] = ((const float4*)cf)[i];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[tile], 1u) == S - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = threadIdx.x; i < BM * BN / 4; i += NTHR) {
    float4 q[S];
#pragma unroll
    for (int p = 0; p < S; p++) {   // all S loads in flight at once, from L2 (the other blocks wrote them)
      const float4* src = (const float4*)(ws + ((size_t)tile * S + p) * (BM * BN)) + i;
      asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];"
                   : "=f"(q[p].x), "=f"(q[p].y), "=f"(q[p].z), "=f"(q[p].w) : "l"(src));
    }
    float4 v = q[0];
#pragma unroll
    for (int p = 1; p < S; p++) { v.x += q[p].x; v.y += q[p].y; v.z += q[p].z; v.w += q[p].w; }
    const int tok = (4 * i) / BM, row = (4 * i) % BM;
    if (tok0 + tok < T) {
      uint2 h;
      h.x = to16(v.x) | ((unsigned)to16(v.y) << 16);
      h.y = to16(v.z) | ((unsigned)to16(v.w) << 16);
      *(uint2*)(y + (size_t)(tok0 + tok) * O + row0 + row) = h;
    }
  }
  if (threadIdx.x == 0) counters[tile] = 0;
#else
  unsigned short* cs = (unsigned short*)smem;   // the result tile [BN tokens][BM rows], then whole output rows
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
  for (int idx = threadIdx.x; idx < BN * (BM / 8); idx += NTHR) {
    const int tok = idx / (BM / 8), chunk = idx % (BM / 8);
    if (tok0 + tok < T)
      *(uint4*)(y + (size_t)(tok0 + tok) * O + row0 + chunk * 8) = *(const uint4*)(cs + tok * CS + chunk * 8);
  }
#endif
}
"""


@cache
def _kernel(cfg: GemmConfig, dtype: torch.dtype, device: int):
    ty = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    threads = 32 * cfg.wm * cfg.wn
    src = (_SOURCE.replace("__WM__", str(cfg.wm)).replace("__WN__", str(cfg.wn)).replace("__MT__", str(cfg.mt))
           .replace("__NT__", str(cfg.nt)).replace("__SPLIT__", str(cfg.split)).replace("__TY__", ty)
           .replace("__STAGES__", str(cfg.stages)).replace("__MINB__", str(max(1, min(4, 512 // threads)))))
    return sparse_mma.build_kernel(src, "sp24_gemm", 6, 3, device, shared=cfg.shared_bytes)


def sparse_gemm(x: torch.Tensor, tiles: torch.Tensor, positions: torch.Tensor, out_features: int,
                cfg: GemmConfig = GemmConfig()) -> torch.Tensor:
    """``x @ W.T`` for 2-D fp16/bf16 ``x`` (T, K) on CUDA, any T, and W in ``mma_layout`` order."""
    t, k = x.shape
    if cfg.split > 1 and t > cfg.bn:  # split K only where one block of tokens leaves the GPU short of blocks
        cfg = replace(cfg, split=1)
    if cfg.split > 1 and cfg.split * cfg.bn > sparse_mma.SCRATCH_PER_ROW:
        raise ValueError(f"{cfg}: split x tokens per block exceeds the {sparse_mma.SCRATCH_PER_ROW} partial sums "
                         "per row the split-K scratch holds")
    if not gemm_ok(out_features, k, cfg):
        raise ValueError(f"the mma.sp GEMM with {cfg} needs out % {cfg.bm} == 0, in % 128 == 0 and at most "
                         f"in / 128 K splits, got {out_features}x{k}")
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    y = torch.empty(t, out_features, dtype=x.dtype, device=x.device)
    ws, counters = sparse_mma.reserve(out_features, x.device)
    launch = _kernel(cfg, x.dtype, x.device.index or 0)
    launch((out_features // cfg.bm, (t + cfg.bn - 1) // cfg.bn, cfg.split), 32 * cfg.wm * cfg.wn,
           [tiles.data_ptr(), positions.data_ptr(), x.data_ptr(), y.data_ptr(), ws.data_ptr(), counters.data_ptr()],
           [t, k, out_features])
    return y
