"""vLLM's dense decode and time to first token at a model's shapes: the baseline a 2:4 model must beat.

Run as its own process (``python -m maskpro.bench.vllm_dense``) by ``maskpro-bench generate --vllm`` before the
maskpro variants load, so vLLM's memory is released when they start, and twice by ``maskpro-bench vllm-plugin``
(``--model`` dense, then with ``--quantization maskpro``); prints one JSON line.

vLLM runs in its default mode (torch.compile and CUDA graphs; ``--enforce-eager`` turns both off) on weights it
initialises itself (``load_format="dummy"``: speed does not depend on the values) from a config.json at the
given shapes, or on a folder's real weights (``--model``), with prefix caching off so no repetition reuses an
earlier prompt's cache. Each repetition draws new random prompt token ids. Time to first token is the wall
time of ``generate`` with one output token; a decode step is the wall time of ``generate`` with ``new + 1``
tokens minus that, over ``new``: both are what a caller of the engine waits, host scheduling included, as
maskpro's own timings are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def measure(config_dir: str, points: list[tuple[int, int]], new: int, reps: int, dtype: str,
            real_weights: bool = False, quantization: str | None = None, enforce_eager: bool = False) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import vllm

    t0 = time.perf_counter()
    llm = LLM(model=config_dir, load_format="auto" if real_weights else "dummy", quantization=quantization,
              dtype=dtype, max_model_len=max(p for _, p in points) + new + 16,
              skip_tokenizer_init=True, enable_prefix_caching=False, max_num_seqs=max(b for b, _ in points),
              gpu_memory_utilization=0.85, seed=0, enforce_eager=enforce_eager)
    startup_s = time.perf_counter() - t0
    first = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    whole = SamplingParams(max_tokens=new + 1, ignore_eos=True, temperature=0.0, detokenize=False)
    gen = torch.Generator().manual_seed(0)
    vocab = json.load(open(os.path.join(config_dir, "config.json")))["vocab_size"]

    def batch_of(b: int, p: int) -> list:
        return [TokensPrompt(prompt_token_ids=torch.randint(0, vocab, (p,), generator=gen).tolist())
                for _ in range(b)]

    def wall(b: int, p: int, params) -> float:
        inputs = batch_of(b, p)
        t0 = time.perf_counter()
        out = llm.generate(inputs, params, use_tqdm=False)
        dt = (time.perf_counter() - t0) * 1000
        assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in out)
        return dt

    rows = []
    for b, p in points:
        for _ in range(1):  # warm-up: graphs for this batch, the allocator
            wall(b, p, first)
            wall(b, p, whole)
        ttft = [wall(b, p, first) for _ in range(reps)]
        total = [wall(b, p, whole) for _ in range(reps)]
        t, w = statistics.median(ttft), statistics.median(total)
        rows.append({"batch": b, "prompt": p, "ttft_ms": t, "decode_ms": (w - t) / new,
                     "ttft_ms_all": ttft, "total_ms_all": total})
        print(f"vllm {quantization or 'dense'} batch {b} prompt {p}: ttft {t:.2f} ms, "
              f"decode {(w - t) / new:.3f} ms/step", file=sys.stderr, flush=True)
    mode = "eager (--enforce-eager)" if enforce_eager else "default (torch.compile + CUDA graphs)"
    return {"vllm": vllm.__version__, "mode": mode, "cuda_graphs": not enforce_eager, "quantization": quantization,
            "weights": config_dir if real_weights else "dummy", "startup_s": startup_s,
            "weights_gib": _weights_gib(llm), "rows": rows}


def _tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _weights_gib(llm) -> float | None:
    """GiB of the model's parameters and buffers in the engine's worker (LLM.apply_model; None where this vLLM
    cannot ship the function to its worker process)."""
    try:
        sizes = llm.apply_model(_tensor_bytes)
        return sizes[0] / 2**30
    except Exception:  # noqa: BLE001 - an engine layout this vLLM does not expose: report nothing
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="llama2-7b", help="model shapes (maskpro-bench configs)")
    p.add_argument("--points", nargs="+", default=["1:512", "4:512", "16:512"], help="BATCH:PROMPT pairs")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--model", default=None, help="a model folder to load with its real weights (default: dummy "
                                                 "weights at --config's shapes)")
    p.add_argument("--quantization", default=None, help="vLLM quantization method, e.g. maskpro (the plugin)")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile or CUDA graphs")
    a = p.parse_args()
    from maskpro.errors import run_cli

    from .configs import resolve
    from .generate_fast import parse_points

    def body() -> None:
        points = parse_points(a.points)
        if a.model:
            out = measure(a.model, points, a.new, a.reps, a.dtype, real_weights=True, quantization=a.quantization,
                          enforce_eager=a.enforce_eager)
        else:
            with tempfile.TemporaryDirectory() as d:
                shape = resolve(a.config)
                shape.llama_config(max_position_embeddings=max(p for _, p in points) + a.new + 64).save_pretrained(d)
                out = measure(d, points, a.new, a.reps, a.dtype, quantization=a.quantization,
                              enforce_eager=a.enforce_eager)
        print(json.dumps(out))
    return run_cli("vllm_dense", body, "nothing measured")


if __name__ == "__main__":
    sys.exit(main())
