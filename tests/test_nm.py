import pytest
import torch

from maskpro.errors import MaskproError
from maskpro.nm import NM, check_weight, group_counts, pack_mask, project, topn_mask, unpack_mask


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (3, 6)])
def test_topn_mask_is_strict_and_keeps_largest(n, m):
    w = torch.randn(6, 4 * m)
    mask = topn_mask(w.abs(), NM(n, m))
    assert torch.all(group_counts(mask, NM(n, m)) == n)
    g, gm = w.abs().reshape(-1, m), mask.reshape(-1, m)
    # every kept entry is at least as large as every dropped entry of its group
    kept_min = torch.where(gm, g, torch.inf).min(1).values
    drop_max = torch.where(~gm, g, -torch.inf).max(1).values
    assert torch.all(kept_min >= drop_max)


def test_project_and_check_point_at_the_bad_group():
    nm = NM(2, 4)
    w = project(torch.randn(4, 16), nm)
    assert check_weight(w, nm, "q") == []
    w[2, 8:12] = 1.0  # a whole group made dense
    bad = check_weight(w, nm, "q")
    assert len(bad) == 1 and (bad[0].row, bad[0].col, bad[0].count) == (2, 8, 4)
    assert "layer q" in str(bad[0]) and "columns 8..11" in str(bad[0])


def test_strict_check_counts_underfull_groups():
    nm = NM(2, 4)
    w = project(torch.randn(2, 8), nm)
    w[0, :4] = 0
    assert check_weight(w, nm, "x") == []
    assert len(check_weight(w, nm, "x", strict=True)) == 1


@pytest.mark.parametrize("shape", [(3, 5), (7, 24), (1, 4)])
def test_pack_roundtrip(shape):
    mask = torch.rand(shape) > 0.5
    packed, s = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, s), mask)


def test_truncated_pack_is_refused():
    packed, _ = pack_mask(torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(MaskproError, match="truncated"):
        unpack_mask(packed[:2], (4, 8))


@pytest.mark.parametrize("text,msg", [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("0:4", "0 < N < M"),
                                      ("2-4", "N:M"), ("a:b", "N:M")])
def test_bad_patterns_get_one_line_errors(text, msg):
    with pytest.raises(MaskproError, match=msg) as e:
        NM.parse(text)
    assert "\n" not in str(e.value)


def test_dimension_not_divisible_by_m():
    with pytest.raises(MaskproError, match="not divisible by M=4"):
        topn_mask(torch.randn(4, 6), NM(2, 4), "layer.x")
