"""Data-parallel MaskPro and one-shot calibration over torch.distributed: 2 CPU processes with gloo.

The module runs itself under ``python -m torch.distributed.run`` (see ``__main__`` at the end): launch "a"
learns in fast and lean mode, prunes with SparseGPT, then starts a checkpointed run that rank 1 kills with
SIGKILL in the middle of a step; launch "b" resumes that run. The references are computed here in one
process. Two processes with B rows each must equal one process running the same 2B rows as two micro-batches
of B: same masks and bit-identical logits (the all-reduce of two losses is an exact sum).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskpro import distributed
from maskpro.errors import MaskproError
from maskpro.learner import LearnerConfig, MaskProLearner
from maskpro.models import find_linears, tiny_llama
from maskpro.nm import NM, check_weight
from maskpro.oneshot import prune

ROWS = torch.randint(0, 256, (32, 24), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
GLOBAL, WORLD, KILL_AT = 8, 2, 6


def _cfg(memory: str, steps: int = 16, **kw) -> LearnerConfig:
    return LearnerConfig(steps=steps, batch_size=GLOBAL, lr=300.0, scale=3.0, checkpoint_every=4, memory=memory, **kw)


def _learn(cfg: LearnerConfig, workdir: Path | None = None, kill_at: int | None = None, stop_after=None) -> dict:
    prior = prune(tiny_llama(), "magnitude", NM(2, 4)).masks
    model = tiny_llama()
    learner = MaskProLearner(model, find_linears(model), prior, ROWS, cfg, workdir=workdir, progress=False)
    if kill_at is not None:  # a real kill: rank 1 dies inside step kill_at + 1, after the checkpoint at 4
        def die(*_):
            if learner.step == kill_at and distributed.current().rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        model.register_forward_pre_hook(die)
    res = learner.run(resume=True, stop_after=stop_after)
    return {"masks": res.masks, "logits": {k: v.cpu().clone() for k, v in learner.logits().items()},
            "residuals": res.residuals, "prior": prior, "state_bytes": learner.state_bytes()}


def _sparsegpt() -> dict:
    model = tiny_llama()
    res = prune(model, "sparsegpt", NM(2, 4), CALIB, batch=4, progress=False)
    return {"masks": res.masks, "weights": {n: m.weight.detach().clone() for n, m in find_linears(model).items()}}


def _non_finite_on_rank_1() -> list[bool]:
    """Rank 1's loss overflows: the sum carries it to every rank, and every rank skips the same updates."""
    prior = prune(tiny_llama(), "magnitude", NM(2, 4)).masks
    model = tiny_llama()
    learner = MaskProLearner(model, find_linears(model), prior, ROWS, _cfg("fast"), progress=False)
    learner.prepare(resume=False)
    if distributed.current().rank == 1:
        model.lm_head.register_forward_hook(lambda _m, _a, logits: logits * float("inf"))
    before = learner.theta.clone()
    for _ in range(2):
        learner.train_step()
    got: list = [None] * WORLD
    torch.distributed.all_gather_object(got, torch.equal(learner.theta, before) and bool(torch.isfinite(learner.delta)))
    return got


def _worker(out: Path, phase: str) -> None:
    group = distributed.init_from_env("cpu")
    torch.set_num_threads(1)
    assert group.world_size == WORLD and group.device.type == "cpu"
    if phase == "a":
        results = {"fast": _learn(_cfg("fast")), "lean": _learn(_cfg("lean")), "sparsegpt": _sparsegpt(),
                   "non_finite_skipped": _non_finite_on_rank_1()}
        if group.is_main:
            torch.save(results, out / "a.pt")
        distributed.barrier()
        _learn(_cfg("fast"), out / "work", kill_at=KILL_AT)
        raise SystemExit("rank 1 should have been killed")
    res = _learn(_cfg("fast"), out / "work")
    if group.is_main:
        torch.save(res, out / "b.pt")
    distributed.shutdown()


# -------------------------------------------------------------------------------------------------- tests

