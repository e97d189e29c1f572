"""Block-local rewards: each block is scored alone on the dense inputs, and its advantage moves only its logits."""

from __future__ import annotations

import pytest
import torch

from maskpro.learner import CHECKPOINT, LearnerConfig, MaskProLearner
from maskpro.local_reward import BlockTargets
from maskpro.models import decoder_layers, find_linears, tiny_llama
from maskpro.nm import NM, check_weight
from maskpro.oneshot import prune

ROWS = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(0))


def _learner(workdir=None, memory="fast", steps=12):
    prior = prune(tiny_llama(), "magnitude", NM(2, 4)).masks
    model = tiny_llama()
    cfg = LearnerConfig(steps=steps, batch_size=4, lr=300.0, scale=3.0, loss="local", memory=memory,
                        checkpoint_every=4)
    return MaskProLearner(model, find_linears(model), prior, ROWS, cfg, workdir=workdir, progress=False), prior


def test_each_block_is_scored_on_the_dense_inputs_alone():
    model = tiny_llama()
    linears = find_linears(model)
    targets = BlockTargets(model, list(linears.values()), ROWS, 4)
    assert targets.n_batches == 4 and targets.n_blocks == len(decoder_layers(model)) == 2
    assert torch.equal(targets.losses(1), torch.zeros(2))  # the dense weights reproduce the dense blocks
    with torch.no_grad():
        next(m for n, m in linears.items() if n.startswith("model.layers.1.")).weight.mul_(0.5)
    after = targets.losses(1)
    assert after[0] == 0 and after[1] > 0  # block 0 does not see block 1's change, block 1 does
    assert targets.layer_block.tolist() == [int(n.split(".")[2]) for n in linears]


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_a_blocks_advantage_moves_only_its_own_logits(memory):
    learner, _ = _learner(memory=memory)
    learner.prepare(resume=False)
    assert learner.base.shape == (4, 2) and learner.delta.shape == (2,)
    before = {k: v.clone() for k, v in learner.logits().items()}
    learner.mode.sample(0)
    adv = torch.tensor([0.0, 5.0])[learner.local.layer_block]
    learner.mode.update(adv, 0)
    after = learner.logits()
    if memory == "fast":
        moved = [not torch.equal(learner.theta[a:b], before["theta"][a:b])
                 for a, b in zip(learner.mode.offsets, learner.mode.offsets[1:])]
    else:
        moved = [not torch.equal(after[k], before[k]) for k in before]
    assert moved == [b == 1 for b in learner.local.layer_block.tolist()]


def test_local_learning_is_strict_and_resumes_to_the_same_masks(tmp_path):
    straight, prior = _learner(tmp_path / "a")
    ref = straight.run(resume=True)
    assert sum(int((ref.masks[n] != prior[n]).sum()) for n in prior) > 0
    first, _ = _learner(tmp_path / "b")
    first.run(resume=True, stop_after=6)
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    again, _ = _learner(tmp_path / "b")
    out = again.run(resume=True)
    assert out.residuals == ref.residuals
    assert all(torch.equal(out.masks[n], ref.masks[n]) for n in ref.masks)
    for n, m in out.masks.items():
        assert check_weight(m.float(), NM(2, 4), n, strict=False) == []
