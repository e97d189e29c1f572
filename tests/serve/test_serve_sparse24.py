"""The 2:4 compressed format and the sparse linear runtime (GPU kernels are checked against dense on CUDA)."""

from __future__ import annotations

import pytest
import torch

from maskpro.errors import MaskproError
from maskpro.nm import NM, topn_mask
from maskpro.serve.sparse24 import compress_24, decompress_24, sparse24_mm
from maskpro.serve.sparse_linear import (SparseLinear, candidates, cusparselt_linear, semi_structured, set_dense_only,
                                         sparse_linear, sparsify)


def _w24(n: int, k: int, seed: int = 0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return (w * topn_mask(w.abs(), NM(2, 4))).to(device)


def test_compress_roundtrip_is_exact_and_56_percent_of_the_bytes():
    w = _w24(48, 64, dtype=torch.float16)
    w[0, :4] = 0                                              # an all-zero group
    w[1, 4:8] = torch.tensor([0, 0, 0, 1.5], dtype=torch.float16)  # one non-zero, in the last position
    values, meta = compress_24(w)
    assert values.shape == (48, 32) and meta.shape == (48, 8) and meta.dtype == torch.uint8
    assert torch.equal(decompress_24(values, meta), w)
    stored = values.numel() * 2 + meta.numel()
    assert stored / (w.numel() * 2) == pytest.approx(0.5625)


def test_compress_refuses_a_dense_group():
    w = _w24(8, 16)
    w[2, 4:8] = 1.0
    with pytest.raises(MaskproError, match="not 2:4"):
        compress_24(w)
    with pytest.raises(MaskproError, match="divisible by 8"):
        compress_24(torch.zeros(4, 12))


def test_cpu_paths_match_dense():
    w = _w24(32, 128, 1)
    values, meta = compress_24(w)
    x = torch.randn(2, 3, 128)
    b = torch.randn(32)
    assert torch.allclose(sparse_linear(x, values, meta, b, 32, 128), x @ w.T + b, atol=1e-5)
    assert torch.allclose(sparse24_mm(x[0], values, meta), x[0] @ w.T, atol=1e-5)
    lin = torch.nn.Linear(128, 32)
    lin.weight.data = w
    layer = SparseLinear(lin)
    assert torch.allclose(layer(x), lin(x), atol=1e-5)


def test_sparsify_on_cpu_keeps_the_model_dense(tiny_pruned):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_pruned))
    report = sparsify(model)
    assert report["backend"] == "dense" and "no CUDA" in report["reason"]
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4, 16, 512])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_kernels_match_dense_on_gpu(shape, tokens):
    n, k = shape
    w = _w24(n, k, dtype=torch.float16, device="cuda")
    values, meta = compress_24(w)
    x = torch.randn(tokens, k, dtype=torch.float16, device="cuda")
    ref = (x @ w.T).float()
    for cfg in candidates(n, k, tokens):
        y = sparse24_mm(x, values, meta, *cfg.args()).float()
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-2, cfg


@pytest.mark.gpu
def test_sparsify_uses_cusparselt_where_it_is_fastest_and_matches_dense():
    """A 2:4 stack timed at a prefill size: whichever path the plan picks, outputs equal the dense model's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(2)]).half().cuda()
    with torch.no_grad():
        for lin in model:
            lin.weight.copy_(_w24(4096, 4096, dtype=torch.float16, device="cuda"))
    x = torch.randn(4096, 4096, dtype=torch.float16, device="cuda")
    ref = model(x).float()
    report = sparsify(model, buckets=(1, 4096))
    assert report["layers"] == 2
    plan = next(iter(report["plans"].values()))
    assert set(plan["timings_us"][4096]) >= {"dense", "semi"}  # cuSPARSELt was timed for prefill
    assert set(plan["timings_us"][1]) >= {"dense", "mma", "sparse"}  # and both 2:4 kernels for decode
    for rows in (x, x[:1]):  # prefill and decode, through whichever path each picked
        want = ref[: len(rows)]
        y = model(rows).float()
        assert float((y - want).abs().max() / want.abs().max()) < 1e-2


@pytest.mark.gpu
def test_cusparselt_prefill_in_a_cuda_graph_is_timed_there_and_replays_exactly():
    """A graph bucket times cuSPARSELt from a graph (its eager calls wait on the GPU, so an eager timing is
    mostly host work); forced onto that path, a captured prefill replays new inputs like the dense model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 11008, bias=False),
                                torch.nn.Linear(11008, 4096, bias=True)).half().cuda()
    with torch.no_grad():
        for lin in model:
            lin.weight.copy_(_w24(*lin.weight.shape, dtype=torch.float16, device="cuda"))
    report = sparsify(model, buckets=(2048,), graph_buckets=(2048,))
    for plan in report["plans"].values():
        dense_us, semi_us = plan["timings_us"][2048]["dense"], plan["timings_us"][2048]["semi"]
        assert semi_us < 3 * dense_us, plan  # device time, not milliseconds of host-side planning
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 2 and all(m.semi is not None or m.plan.choice[2048] != "semi" for m in layers)
    for m in layers:  # run cuSPARSELt whatever won, so the captured path is the one under test
        m.semi = m.semi if m.semi is not None else semi_structured(m.weight.data)
        m.plan.choice[2048] = "semi"
    x = torch.zeros(2048, 4096, dtype=torch.float16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y = model(x)
    for _ in range(2):  # new prompts through the same graph
        x.copy_(torch.randn_like(x))
        graph.replay()
        with torch.no_grad():
            set_dense_only(model, True)
            ref = model(x).float()
            set_dense_only(model, False)
        assert float((y.float() - ref).abs().max() / ref.abs().max()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [17, 100, 512])
def test_cusparselt_linear_is_row_major_and_matches_dense(tokens):
    """Row-major like F.linear (the layers after it run on contiguous memory), any token count (padded)."""
    w = _w24(4096, 1024, dtype=torch.float16, device="cuda")
    bias = torch.randn(4096, dtype=torch.float16, device="cuda")
    x = torch.randn(tokens, 1024, dtype=torch.float16, device="cuda")
    y = cusparselt_linear(x, semi_structured(w), bias)
    ref = torch.nn.functional.linear(x, w, bias).float()
    assert y.shape == (tokens, 4096) and y.is_contiguous()
    assert float((y.float() - ref).abs().max() / ref.abs().max()) < 1e-2