def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(WORLD), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    a = _torchrun([__file__, str(out), "a"])
    assert (out / "a.pt").is_file(), a.stdout[-3000:] + a.stderr[-3000:]
    assert a.returncode != 0, "the killed run should have failed the launch"
    from maskpro.checkpoint import load_tensors
    killed_at = int(load_tensors(out / "work" / "learner-state.safetensors")[1]["step"])
    b = _torchrun([__file__, str(out), "b"])
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    return {**torch.load(out / "a.pt", weights_only=False), "resumed": torch.load(out / "b.pt", weights_only=False),
            "killed_at": killed_at}


@pytest.fixture(scope="module")
def single() -> dict:
    """One process, the same global batch run as WORLD micro-batches (1 thread, like each rank)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {m: _learn(_cfg(m, micro_batch=GLOBAL // WORLD)) for m in ("fast", "lean")}
    finally:
        torch.set_num_threads(threads)


def _same(a: dict, b: dict) -> None:
    assert a["masks"].keys() == b["masks"].keys()
    assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])
    assert all(torch.equal(a["logits"][k], b["logits"][k]) for k in a["logits"])
    assert a["residuals"] == b["residuals"]


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_two_processes_equal_one_process_at_the_same_global_batch(launched, single, memory):
    _same(launched[memory], single[memory])
    res = single[memory]
    assert sum(int((res["masks"][n] != res["prior"][n]).sum()) for n in res["prior"]) > 100  # masks moved
    for n, m in res["masks"].items():
        assert check_weight(m.float(), NM(2, 4), n, strict=False) == []


def test_a_non_finite_loss_on_one_rank_skips_the_update_on_every_rank(launched):
    assert launched["non_finite_skipped"] == [True] * WORLD


def test_distributed_run_killed_mid_step_resumes_to_the_uninterrupted_result(launched):
    assert launched["killed_at"] == 4  # the kill landed between the checkpoints at 4 and 8
    _same(launched["resumed"], launched["fast"])


def test_lean_mode_resumes_after_an_interruption(tmp_path, single):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _learn(_cfg("lean", micro_batch=GLOBAL // WORLD), tmp_path, stop_after=7)
        _same(_learn(_cfg("lean", micro_batch=GLOBAL // WORLD), tmp_path), single["lean"])
    finally:
        torch.set_num_threads(threads)


def test_lean_mode_keeps_only_the_logits_beside_the_model(single):
    """Lean: 4 B of fp32 logits per weight plus O(steps + minibatches) floats; fast: 17 B per fp32 weight."""
    n_weights = sum(m.numel() for m in single["lean"]["masks"].values())
    scalars = 4 * (ROWS.shape[0] // GLOBAL + 2 + 2 * 16)   # base, delta, var, residuals, losses
    assert single["lean"]["state_bytes"] == 4 * n_weights + scalars
    assert single["fast"]["state_bytes"] == (4 + 4 + 4 + 4 + 1) * n_weights + scalars


def test_sparsegpt_over_two_processes_equals_one_process(launched):
    ref = _sparsegpt()
    dist = launched["sparsegpt"]
    assert all(torch.equal(ref["masks"][n], dist["masks"][n]) for n in ref["masks"])
    for n in ref["weights"]:
        torch.testing.assert_close(dist["weights"][n], ref["weights"][n], rtol=1e-5, atol=1e-6)


def test_lean_learner_and_sparsegpt_run_through_accelerate_dispatch_hooks():
    """A model dispatched by accelerate (hooks that move activations between blocks) learns and prunes as usual."""
    from accelerate import dispatch_model

    def spread(model):
        blocks = ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
        return dispatch_model(model, device_map={b: "cpu" for b in blocks}, force_hooks=True)

    def lean(model):
        prior = prune(tiny_llama(), "magnitude", NM(2, 4)).masks
        cfg = _cfg("lean", steps=6)
        learner = MaskProLearner(model, find_linears(model), prior, ROWS, cfg, progress=False)
        res = learner.run(resume=False)
        learner.finish(res.masks)
        return res, {n: m.weight.detach().clone() for n, m in find_linears(model).items()}

    hooked = spread(tiny_llama())
    assert hasattr(hooked.model.layers[0], "_hf_hook")
    (ref, w_ref), (out, w_out) = lean(tiny_llama()), lean(hooked)
    assert out.residuals == ref.residuals and all(torch.equal(w_out[n], w_ref[n]) for n in w_ref)
    assert list(dict(hooked.named_parameters())) == list(dict(tiny_llama().named_parameters()))  # no leftovers
    a = prune(tiny_llama(), "sparsegpt", NM(2, 4), CALIB, batch=4, progress=False)
    b = prune(spread(tiny_llama()), "sparsegpt", NM(2, 4), CALIB, batch=4, progress=False)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def _prune_args(model: Path, out: Path) -> list[str]:
    return ["prune", "--model", str(model), "--method", "maskpro", "--init", "sparsegpt", "--calib-samples", "16",
            "--calib-seq-len", "32", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--n-docs", "8",
            "--lr", "300", "--scale", "3", "--device", "cpu", "--out", str(out), "-q"]


def test_cli_prune_under_torchrun_writes_the_single_process_result(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from maskpro.artifacts import load_masks
    from maskpro.cli import main

    run = _torchrun(["-m", "maskpro.cli", *_prune_args(tiny_model_dir, tmp_path / "two")])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("saved maskpro") == 1   # rank 0 writes and reports
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process running each step's 4 rows as the 2 micro-batches of 2 that the ranks run
        assert main([*_prune_args(tiny_model_dir, tmp_path / "one"), "--micro-batch", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = load_masks(tmp_path / "one"), load_masks(tmp_path / "two")
    assert all(torch.equal(one[n], two[n]) for n in one)
    w1, w2 = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6) for k in w1)


@pytest.mark.parametrize("args,env,msg", [
    (["--batch-size", "5"], {"WORLD_SIZE": "2"}, "--batch-size 5 does not split over 2 processes"),
    (["--device-map", "auto"], {"WORLD_SIZE": "2"}, "use one or the other"),
    (["--device-map", "auto"], {}, "--device-map needs --memory lean"),
    (["--device-map", "auto", "--memory", "lean", "--device", "cpu"], {}, "torch sees none"),
    (["--micro-batch", "3"], {}, "--micro-batch 3 does not divide"),
])
def test_cli_refuses_bad_scale_out_combinations(args, env, msg, tmp_path, capsys, monkeypatch):
    from maskpro.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["prune", "--method", "maskpro", "--batch-size", "4", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and err.count("\n") == 0, err


def test_shard_rows_gives_each_rank_its_slice_of_every_global_minibatch():
    rows = torch.arange(26).view(13, 2)  # 13 rows, global batch 6: 2 whole minibatches, row 12 unused
    r0, r1 = (distributed.shard_rows(rows, 6, r, 2) for r in (0, 1))
    assert r0[:, 0].tolist() == [0, 2, 4, 12, 14, 16] and r1[:, 0].tolist() == [6, 8, 10, 18, 20, 22]
    assert torch.equal(torch.cat([r0[:3], r1[:3], r0[3:], r1[3:]]), rows[:12])
    with pytest.raises(MaskproError, match="does not split over 4 processes"):
        distributed.shard_rows(rows, 6, 0, 4)


def test_calibration_share_splits_at_batch_boundaries():
    calib = torch.arange(10)
    parts = [distributed.calibration_share(calib, 4, r, 2).tolist() for r in range(2)]
    assert parts == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]   # batches [0-3] [4-7] | [8-9]
    with pytest.raises(MaskproError, match="more --calib-samples"):
        distributed.calibration_share(calib, 8, 0, 3)


def test_single_process_group_is_a_no_op():
    group = distributed.current()
    assert not group.distributed and group.is_main and distributed.agree(5)
    t = torch.tensor(3.0)
    assert distributed.all_mean_(t) is t and float(t) == 3.0


def test_learner_refuses_a_batch_that_does_not_split():
    model = tiny_llama()
    prior = prune(tiny_llama(), "magnitude", NM(2, 4)).masks
    with pytest.raises(MaskproError, match="micro-batch 3 does not divide"):
        MaskProLearner(model, find_linears(model), prior, ROWS, _cfg("fast", micro_batch=3), progress=False)
    with pytest.raises(MaskproError, match="unknown learner memory mode"):
        MaskProLearner(model, find_linears(model), prior, ROWS, _cfg("huge"), progress=False)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
