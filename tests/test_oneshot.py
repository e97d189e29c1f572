import pytest
import torch
from torch import nn

from maskpro.errors import MaskproError
from maskpro.models import find_linears, tiny_llama
from maskpro.nm import NM, check_weight
from maskpro.oneshot import prune


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_every_method_gives_strict_nm_on_every_linear(method, pattern):
    nm = NM.parse(pattern)
    model = tiny_llama()
    calib = torch.randint(0, 256, (4, 32))
    res = prune(model, method, nm, calib, progress=False)
    linears = find_linears(model)
    assert set(res.masks) == set(linears) and len(linears) == 14
    for name, mod in linears.items():
        assert check_weight(mod.weight, nm, name) == []
        assert torch.all(mod.weight[~res.masks[name]] == 0)
        assert res.masks[name].sum() == mod.weight.numel() * nm.n // nm.m


def test_calibrated_methods_stay_closer_to_dense_than_magnitude():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (8, 48))
    dense = tiny_llama(seed=3)
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
    err = {}
    for method in ("magnitude", "sparsegpt"):
        model = tiny_llama(seed=3)
        prune(model, method, NM(2, 4), ids, progress=False)
        with torch.no_grad():
            err[method] = float((model(input_ids=ids).logits - ref).pow(2).mean())
    assert err["sparsegpt"] < err["magnitude"]


def test_targets_select_layers_by_glob():
    model = tiny_llama()
    res = prune(model, "magnitude", NM(2, 4), targets=["*.mlp.*"])
    assert res.masks and all(".mlp." in n for n in res.masks)
    assert torch.count_nonzero(model.model.layers[0].self_attn.q_proj.weight) == 64 * 64


def test_bad_input_errors_are_one_line_and_helpful():
    model = tiny_llama()
    with pytest.raises(MaskproError, match="unknown method 'foo'"):
        prune(model, "foo", NM(2, 4))
    with pytest.raises(MaskproError, match="no linear layer matches"):
        prune(model, "magnitude", NM(2, 4), targets=["nothing.*"])
    with pytest.raises(MaskproError, match="not divisible by M=5"):
        prune(model, "magnitude", NM(2, 5))
    with pytest.raises(MaskproError, match="no nn.Linear layers"):
        prune(nn.Sequential(nn.Embedding(4, 4)), "magnitude", NM(2, 4))
    with pytest.raises(MaskproError, match="needs calibration"):
        prune(model, "wanda", NM(2, 4))
