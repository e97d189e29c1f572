"""Distillation losses for sparse fine-tuning: the dense model teaches the pruned one.

Pure math, no model plumbing (that is ``maskpro.finetune``). Two signals:
  * ``kd``: the KL divergence from the teacher's next-token distribution to the student's, per token,
    averaged over tokens. It carries the teacher's whole distribution instead of one sampled token, which is
    what lets a small budget of text recover what pruning removed.
  * ``hidden``: every decoder block's output matched to the teacher's, as a mean squared error divided by
    the teacher's own mean square per block, so that late blocks (whose activations are orders of magnitude
    larger) do not drown out early ones (the feature loss of SquareHead, arXiv 2310.06927).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("kd", "kd+hidden", "ce")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at ``temperature``, times temperature^2 (Hinton's scaling)."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def hidden_loss(student: list[torch.Tensor] | tuple, teacher: list[torch.Tensor] | tuple) -> torch.Tensor:
    """Mean over blocks of ||h_s - h_t||^2 / ||h_t||^2 (each averaged over tokens and features)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hidden_loss needs as many student as teacher states, got {len(student)} and {len(teacher)}")
    terms = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` on the tokens ``ids`` they were computed from."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def distill_loss(kind: str, student_out, teacher_out, ids: torch.Tensor, temperature: float = 1.0,
                 hidden_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss ``kind`` (one of LOSSES) and its parts (detached scalars, for logs).

    ``student_out`` / ``teacher_out`` are model outputs with ``logits`` and, for ``kd+hidden``,
    ``hidden_states`` (the embeddings first, then one state per block); ``teacher_out`` is unused by ``ce``.
    """
    if kind == "ce":
        loss = lm_loss(student_out.logits, ids)
        return loss, {"ce": loss.detach().float()}
    kd = kd_loss(student_out.logits, teacher_out.logits, temperature)
    parts = {"kd": kd.detach().float()}
    if kind == "kd":
        return kd, parts
    if kind != "kd+hidden":
        raise ValueError(f"unknown distillation loss {kind!r}; choose from {', '.join(LOSSES)}")
    hid = hidden_loss(student_out.hidden_states[1:], teacher_out.hidden_states[1:])
    parts["hidden"] = hid.detach().float()
    return kd + hidden_weight * hid, parts
