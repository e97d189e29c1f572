"""Sparse fine-tuning: the pattern survives bit for bit, the student moves toward the teacher, a killed run
resumes to the same weights, self-generated text is cached, and the CLI wires it after any method."""

import json
import math

import pytest
import torch

from maskpro.checkpoint import read_tensor_meta
from maskpro.cli import main
from maskpro.distill import hidden_loss, kd_loss
from maskpro.errors import MaskproError
from maskpro.finetune import CHECKPOINT, FinetuneConfig, SparseFinetuner, step_rows
from maskpro.models import find_linears, tiny_llama
from maskpro.nm import NM
from maskpro.oneshot import magnitude_prune
from maskpro.selfgen import CACHE, self_generated_rows


def _pair(seed: int = 3):
    teacher = tiny_llama(seed=seed, layers=2)
    student = tiny_llama(seed=seed, layers=2)
    masks = magnitude_prune(student, NM(2, 4)).masks
    return teacher, student, masks


def _kd(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(kd_loss(student(ids).logits, teacher(ids).logits))


def _rows(n=48, length=32, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def test_kd_and_hidden_losses_are_zero_at_the_teacher_and_positive_elsewhere():
    logits = torch.randn(2, 5, 11)
    assert float(kd_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits + torch.randn_like(logits), logits)) > 0.01
    h = [torch.randn(2, 5, 8) for _ in range(3)]
    assert float(hidden_loss(h, h)) == 0.0
    # each block is scaled by its own size: a 1% error costs the same in a tiny and a huge block
    small = hidden_loss([h[0] * 1.01], [h[0]])
    big = hidden_loss([h[0] * 1000 * 1.01], [h[0] * 1000])
    assert float(small) == pytest.approx(float(big), rel=1e-4)


@pytest.mark.parametrize("loss", ["kd", "kd+hidden", "ce"])
def test_finetune_keeps_the_pattern_and_approaches_the_teacher(loss):
    teacher, student, masks = _pair()
    held_out = _rows(4, 32, seed=9)
    before = _kd(student, teacher, held_out)
    layers = find_linears(student)
    cfg = FinetuneConfig(steps=30, lr=3e-3, batch_size=8, micro_batch=4, loss=loss, warmup=3)
    report = SparseFinetuner(student, teacher, layers, masks, _rows(), cfg, progress=False).run()
    for n, m in layers.items():
        w = m.weight.data
        assert w.dtype == torch.float32
        assert torch.count_nonzero(w[~masks[n]]) == 0, n
    assert report["steps_done"] == 30 and report["skipped_steps"] == 0
    assert report["loss_last"] < report["loss_first"]
    if loss != "ce":  # ce fits the random text, not the teacher
        assert _kd(student, teacher, held_out) < 0.7 * before
    assert not student.training and all(not p.requires_grad for p in student.parameters())


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    cfg = FinetuneConfig(steps=12, lr=2e-3, batch_size=8, checkpoint_every=5, warmup=2)
    teacher, a, masks = _pair()
    SparseFinetuner(a, teacher, find_linears(a), masks, _rows(), cfg, progress=False).run()

    _, b, _ = _pair()
    work = tmp_path / "work"
    first = SparseFinetuner(b, teacher, find_linears(b), masks, _rows(), cfg, work, progress=False)
    first.run(stop_after=7)  # killed after step 7; the checkpoint on disk is step 5's
    assert read_tensor_meta(work / CHECKPOINT)["step"] == 5
    _, c, _ = _pair()  # a fresh process: the pruned start weights again, then the checkpoint
    report = SparseFinetuner(c, teacher, find_linears(c), masks, _rows(), cfg, work, progress=False).run()
    assert report["resumed_at"] == 5 and report["steps_done"] == 12
    for (n, wa), wc in zip(find_linears(a).items(), find_linears(c).values()):
        assert torch.allclose(wa.weight, wc.weight, atol=1e-6), n

    other = FinetuneConfig(steps=12, lr=1e-3, batch_size=8, checkpoint_every=5, warmup=2)
    _, d, _ = _pair()  # other settings: the checkpoint is not theirs, start over
    assert SparseFinetuner(d, teacher, find_linears(d), masks, _rows(), other, work,
                           progress=False).run(stop_after=1)["resumed_at"] == 0


def test_rows_cover_an_epoch_before_repeating_and_follow_the_seed():
    seen = torch.cat([step_rows(40, 8, s, seed=1) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(40))
    assert not torch.equal(step_rows(40, 8, 0, 1), step_rows(40, 8, 0, 2))
    with pytest.raises(MaskproError, match="fewer than --ft-batch-size"):
        step_rows(4, 8, 0, 0)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(MaskproError, match="unknown --ft-loss"):
        FinetuneConfig(loss="mse")
    with pytest.raises(MaskproError, match="does not divide"):
        FinetuneConfig(batch_size=6, micro_batch=4)
    with pytest.raises(MaskproError, match="--ft-lr"):
        FinetuneConfig(lr=0)
    cfg = FinetuneConfig(steps=10, warmup=2, lr=1.0)
    assert [round(cfg.lr_at(s), 3) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]


def test_self_generated_rows_follow_the_prompts_and_resume_from_the_cache(tmp_path):
    model = tiny_llama(seed=2)
    starts = _rows(3, 16)
    rows = self_generated_rows(model, starts, 5, 12, prefix=4, seed=0, batch=2, workdir=tmp_path, progress=False)
    assert rows.shape == (5, 12) and rows.dtype == torch.long
    assert torch.equal(rows[:, :4], starts[[0, 1, 2, 0, 1], :4])
    assert len({tuple(r[4:].tolist()) for r in rows}) == 5  # sampled, not copied
    assert (tmp_path / CACHE).is_file()
    more = self_generated_rows(model, starts, 7, 12, prefix=4, seed=0, batch=2, workdir=tmp_path, progress=False)
    assert torch.equal(more[:5], rows)  # the cached rows are reused, two more made
    with pytest.raises(MaskproError, match="prefix"):
        self_generated_rows(model, starts, 2, 4, prefix=4)


def test_cli_fine_tunes_after_a_one_shot_method(tiny_model_dir, data_root, tmp_path):
    out = tmp_path / "wanda-ft"
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--calib-samples", "4",
                 "--calib-seq-len", "64", "--ft-steps", "6", "--ft-batch-size", "4", "--ft-seq-len", "32",
                 "--ft-lr", "1e-3", "--self-gen-rows", "8", "--data-dir", str(data_root), "--out", str(out),
                 "-q"]) == 0
    meta = json.loads((out / "maskpro.json").read_text())
    assert meta["method"] == "wanda+ft"
    ft = meta["finetune"]
    assert ft["steps_done"] == 6 and ft["data"]["self_generated_rows"] == 8 and ft["data"]["c4_rows"] > 0
    assert math.isfinite(ft["loss_last"])
    assert main(["check", "--model", str(out)]) == 0
    assert not (tmp_path / "wanda-ft.work").exists()  # the default work folder goes after success


def test_a_batch_the_text_cannot_fill_fails_before_any_pruning(tiny_model_dir, data_root, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("pruning ran before the fine-tune's data was checked")

    monkeypatch.setattr("maskpro.pipeline.prune", never)
    out = tmp_path / "never"
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--calib-samples", "4",
                 "--calib-seq-len", "64", "--ft-steps", "2", "--ft-batch-size", "100000", "--data-dir",
                 str(data_root), "--out", str(out), "-q"]) == 2
    assert not out.exists()
