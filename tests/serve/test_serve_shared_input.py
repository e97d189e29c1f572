"""Fused q/k/v and gate/up: same outputs as the separate linears, one fused product per shared input."""

from __future__ import annotations

import pytest
import torch
from maskpro.serve import shared_input
from maskpro.serve.shared_input import SharedInputLinear

from maskpro.models import tiny_llama
from maskpro.nm import NM
from maskpro.oneshot import magnitude_prune


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=128, hidden=64, layers=2, intermediate=128).eval()
    magnitude_prune(model, NM(2, 4))
    return model


def test_fused_groups_match_separate_linears_and_compute_once():
    model = _model()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    groups = shared_input.fusable_groups(model, set(names))
    assert [g[-1].rsplit(".", 1)[1] for g in groups] == ["v_proj", "up_proj"] * 2
    calls = []
    for group in groups:
        fused, _ = shared_input.fuse(model, group)
        fused.register_forward_hook(lambda *_: calls.append(1))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, SharedInputLinear) and q.weight.shape == (64, 64)
    with torch.no_grad():
        out = model(ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4  # one product per group and layer, not one per member
    # a member called alone, or twice on one input, still gets its own rows
    x = torch.randn(3, 64)
    with torch.no_grad():
        k = model.model.layers[0].self_attn.k_proj
        first, again = k(x), k(x)
        torch.testing.assert_close(first, x @ k.weight.T)
        torch.testing.assert_close(again, first)


def test_members_run_their_own_dense_rows_at_prefill_sizes():
    from maskpro.serve.sparse_linear import SparseLinear

    model = _model()
    group = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    fused, members = shared_input.fuse(model, group)
    sparse = SparseLinear(fused)  # no plan: the dense weight, as the runtime's prefill buckets mostly pick
    calls = []
    sparse.register_forward_hook(lambda *_: calls.append(1))
    for m in members:
        m.fused = sparse
    with torch.no_grad():
        for tokens, fused_calls in ((8, 1), (100, 0)):  # decode sizes: one fused product; prefill: none
            calls.clear()
            x = torch.randn(tokens, 64)
            outs = [m(x) for m in members]
            assert len(calls) == fused_calls
            torch.testing.assert_close(torch.cat(outs, -1), x @ fused.weight.T)


def test_only_complete_groups_of_candidates_are_fused():
    model = _model()
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names.discard("model.layers.1.self_attn.k_proj")   # not a target (or not 2:4): layer 1's q/k/v stay apart
    groups = shared_input.fusable_groups(model, names)
    assert len(groups) == 3 and not any("layers.1.self_attn" in g[0] for g in groups)


@pytest.mark.gpu
def test_sparsify_fuses_and_matches_dense_on_gpu():
    from maskpro.serve.sparse_linear import SparseLinear, sparsify

    model = _model().half().cuda()
    ids = torch.randint(0, 128, (1, 16), device="cuda")
    with torch.no_grad():
        ref = [model(ids[:, :t]).logits.float() for t in (16, 1)]
        report = sparsify(model, buckets=(1, 16))
        assert report["fused_groups"] == 4 and report["layers"] == 14
        assert isinstance(model.model.layers[1].mlp.up_proj.fused, SparseLinear)
        for t, want in zip((16, 1), ref):
            got = model(ids[:, :t]).logits.float()
            assert float((got - want).abs().max() / want.abs().max()) < 1e-2
