import pytest
import torch

from maskpro.errors import MaskproError
from maskpro.learner import CHECKPOINT, LearnerConfig, MaskProLearner
from maskpro.models import find_linears, tiny_llama
from maskpro.nm import NM, check_weight
from maskpro.oneshot import prune

BATCHES = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(0))


def _learner(workdir=None, steps=12, **kw):
    prior = prune(tiny_llama(), "magnitude", NM(2, 4)).masks
    model = tiny_llama()
    cfg = LearnerConfig(steps=steps, batch_size=4, lr=kw.pop("lr", 300.0), scale=kw.pop("scale", 3.0),
                        checkpoint_every=kw.pop("checkpoint_every", 4), **kw)
    return MaskProLearner(model, find_linears(model), prior, BATCHES, cfg, workdir=workdir, progress=False), prior


def test_learning_changes_masks_and_keeps_them_strict():
    learner, prior = _learner(steps=20)
    res = learner.run(resume=False)
    assert res.steps == 20 and len(res.residuals) == 20
    assert sum(int((res.masks[n] != prior[n]).sum()) for n in prior) > 0
    learner.finish(res.masks)
    for name, mod in find_linears(learner.model).items():
        assert check_weight(mod.weight, NM(2, 4), name, strict=False) == []
        assert torch.all(mod.weight[~res.masks[name]] == 0)


def test_initial_mask_residual_is_zero_when_the_policy_is_certain():
    learner, _ = _learner(steps=3, scale=1000.0)
    res = learner.run(resume=False)
    assert res.residuals == [0.0, 0.0, 0.0]


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    straight, _ = _learner(tmp_path / "a", steps=12)
    ref = straight.run(resume=True)
    first, _ = _learner(tmp_path / "b", steps=12)
    first.run(resume=True, stop_after=6)          # "killed" after step 6 (checkpoint at 4 and at stop)
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    again, _ = _learner(tmp_path / "b", steps=12)
    out = again.run(resume=True)
    assert again.step == 12
    assert torch.equal(again.theta, straight.theta)
    assert out.residuals == ref.residuals
    assert all(torch.equal(out.masks[n], ref.masks[n]) for n in ref.masks)


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path):
    first, _ = _learner(tmp_path, steps=8)
    first.run(resume=True, stop_after=4)
    other, _ = _learner(tmp_path, steps=8, lr=1.0)
    with pytest.raises(MaskproError, match="different config"):
        other.run(resume=True)


def test_non_finite_loss_skips_the_update():
    learner, _ = _learner(steps=4)
    learner.prepare(resume=False)
    learner.base[:] = float("inf")
    before = learner.theta.clone()
    for _ in range(2):
        learner.train_step()
    assert torch.equal(learner.theta, before) and torch.isfinite(learner.delta)


def test_prior_must_be_strict():
    prior = prune(tiny_llama(), "magnitude", NM(2, 4)).masks
    name = next(iter(prior))
    prior[name] = torch.ones_like(prior[name])
    model = tiny_llama()
    with pytest.raises(MaskproError, match="not strict 2:4"):
        MaskProLearner(model, find_linears(model), prior, BATCHES, LearnerConfig(batch_size=4), progress=False)


def test_kd_loss_is_zero_for_the_teacher_and_positive_for_a_mask():
    """kd scores masks against the dense model: the dense weights' loss is the teacher's own entropy."""
    learner, _ = _learner(steps=6, loss="kd")
    assert learner.teacher.shape == (16, 24, 256)
    torch.testing.assert_close(learner.teacher.sum(-1), torch.ones(16, 24))
    ids, target = learner.batch(0), learner._target(0)
    learner.w.copy_(learner.w0)  # dense weights: soft cross-entropy = teacher entropy
    entropy = -(target * target.log()).sum(-1).mean()
    torch.testing.assert_close(learner._loss(ids, target), entropy)
    res = learner.run(resume=False)
    assert min(res.losses) > float(entropy)  # every sampled 2:4 mask is further from the teacher
    for n, m in res.masks.items():
        assert check_weight(m.float(), NM(2, 4), n, strict=False) == []


def test_unknown_loss_is_refused():
    with pytest.raises(MaskproError, match="unknown learner loss"):
        _learner(loss="mse")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the forward is graph-replayed there)")
def test_cuda_graph_forward_learns_what_the_eager_forward_learns():
    """The learner speed in docs/results.md is of a forward replayed from a CUDA graph: same losses and masks."""
    def run(graph: bool):
        prior = prune(tiny_llama(), "magnitude", NM(2, 4)).masks
        model = tiny_llama().cuda()
        cfg = LearnerConfig(steps=6, batch_size=4, lr=300.0, scale=3.0, cuda_graph=graph, compile=False, seed=0)
        learner = MaskProLearner(model, find_linears(model), prior, BATCHES.cuda(), cfg, progress=False)
        return learner.run(resume=False)

    graphed, eager = run(True), run(False)
    assert graphed.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-5)
    assert all(torch.equal(graphed.masks[n], eager.masks[n]) for n in eager.masks)
    assert graphed.residuals != [0.0] * 6  # the policy moved, so equal masks are not trivially equal
