"""Device faults during a step: an out-of-memory error in the model's forward pass, which a retry or a shed
row recovers from, and CUDA errors after which this process cannot use its device again."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["MAX_FAILED_STEPS", "ForwardOutOfMemory", "forward_memory", "is_sticky"]

MAX_FAILED_STEPS = 3  # failed steps in a row after which the engine counts as broken
# CUDA errors after which this process cannot use its device again (the context is lost)
_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
           "illegal instruction", "hardware stack error")


class ForwardOutOfMemory(Exception):
    """The model's forward pass ran out of device memory (nothing was sampled or emitted yet)."""


@contextlib.contextmanager
def forward_memory():
    """Mark an out-of-memory error as the forward's, the only place a retry or a shed is safe to follow."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise ForwardOutOfMemory(str(e).splitlines()[0] if str(e) else "out of memory") from None


def is_sticky(e: BaseException) -> bool:
    """Whether ``e`` is a CUDA error that leaves the device unusable for this process."""
    text = str(e)
    return any(s in text for s in _STICKY)
