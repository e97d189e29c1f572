"""Lean mode's fused Triton kernels against the eager policy math, on the kernels' own noise.

On CPU they run in Triton's interpreter (a subprocess, since the interpreter is chosen at import), wired into a
real lean-mode learner; on a GPU the compiled kernels are checked the same way and must be the path taken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' brings it on Linux)")

CHECK = r"""
import json, sys, torch
from maskpro import lean_kernels as lk, policy
from maskpro.learner import LearnerConfig, MaskProLearner
from maskpro.learner_modes import layer_seed, updated
from maskpro.models import find_linears, tiny_llama
from maskpro.nm import NM
from maskpro.oneshot import prune

dev = sys.argv[1]
torch.manual_seed(0)
out = {"cases": []}
for g, m, seed in [(1000, 4, 987654321), (77, 8, 2 ** 64 - 12345), (300, 4, 0)]:
    theta = (torch.randn(g, m) * 3).to(dev)
    u = lk.noise((g, m), seed, dev)
    ref = policy.sample_from_uniform(theta, u, 2)
    w = torch.randn(g * m, device=dev).half()
    drawn = lk.draw(theta, w, seed, 2)
    adv = torch.tensor(-0.7, device=dev)
    moved = theta.clone()
    lk.update_(moved, adv, seed)
    out["cases"].append({"draw_equal": bool(torch.equal(drawn, w * ref.view(-1).half())),
                         "strict": bool((ref.sum(1) == 2).all()),
                         "update_err": float((moved - updated(theta, ref, adv, 2)).abs().max()),
                         "u_mean": float(u.mean()), "u_min": float(u.min()), "u_max": float(u.max()),
                         "other_seed_same": bool(torch.equal(u, lk.noise((g, m), seed + 1, dev)))})

# Wired into a real lean learner: the weight the model reads and the update of one layer at one step.
prior = prune(tiny_llama(), "magnitude", NM(2, 4)).masks
model = tiny_llama().to(dev)
rows = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0)).to(dev)
cfg = LearnerConfig(steps=4, batch_size=4, lr=300.0, scale=3.0, memory="lean", seed=5)
learner = MaskProLearner(model, find_linears(model), prior, rows, cfg, progress=False)
mode = learner.mode
if mode.kernels is None:   # on CPU the learner keeps the eager path; the interpreter runs the kernels anyway
    mode.kernels = lk
out["fused_by_default"] = dev == "cuda" and learner.mode.kernels is lk
learner.run(resume=False)
i, step = 3, 9
theta0 = mode.thetas[i].clone()
mode.sample(step)
u = lk.noise(theta0.shape, layer_seed(5, step, i), dev)
ref = policy.sample_from_uniform(theta0, u, 2)
module = mode.modules[i]
src = module.parametrizations.weight.original
out["layer_draw_equal"] = bool(torch.equal(module.weight, src * ref.view(src.shape).to(src.dtype)))
adv = torch.tensor(2.5, device=dev)
mode.update(adv, step)
out["layer_update_err"] = float((mode.thetas[i] - updated(theta0, ref, adv, 2)).abs().max())
out["final_strict"] = all(bool((mk.reshape(-1, 4).sum(1) == 2).all()) for mk in learner.final_masks().values())
print(json.dumps(out))
"""


def _check(device: str, env: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", CHECK, device], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_matches(out: dict) -> None:
    for case in out["cases"]:
        assert case["draw_equal"] and case["strict"], case
        assert case["update_err"] < 1e-3, case  # logits up to ~10: fp32 rounding and the GPU's fast exp
        assert 0.49 < case["u_mean"] < 0.51 and case["u_min"] < 0.01 and case["u_max"] > 0.99, case
        assert not case["other_seed_same"], case
    assert out["layer_draw_equal"] and out["final_strict"], out
    assert out["layer_update_err"] < 1e-4, out


def test_kernels_match_the_policy_math_in_the_interpreter():
    out = _check("cpu", {**os.environ, "TRITON_INTERPRET": "1"})
    _assert_matches(out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
def test_compiled_kernels_match_and_are_the_lean_path_on_gpu():
    out = _check("cuda", {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    _assert_matches(out)
    assert out["fused_by_default"], "a lean learner on a GPU must draw with the fused kernels"
