"""``maskpro-bench``: what 2:4 gains on this machine and what it costs in quality, as JSON, PNG and Markdown.

A thin layer: each subcommand is one module of this package (also runnable as ``python -m benchmarks.X`` from
a source checkout); bad input is one ``maskpro-bench: error: ...`` line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from maskpro.cliparse import Parser
from maskpro.errors import run_cli

from . import env

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "kernels": ("kernels", "dense vs each 2:4 path for every linear shape of a model, 1..8192 tokens"),
    "generate": ("generate", "end-to-end generation, dense vs 2:4: TTFT, time per token, tokens/s, peak memory"),
    "serve": ("serve_load", "load test of an OpenAI-compatible server: requests/s, TTFT and inter-token "
                            "latency p50/p90/p99 per concurrency"),
    "serve-compare": ("serve_compare", "load tests of the same load side by side: each server's output tokens/s "
                                       "against a baseline's per concurrency, with bars"),
    "learn": ("learn_speed", "mask-learning cost vs model size: ms/step, peak memory, MaskLLM's memory "
                             "(computed)"),
    "learn-distributed": ("learn_distributed", "data-parallel mask learning: steps/s on 1 vs N processes "
                                               "(run under torchrun), peak memory per rank, mask digests"),
    "quality": ("quality", "perplexity and zero-shot accuracy of every pruning method on a model"),
    "reward-snr": ("reward_snr", "signal per MaskPro step: two independent policy-gradient sums correlated, "
                                 "global vs block-local rewards"),
    "mask-search": ("mask_search", "SparseGPT's mask against the learner's with row-local rewards (and a greedy "
                                   "ceiling), scored by every row's exact output error"),
    "refit-ceiling": ("refit_ceiling", "a layer's error after re-fitting its kept weights: SparseGPT's mask and "
                                       "updates, exact least squares, and a mask searched for it"),
    "robustness": ("robustness", "bad files, options and requests against every command: one-line errors, "
                                 "no tracebacks, no silent successes"),
    "cpu-quick": ("cpu_quick", "the CPU recipe (maskpro prune --preset cpu-quick) against dense and SparseGPT, "
                               "with wall times"),
    "gpu-tests": ("gpu_tests", "every GPU-marked and vLLM test on this machine, recorded per test with the "
                               "commit and device"),
    "vllm-plugin": ("vllm_plugin", "vLLM with maskpro's 2:4 plugin vs vLLM dense on the same masked weights: decode "
                                   "ms/step, TTFT, greedy text equality"),
    "random-model": ("random_model", "a stand-in model at a real model's shapes (random weights, 2:4 or dense) "
                                     "for serving and soak runs"),
    "report": ("report", "Markdown summary (SUMMARY.md) and PNG plots of all results JSON"),
}

_DESCRIPTION = """\
Benchmarks for 2:4 sparsity: speed of the kernels and of generation, load on a server, the cost of learning
masks and the quality of each method. Every run writes one JSON (with device, driver, CUDA, torch and engine
versions, the command, git commit and date) and a PNG; `maskpro-bench report` turns them into SUMMARY.md.
A speedup is only reported against a dense baseline measured in the same process, and results whose
repeated runs disagree by more than --max-spread are marked "trusted": false.

On a CPU every subcommand runs with small defaults, to check the harness; the numbers that matter come
from a GPU."""

_EPILOG = """\
examples:
  maskpro-bench kernels --config llama2-7b                 # GPU: every Llama-2-7B linear shape, 1..8192 tokens
  maskpro-bench generate --config llama2-7b --batch-sizes 1 4 16 64 --prompts 128 512
  maskpro-bench serve --url http://127.0.0.1:8000/v1 --concurrency 1 4 16 --requests 64
  maskpro-bench serve --launch runs/smollm2-2of4 --concurrency 1 4      # starts maskpro-serve itself
  maskpro-bench vllm-plugin --sparse /tmp/llama2-7b-2of4 --smollm2 runs/smollm2-2of4   # GPU + vLLM 0.26.0
  maskpro-bench learn --configs smollm2 llama-1b llama2-7b:8
  maskpro-bench quality --methods dense wanda sparsegpt maskpro@sparsegpt
  maskpro-bench quality --model runs/tiny --quick           # a one-minute check on CPU
  maskpro-bench report                                      # results/*.json -> results/SUMMARY.md

Results go to benchmarks/results in a source checkout, else ./maskpro-bench-results (--out-dir / --out).
Run `maskpro-bench SUBCOMMAND --help` for the options of each."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="maskpro-bench", description=_DESCRIPTION, epilog=_EPILOG)
    sub = p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for name, (module, help_) in SUBCOMMANDS.items():
        mod = importlib.import_module(f".{module}", __package__)
        sp = sub.add_parser(name, help=help_, description=mod.__doc__.replace("``", ""))
        mod.add_arguments(sp)
        sp.set_defaults(run=mod.run)
    return p


def main(argv: list[str] | None = None, record_command: bool = True) -> int:
    """Entry point of ``maskpro-bench``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if record_command:
        env.set_command(["maskpro-bench", *argv])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_cli("maskpro-bench", lambda: a.run(a), "the rows measured so far are in the JSON")


def main_for(subcommand: str) -> int:
    """``python -m benchmarks.X ARGS`` is ``maskpro-bench X ARGS`` (recorded as the python -m command)."""
    return main([subcommand, *sys.argv[1:]], record_command=False)


if __name__ == "__main__":
    sys.exit(main())
