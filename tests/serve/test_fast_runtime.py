"""The fast Llama-family runtime: its decoder against transformers, its kernels in Triton's interpreter, its op
under ``opcheck``, and (GPU) the compiled, graph-replayed decoder against the eager one and transformers."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from maskpro.bench.configs import prune_24_
from maskpro.serve.fast_model import FastLM
from maskpro.serve.slot_cache import SlotCache

CUDA = torch.cuda.is_available()


def _tiny(kind: str, dtype: torch.dtype, hidden: int = 128, inter: int = 256, device: str = "cpu", layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config, model = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    cfg = config(vocab_size=300, hidden_size=hidden, intermediate_size=inter,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_hidden_layers=layers,
                 tie_word_embeddings=kind == "llama")
    m = model(cfg).eval()
    if kind == "qwen2":  # q/k/v biases: make them matter
        for layer in m.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(p.bias, std=0.5)
    prune_24_(m)
    return m.to(device=device, dtype=dtype)


def _cache(m, slots: int, capacity: int, device="cpu") -> SlotCache:
    c = m.config
    return SlotCache(c.num_hidden_layers, slots, capacity, c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
                     m.dtype, torch.device(device))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("sparse", [False, True])
def test_prefill_and_decode_match_transformers(kind, sparse):
    dtype = torch.bfloat16 if sparse else torch.float32   # the compressed layout holds 16-bit values
    ref = _tiny(kind, dtype)
    fast = FastLM.from_hf(copy.deepcopy(ref), capacity=64, sparse=sparse)
    assert bool(fast.layers24[0]) == sparse and not fast.fallbacks
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    lens = [12, 7, 9]
    prompts = ids.clone()
    for i, n in enumerate(lens):
        prompts[i, n:] = 0  # right padding must not reach the real tokens
    cache = _cache(ref, 4, 64)
    seqs = [ids[i, :n].tolist() for i, n in enumerate(lens)]
    tol = 3e-2 if sparse else 1e-4
    with torch.no_grad():
        logits = fast.prefill(prompts, torch.tensor([n - 1 for n in lens]), torch.tensor([1, 2, 3]), cache.keys,
                              cache.values)
        for i in range(3):
            assert (logits[i] - ref(torch.tensor([seqs[i]])).logits[0, -1].float()).abs().max() < tol
        # slot 0 is another request's: decode rows must be slots 0..B-1, so move the prefilled rows down
        cache.keep([1, 2, 3], 64)
        tok, pos = logits.argmax(-1), torch.tensor(lens)
        for _ in range(3):
            for i in range(3):
                seqs[i].append(int(tok[i]))
            out = fast.decode(tok, torch.arange(3), pos, cache.keys, cache.values)
            for i in range(3):
                assert (out[i] - ref(torch.tensor([seqs[i]])).logits[0, -1].float()).abs().max() < tol
            tok, pos = out.argmax(-1), pos + 1


def test_sparse_weights_are_held_compressed_only():
    ref = _tiny("llama", torch.bfloat16)
    dense = FastLM.from_hf(copy.deepcopy(ref), capacity=32, sparse=False).weight_bytes()
    sparse = FastLM.from_hf(copy.deepcopy(ref), capacity=32, sparse=True).weight_bytes()
    linears = sum(m.weight.numel() * 2 for n, m in ref.named_modules()
                  if isinstance(m, torch.nn.Linear) and "layers" in n)
    # compressed linears are 9/16 of their dense bytes; the rest (embedding, norms) is unchanged
    assert sparse == pytest.approx(dense - linears * 7 / 16, rel=1e-6)


def test_layers_the_kernel_cannot_tile_stay_dense_and_say_why(caplog):
    ref = _tiny("llama", torch.bfloat16, hidden=96, inter=256)   # 96 input features: not a multiple of 128
    with caplog.at_level(logging.WARNING, logger="maskpro.serve.fast_model"):
        fast = FastLM.from_hf(copy.deepcopy(ref), capacity=32, sparse=True)
    assert set(fast.fallbacks) == {"qkv", "o", "gate_up"} and "in % 128" in fast.fallbacks["qkv"]
    assert set(fast.layers24[0]) == {"down"}   # 256 inputs: still compressed
    assert sum("stays dense" in r.message for r in caplog.records) == 3   # once per kind, not per layer


def test_other_families_are_refused_with_the_fix():
    from transformers import GPT2Config, GPT2LMHeadModel

    from maskpro.errors import MaskproError

    with pytest.raises(MaskproError, match="--runtime transformers"):
        FastLM.from_hf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), capacity=16)


def test_the_op_passes_opcheck_on_cpu():
    from maskpro.nm import NM, topn_mask
    from maskpro.serve.sparse_ops import Weight24

    w = torch.randn(32, 128)
    w = (w * topn_mask(w.abs(), NM(2, 4))).to(torch.bfloat16)
    layer = Weight24(w)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.maskpro.sp24_mm, (x, layer.tiles, layer.positions, 32, *layer.args_for(5)))
    assert torch.allclose(layer(x).float(), (x.float() @ w.float().T), rtol=2e-2, atol=2e-2)


INTERPRETED = r"""
import json, torch
from maskpro.serve import decode_attention as da, rmsnorm, rotary, sparse_ops, sparse_mma
from maskpro.serve.sparse24 import compress_24
from maskpro.nm import NM, topn_mask
torch.manual_seed(0)
out = {"expand": [], "attention": [], "rotated": []}
for n, k in [(16, 128), (48, 256), (32, 384)]:
    for dt in (torch.float16, torch.bfloat16):
        w = torch.randn(n, k); w = (w * topn_mask(w.abs(), NM(2, 4))).to(dt)
        tiles, pos = sparse_mma.mma_layout(*compress_24(w))
        y = torch.empty(n, k, dtype=dt)
        sparse_ops._expand_kernel[(n // 16, k // 128)](tiles, pos, y, k, k // 32, k // 128)
        out["expand"].append(bool(torch.equal(y, w)))
# (rows, heads, kv heads, head dim, capacity, lengths, splits): GQA groups of 2, 1 and 7 (padded to 16),
# chunks past a row's length, a partial last step, one chunk
for b, h, kvh, d, cap, lens, splits in [(3, 4, 2, 32, 80, [1, 37, 80], 3), (2, 8, 8, 64, 64, [64, 5], 1),
                                        (1, 7, 1, 16, 40, [33], 2)]:
    q = torch.randn(b, h, d, dtype=torch.float16)
    kc = torch.randn(b + 1, kvh, cap, d, dtype=torch.float16)
    vc = torch.randn(b + 1, kvh, cap, d, dtype=torch.float16)
    lengths = torch.tensor(lens)
    ref = da.reference(q.float(), kc.float(), vc.float(), lengths, d ** -0.5)
    got = da._launch(q, kc, vc, lengths, d ** -0.5, splits)
    out["attention"].append(float((got.float() - ref).abs().max() / ref.abs().max()))
    # the query rotated inside the kernel, each row at its own position (cos/sin as the decoder passes them),
    # read from a strided view as the decoder's q is (a slice of the fused q/k/v product)
    q = torch.cat([q.reshape(b, -1), torch.randn(b, 2 * d).half()], 1)[:, :h * d].view(b, h, d)
    angle = torch.rand(b, 1, d) * 6.3
    cos, sin = angle.cos().half(), angle.sin().half()
    ref = da.reference(rotary.rotate(q.float(), cos.float(), sin.float()), kc.float(), vc.float(), lengths,
                       d ** -0.5)
    got = da._launch(q, kc, vc, lengths, d ** -0.5, splits, cos, sin)
    out["rotated"].append(float((got.float() - ref).abs().max() / ref.abs().max()))
# the residual add and RMSNorm of a decode block: a 7B row, SmolLM2's (576, padded to 1024) in bf16, a short one
out["norm"] = []
for rows, n, dt in [(1, 4096, torch.float16), (3, 576, torch.bfloat16), (2, 100, torch.float16)]:
    x, y = torch.randn(rows, n).to(dt), torch.randn(rows, n).to(dt)
    w = (torch.rand(n) + 0.5).to(dt)
    s, h = rmsnorm._launch(x, y, w, 1e-5)
    want_s, want_h = rmsnorm.add_rms_norm_reference(x, y, w, 1e-5)
    out["norm"].append([float(((s.float() - want_s.float()).abs() / want_s.float().abs().clamp(min=1e-3)).max()),
                        float((h.float() - want_h.float()).abs().max() / want_h.float().abs().max())])
print(json.dumps(out))
"""


def test_expand_and_attention_kernels_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' brings it on Linux)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["expand"] == [True] * 6          # bit-exact: the same values, put back in place
    assert len(out["attention"]) == 3 and max(out["attention"]) < 5e-3, out["attention"]
    assert len(out["rotated"]) == 3 and max(out["rotated"]) < 5e-3, out["rotated"]
    # the sum rounds as the eager add does: fp16 exactly; bf16 within one step (the interpreter truncates bf16)
    assert out["norm"][0][0] == out["norm"][2][0] == 0 and out["norm"][1][0] <= 2 ** -7, out["norm"]
    assert out["norm"][0][1] == out["norm"][2][1] == 0 and out["norm"][1][1] < 3e-2, out["norm"]  # the normed row


# ------------------------------------------------------------------------------------------------- GPU
def _layer_input_reference(n: int, k: int, tokens: int):
    """A random fp16 2:4 layer (compressed), an input of ``tokens`` tokens and the dense fp32 product."""
    from maskpro.nm import NM, topn_mask
    from maskpro.serve.sparse_ops import Weight24

    w = torch.randn(n, k, device="cuda")
    w = (w * topn_mask(w.abs(), NM(2, 4))).half()
    x = torch.randn(tokens, k, device="cuda", dtype=torch.half)
    return Weight24(w), x, x.float() @ w.float().T


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 5, 16, 64, 100, 300])
def test_gpu_op_matches_dense_at_every_token_count(tokens):
    layer, x, ref = _layer_input_reference(512, 1024, tokens)
    err = (layer(x).float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-3, f"{tokens} tokens: relative error {err:.2e}"


def test_medium_batch_gemm_configs_fit_the_layer_and_the_gpu():
    """The configs a decode bucket of 16-64 tokens times: one block of tokens as small as the count allows, K
    split over at most in/128 blocks and only as far as about four blocks per multiprocessor."""
    from maskpro.serve import sparse_gemm

    for tokens, bn in ((16, 16), (17, 32), (32, 32), (64, 64)):
        assert {c.bn for c in sparse_gemm.medium_candidates(4096, 4096, tokens, 132)} == {bn}
    wide = sparse_gemm.medium_candidates(22016, 4096, 64, 132)     # 172 blocks of 128 rows: no 4-way split
    assert max(c.split for c in wide if c.bm == 128) == 2 and max(c.split for c in wide) == 2
    assert all(c.shared_bytes <= sparse_gemm.MAX_SHARED // 2 for c in wide)   # two blocks per multiprocessor
    assert max(c.split for c in sparse_gemm.medium_candidates(4096, 256, 64, 132)) == 2  # two K groups
    assert sparse_gemm.medium_candidates(4000, 4096, 64, 132) == []
    # the untimed default: the plans' pick at 64 tokens on an H100 (132 multiprocessors) for each 7B shape
    assert [sparse_gemm.medium_default(n, k, 64, 132).split for n, k in
            ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))] == [4, 4, 2, 4]
    assert sparse_gemm.medium_default(4000, 4096, 64, 132) is None
    with pytest.raises(ValueError, match="at most 128 rows"):
        sparse_gemm.GemmConfig(wm=8, mt=2)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 33, 64, 200, 512])
def test_gpu_gemm_kernel_matches_dense_in_every_config(tokens):
    """Prefill configs at every size, and the medium-batch ones (K split over up to 8 blocks, 1152 = 9 K
    groups so the splits are uneven) at every size too: past one block of tokens they run unsplit."""
    from maskpro.serve import sparse_gemm

    layer, x, ref = _layer_input_reference(256, 1152, tokens)
    medium = sparse_gemm.medium_candidates(256, 1152, min(tokens, 64), sms=64)
    assert {c.split for c in medium} == set(sparse_gemm.MEDIUM_SPLITS)
    for cfg in sparse_gemm.GEMM_CANDIDATES + medium:
        for _ in range(2):  # the second call finds the split-K counters the first one left (reset to zero)
            y = sparse_gemm.sparse_gemm(x, layer.tiles, layer.positions, 256, cfg)
            err = (y.float() - ref).abs().max() / ref.abs().max()
            assert err < 2e-3, f"{cfg} at {tokens} tokens: relative error {err:.2e}"


@pytest.mark.gpu
def test_gpu_attention_kernel_matches_reference():
    from maskpro.serve import decode_attention as da, rotary

    for b, h, kvh, cap, lens in [(1, 32, 32, 640, [600]), (4, 32, 8, 2048, [1, 700, 2048, 33])]:
        q = torch.randn(b, h, 128, device="cuda", dtype=torch.half)
        kc = torch.randn(b, kvh, cap, 128, device="cuda", dtype=torch.half)
        vc = torch.randn_like(kc)
        lengths = torch.tensor(lens, device="cuda")
        splits = da.splits_for(b, kvh, cap, torch.cuda.get_device_properties(0).multi_processor_count)
        angle = torch.rand(b, 1, 128, device="cuda") * 6.3
        cos, sin = angle.cos().half(), angle.sin().half()
        rotated = rotary.rotate(q.float(), cos.float(), sin.float())
        for chunks in (splits, 1):    # merged by the merge kernel; one chunk, normalised in place
            got = da.decode_attention(q, kc, vc, lengths, chunks)
            ref = da.reference(q, kc, vc, lengths, 128 ** -0.5)
            assert (got.float() - ref.float()).abs().max() < 2e-3, chunks
            got = da.decode_attention(q, kc, vc, lengths, chunks, cos=cos, sin=sin)
            ref = da.reference(rotated, kc, vc, lengths, 128 ** -0.5)
            assert (got.float() - ref.float()).abs().max() < 2e-3, f"rotated, {chunks} chunks"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_add_rms_norm_kernel_matches_the_eager_add_and_norm(dtype):
    from maskpro.serve import rmsnorm

    for rows, n in ((1, 4096), (64, 4096), (3, 576)):
        x, y = (torch.randn(rows, n, device="cuda").to(dtype) for _ in range(2))
        w = (torch.rand(n, device="cuda") + 0.5).to(dtype)
        s, h = rmsnorm.add_rms_norm(x, y, w, 1e-5)
        want_s, want_h = rmsnorm.add_rms_norm_reference(x, y, w, 1e-5)
        assert torch.equal(s, want_s), f"{rows}x{n}: the sum is not the eager add's"
        err = (h.float() - want_h.float()).abs().max() / want_h.float().abs().max()
        assert err < 1e-2, f"{rows}x{n}: normed row off by {err:.2e}"


@pytest.mark.gpu
def test_gpu_prefill_expanding_one_block_ahead_matches_in_place_eagerly_and_in_a_graph():
    """Three blocks, so a buffer set is refilled while the other is read; 4 x 40 tokens, past the decode
    kernels' range. The side stream's expansions must be ordered before their readers, in a graph too."""
    ref = _tiny("llama", torch.float16, hidden=256, inter=512, device="cuda", layers=3)
    assert FastLM.from_hf(copy.deepcopy(ref), capacity=64, sparse=True, expand_ahead=False).expand_ahead is None
    fast = FastLM.from_hf(copy.deepcopy(ref), capacity=64, sparse=True)   # the default
    assert fast.expand_ahead is not None and fast.expand_ahead.nbytes() > 0
    ids = torch.randint(0, 300, (4, 40), generator=torch.Generator().manual_seed(3)).cuda()
    last, slots = torch.full((4,), 39, device="cuda"), torch.arange(4, device="cuda")
    cache = _cache(ref, 4, 64, "cuda")
    with torch.no_grad():
        fast.expand_ahead.enabled = False
        in_place = fast.prefill(ids, last, slots, cache.keys, cache.values)
        fast.expand_ahead.enabled = True
        ahead = fast.prefill(ids, last, slots, cache.keys, cache.values)
        assert (ahead - in_place).abs().max() <= 1e-2 * in_place.abs().max()
        want = ref(ids).logits[:, -1].float()
        assert (ahead - want).abs().max() <= 3e-2 * want.abs().max()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fast.prefill(ids, last, slots, cache.keys, cache.values)   # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fast.prefill(ids, last, slots, cache.keys, cache.values)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert (captured - ahead).abs().max() <= 1e-3 * ahead.abs().max()  # cuBLAS may pick another algorithm


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_compiled_graph_decoder_generates_what_transformers_does(sparse, tmp_path, monkeypatch):
    from maskpro.serve.fast_decoder import FastDecoder

    monkeypatch.setenv("MASKPRO_COMPILE_CACHE", str(tmp_path / "inductor"))
    ref = _tiny("qwen2", torch.float16, hidden=256, inter=512, device="cuda")
    ref.lm_head.weight.data *= 30  # wide logit margins: fp16 rounding in either model cannot flip a greedy pick
    fast = FastLM.from_hf(copy.deepcopy(ref), capacity=128, sparse=sparse)
    plan = fast.plan([1, 2]) if sparse else {}
    assert len(plan) == (4 if sparse else 0)
    dec = FastDecoder(fast, _cache(ref, 4, 128, "cuda"), graphs=True)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    with torch.no_grad():
        expected = [ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, do_sample=False)[0, len(p):]
                    .tolist() for p in prompts]
        for _ in range(2):  # the second run replays the captured prefill and steps
            tok, pos, got = dec.prefill(prompts, 0, 0).argmax(-1), [len(p) for p in prompts], [[], []]
            for _ in range(12):
                for i in range(2):
                    got[i].append(int(tok[i]))
                tok = dec.step(tok, pos).argmax(-1)
                pos = [q + 1 for q in pos]
            assert got == expected
    assert dec.compiled and dec.captured >= 1 and dec.prefills_captured >= 1 and dec.compile_s > 0


def test_engine_runtime_option_is_checked_and_auto_stays_transformers_on_cpu(tiny_model_dir):
    from maskpro.errors import MaskproError
    from maskpro.serve.config import EngineConfig
    from maskpro.serve.engine import TorchEngine

    with pytest.raises(MaskproError, match="unknown runtime 'turbo'"):
        EngineConfig(model=str(tiny_model_dir), runtime="turbo").validate()
    with pytest.raises(MaskproError, match="drop kv_cache=dynamic"):
        EngineConfig(model=str(tiny_model_dir), runtime="fast", kv_cache="dynamic").validate()
    assert TorchEngine(EngineConfig(model=str(tiny_model_dir), device="cpu")).runtime == "transformers"


def test_engine_on_the_fast_runtime_batches_and_matches_transformers(tiny_model_dir):
    """The engine's glue for the fast decoder (eager on CPU): greedy text equal to transformers' own generate for
    every request, six requests sharing four slots."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maskpro.serve.config import EngineConfig
    from maskpro.serve.engine import TorchEngine
    from maskpro.serve.protocol import SamplingParams

    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived a",
               "def fibonacci(n):", "1, 2, 3, 4,", "Water boils at", "The quick brown fox jumps over the lazy dog."]
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ref_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    refs = {}
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = ref_model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        refs[p] = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    engine = TorchEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="fp32", runtime="fast",
                                      max_batch_size=4, max_prompt_tokens=40, max_new_tokens=40))
    assert engine.runtime == "fast" and engine.kv_cache["runtime"] == "fast"
    engine.start()
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        handles = [engine.submit(engine.encode_prompt(p), params, loop=None) for p in prompts]
        assert [h.result().text for h in handles] == [refs[p] for p in prompts]
        assert engine.info()["sparsity"]["backend"].startswith("fast")
    finally:
        engine.stop()
