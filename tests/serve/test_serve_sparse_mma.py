"""The mma.sp fragment layout, checked on CPU against the PTX ISA's fragment rules; the kernel itself on a GPU."""

import pytest
import torch
from maskpro.serve import sparse24
from maskpro.serve.sparse_mma import (
    MMA_CANDIDATES,
    MmaConfig,
    mma_layout,
    mma_ok,
    mma_unlayout,
    sparse_mma_mm,
)

from maskpro.nm import NM, topn_mask


def _weight(n: int, k: int, dtype=torch.float16, device="cpu") -> torch.Tensor:
    w = torch.randn(n, k, dtype=torch.float32).to(device=device, dtype=dtype)
    return w * topn_mask(w.abs(), NM(2, 4))


def _as_hardware_reads_it(tiles: torch.Tensor, positions: torch.Tensor, dtype) -> torch.Tensor:
    """The dense weight an m16n8k32 ``mma.sp`` sees from these registers, lane by lane (PTX ISA rules)."""
    rt, kt = tiles.shape[:2]
    dense = torch.zeros(rt * 16, kt * 32, dtype=dtype)
    halves = tiles.view(dtype).reshape(rt, kt, 32, 4, 2)          # a reg's low 16 bits hold the first value
    for r in range(rt):
        for c in range(kt):
            kept = torch.zeros(16, 16, dtype=dtype)               # the tile's compressed 16x16 A operand
            for lane in range(32):
                g, t = divmod(lane, 4)
                for reg, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
                    kept[row, col:col + 2] = halves[r, c, lane, reg]
            for lane in range(32):
                g, t = divmod(lane, 4)
                if t > 1:
                    continue                                      # sparsity selector 0: lanes t=0,1 give metadata
                word = int(positions[r, c // 4, g * 2 + t, c % 4]) & 0xFFFFFFFF
                for half, row in ((0, g), (1, g + 8)):
                    bits = (word >> (16 * half)) & 0xFFFF
                    for j in range(4):                            # the tile's groups 4t..4t+3 of 8
                        group, nib = 4 * t + j, (bits >> (4 * j)) & 15
                        for slot, pos in enumerate((nib & 3, nib >> 2)):
                            dense[r * 16 + row, c * 32 + 4 * group + pos] = kept[row, 2 * group + slot]
    return dense


def _input_of_hardware_k() -> list[int]:
    """The input index (within a 32-wide K tile) that the kernel loads for each hardware k of the B operand."""
    ks = []
    for p in range(32):                                           # B: reg i of lane (g, t) holds k = 2t + 8i (+1)
        i, t, j = p // 8, (p % 8) // 2, p % 2
        word = 8 * (t >> 1) + 2 * i + (t & 1)                     # one 32-byte read per half-quad
        ks.append(2 * word + j)
    return ks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layout_pairs_every_weight_with_its_input(dtype):
    w = _weight(32, 256, dtype)
    tiles, positions = mma_layout(*sparse24.compress_24(w))
    assert tiles.shape == (2, 8, 32, 4) and positions.shape == (2, 2, 16, 4)
    ks = torch.tensor([32 * c + k for c in range(8) for k in _input_of_hardware_k()])
    assert sorted(ks.tolist()) == list(range(256))
    assert torch.equal(_as_hardware_reads_it(tiles, positions, dtype), w[:, ks])


def test_layout_bytes_are_the_compressed_bytes():
    w = _weight(16, 128)
    values, meta = sparse24.compress_24(w)
    tiles, positions = mma_layout(values, meta)
    assert tiles.numel() * 4 == values.numel() * 2 and positions.numel() * 4 == meta.numel()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unlayout_gives_back_the_compressed_weight(dtype):
    w = _weight(48, 384, dtype)
    values, meta = sparse24.compress_24(w)
    back = mma_unlayout(*mma_layout(values, meta), dtype)
    assert torch.equal(back[0], values) and torch.equal(back[1], meta)


def test_shapes_the_kernel_cannot_cover_are_refused():
    assert mma_ok(4096, 11008) and mma_ok(11008, 4096) and not mma_ok(4096, 4000)
    assert not mma_ok(16, 4096, MmaConfig(rows=2)) and mma_ok(32, 4096, MmaConfig(rows=2))
    with pytest.raises(ValueError, match="in % 128"):
        mma_layout(*sparse24.compress_24(_weight(16, 64)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mma.sp kernel needs a CUDA GPU (sm_80+)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 8, 13, 16, 40, 64])
def test_kernel_matches_dense(dtype, tokens):
    torch.manual_seed(0)
    w = _weight(256, 1024, dtype, "cuda")
    tiles, positions = mma_layout(*sparse24.compress_24(w))
    x = torch.randn(tokens, 1024, dtype=dtype, device="cuda")
    ref = x.float() @ w.float().T
    for cfg in MMA_CANDIDATES:
        y = sparse_mma_mm(x, tiles, positions, 256, cfg)
        assert y.shape == (tokens, 256)
        assert float((y.float() - ref).abs().max() / ref.abs().max()) < 1e-2, cfg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mma.sp kernel needs a CUDA GPU (sm_80+)")
def test_untimed_linear_over_the_fragment_order_matches_dense():
    """``sparse_linear_mma`` (what the vLLM plugin runs): the kernel up to 16 tokens, the GEMM's medium-batch
    default up to 64, the expanded weight past."""
    from maskpro.serve.sparse_linear import sparse_linear_mma

    torch.manual_seed(0)
    w = _weight(256, 1024, torch.float16, "cuda")
    tiles, positions = mma_layout(*sparse24.compress_24(w))
    bias = torch.randn(256, dtype=torch.float16, device="cuda")
    from maskpro.serve import sparse_gemm

    assert sparse_gemm.medium_default(256, 1024, 48, 132) is not None   # the 48 rows below take the GEMM
    for tokens in (1, 8, 24, 40):  # two sequences: 2, 16, 48 and 80 rows
        x = torch.randn(2, tokens, 1024, dtype=torch.float16, device="cuda")
        ref = x.float() @ w.float().T + bias.float()
        y = sparse_linear_mma(x, tiles, positions, bias, 256, 1024)
        assert y.shape == (2, tokens, 256)
        assert float((y.float() - ref).abs().max() / ref.abs().max()) < 1e-2
