"""The learning set built from the real local C4 file."""

from __future__ import annotations

import pytest
import torch

from maskpro import data
from maskpro.errors import MaskproError


def test_windows_per_doc_gives_more_distinct_rows(smollm2_tokenizer):
    paper = data.learning_batches(smollm2_tokenizer, 64, 128)
    more = data.learning_batches(smollm2_tokenizer, 64, 128, windows_per_doc=4, seed=0)
    assert paper.shape == (64, 128)
    assert 64 < more.shape[0] <= 256 and more.shape[1] == 128
    assert len({tuple(r.tolist()) for r in more}) == more.shape[0]  # non-overlapping windows, no repeats
    # every first window of the paper's rows is still there, only shuffled in
    assert {tuple(r.tolist()) for r in paper} <= {tuple(r.tolist()) for r in more}
    assert torch.equal(more, data.learning_batches(smollm2_tokenizer, 64, 128, windows_per_doc=4, seed=0))


def test_asking_for_too_many_documents_is_a_clear_error(smollm2_tokenizer):
    with pytest.raises(MaskproError, match="lower --n-docs"):
        data.learning_batches(smollm2_tokenizer, 100000, 128)
    with pytest.raises(MaskproError, match="windows-per-doc"):
        data.learning_batches(smollm2_tokenizer, 8, 128, windows_per_doc=0)
