"""End-to-end generation, dense vs 2:4: time to first token and decode tokens/s at batch 1.

  python -m benchmarks.generate --config llama2-7b --prompt 512 --new 128 --tag h100

Random weights at the model's real shapes (speed does not depend on the values), every decoder linear pruned
2:4 by magnitude. The same model is measured twice in one process: dense (the masked dense weights on cuBLAS),
then after ``sparsify`` (maskpro's runtime picks its 2:4 kernel or dense per shape and token count). Prefill
(TTFT) is one forward of the prompt; decode runs one token per step on a static KV cache, captured in a CUDA
graph where capture works (``decode_graph`` in the output says which). CUDA events, median of ``--reps`` runs
after warm-up. Writes ``results/generate-<tag>.json``. On CPU it runs a tiny config as a harness check.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.env import RESULTS, environment, merge_json

CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def build_model(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from maskpro.nm import NM, topn_mask

    cfg = LlamaConfig(**CONFIGS[name], max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for mod in model.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(topn_mask(mod.weight.abs(), NM(2, 4)))
    return model


class Timer:
    """CUDA events on GPU, perf_counter on CPU; returns milliseconds."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000


def measure(model, prompt_len: int, new_tokens: int, reps: int, device: str) -> dict:
    """TTFT of a prompt and per-token decode time on a static cache (CUDA-graph replay when it captures)."""
    from transformers import StaticCache

    timer = Timer(device)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    cache = StaticCache(config=cfg, max_cache_len=prompt_len + new_tokens + 8)

    def prefill():
        cache.reset()
        with torch.no_grad():
            return model(input_ids=ids, past_key_values=cache, use_cache=True,
                         cache_position=torch.arange(prompt_len, device=device)).logits

    for _ in range(2):
        prefill()
    ttft = [timer(prefill) for _ in range(reps)]
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.full((1,), prompt_len, dtype=torch.long, device=device)

    def step():
        with torch.no_grad():
            return model(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos,
                         position_ids=pos[None]).logits

    graph, run = None, step
    if device == "cuda":
        prefill()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
        except Exception as e:  # noqa: BLE001 - record why and time eager decode instead
            graph, run = None, step
            print(f"decode graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing eager decode")
            torch.cuda.synchronize()
    per_token = []
    for _ in range(reps):
        prefill()
        pos.fill_(prompt_len)

        def decode():
            for _ in range(new_tokens):
                run()
                pos.add_(1)

        per_token.append(timer(decode) / new_tokens)
    med = statistics.median(per_token)
    return {"ttft_ms": statistics.median(ttft), "ms_per_token": med, "decode_tokens_per_s": 1000 / med,
            "decode_graph": graph is not None, "ttft_spread_ms": [min(ttft), max(ttft)],
            "ms_per_token_spread": [min(per_token), max(per_token)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, choices=list(CONFIGS), help="default: llama2-7b on GPU, tiny on CPU")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--tag", default=None)
    p.add_argument("--out", default=None, help="write here instead of results/generate-<tag>.json")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = a.config or ("llama2-7b" if device == "cuda" else "tiny")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype if device == "cuda" else "fp32"]
    model = build_model(name, device, dtype)
    dense = measure(model, a.prompt, a.new, a.reps, device)
    print("dense", dense, flush=True)
    from maskpro.serve.sparse_linear import sparsify

    report = sparsify(model, buckets=tuple(sorted({1, a.prompt})))
    sparse = measure(model, a.prompt, a.new, a.reps, device)
    print("sparse", sparse, flush=True)
    out = {"device": environment()["device"], "model": f"{name} (random weights, decoder linears 2:4)",
           "dtype": str(dtype).removeprefix("torch."), "batch": 1, "prompt_tokens": a.prompt, "new_tokens": a.new,
           "decode_tokens_per_s": {"dense": dense["decode_tokens_per_s"], "sparse": sparse["decode_tokens_per_s"]},
           "ttft_ms": {"dense": dense["ttft_ms"], "sparse": sparse["ttft_ms"]},
           "decode_speedup": sparse["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
           "detail": {"dense": dense, "sparse": sparse},
           "runtime": {k: v for k, v in report.items() if k != "plans"}, "env": environment()}
    tag = a.tag or ("h100" if device == "cuda" else "cpu-harness")
    merge_json(Path(a.out) if a.out else RESULTS / f"generate-{tag}.json", out)


if __name__ == "__main__":
    main()
