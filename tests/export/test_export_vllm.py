"""vLLM export: dense checkpoint reloads with identical logits, sparse-24-bitmask round-trips bit-exactly,
broken patterns and bad paths are refused, and a failed export never touches the previous output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from maskpro.artifacts import MASKS, read_metadata, save_pruned
from maskpro.data import wikitext2_text
from maskpro.errors import MaskproError
from maskpro.export import vllm as export_vllm
from maskpro.export.sparse24 import verify_sparse24_bitmask, write_sparse24_bitmask
from maskpro.export.vllm import verify_vllm_checkpoint, write_vllm_checkpoint
from maskpro.nm import NM
from maskpro.oneshot import magnitude_prune
from maskpro.pattern_check import check_saved

BROKEN_LAYER = "model.layers.1.mlp.down_proj"
BROKEN_ROW, BROKEN_GROUP_COL = 5, 8   # group (row 5, columns 8..11)


def _prune_folder(model_dir: Path, out: Path, nm: NM = NM(2, 4)) -> Path:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    masks = magnitude_prune(model, nm).masks
    return save_pruned(model, tok, out, masks, nm, "magnitude")


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_dir) -> Path:
    return _prune_folder(tiny_model_dir, tmp_path_factory.mktemp("vllm") / "tiny-2of4")


@pytest.fixture(scope="module")
def text(data_root) -> str:
    return wikitext2_text(data_root)[:4000]


@pytest.fixture(scope="module")
def broken(pruned, tmp_path_factory, reseal) -> Path:
    """The pruned folder with one zero of one group flipped to non-zero: 3 non-zeros in a 2:4 group."""
    out = tmp_path_factory.mktemp("broken") / "tiny-broken"
    shutil.copytree(pruned, out)
    tensors = load_file(str(out / "model.safetensors"))
    w = tensors[f"{BROKEN_LAYER}.weight"]
    group = w[BROKEN_ROW, BROKEN_GROUP_COL:BROKEN_GROUP_COL + 4]
    group[(group == 0).nonzero()[0]] = 0.5
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return reseal(out)


# ------------------------------------------------------------------------------------------ dense


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_dense_checkpoint_reloads_with_identical_logits(pruned, text, tmp_path, dtype):
    out = write_vllm_checkpoint(pruned, tmp_path / "vllm", dtype=dtype)
    res = verify_vllm_checkpoint(pruned, out, text)
    assert res["identical"] and res["max_abs_diff"] == 0.0 and res["argmax_agreement"] == 1.0
    assert res["tokens"] == 256 and res["dtype"] == ("bfloat16" if dtype else "float32")
    assert res["layers_checked"] == len(read_metadata(pruned)["targets"]) == 14

    names = {f.name for f in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "maskpro.json", MASKS, "model.safetensors", "model.safetensors.index.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert not {"quantization_config", "compression_config", "sparsity_config"} & set(config)
    assert config["maskpro"] == {"format": "maskpro/v1", "n": 2, "m": 4, "method": "magnitude",
                                 "num_targets": 14, "metadata_file": "maskpro.json", "masks_file": MASKS,
                                 "checkpoint": "dense"}
    assert config["dtype"] == ("bfloat16" if dtype else "float32")
    # vLLM loads every *.safetensors unless the index names the weight files: the masks must stay out.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert set(index["weight_map"]) == set(fh.keys())
    assert read_metadata(out)["export"]["format"] == "vllm-dense"


def test_dense_checkpoint_streams_into_shards(pruned, text, tmp_path):
    out = write_vllm_checkpoint(pruned, tmp_path / "sharded", dtype="fp16", max_shard_bytes=64 * 1024)
    shards = sorted(f.name for f in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list(out.glob("*.part")) and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert check_saved(out) == (NM(2, 4), 14)
    res = verify_vllm_checkpoint(pruned, out, text, max_tokens=64)
    assert res["identical"] and res["dtype"] == "float16"


def test_dense_checkpoint_stores_positive_zeros(pruned, tmp_path):
    """Pruned zeros are +0.0 (values unchanged); old 2:4 kernels broke on -0.0 (vllm PR 13198)."""
    out = write_vllm_checkpoint(pruned, tmp_path / "vllm")
    src = load_file(str(pruned / "model.safetensors"))
    dst = load_file(str(out / "model.safetensors"))
    key = f"{BROKEN_LAYER}.weight"
    assert torch.signbit(src[key][src[key] == 0]).any()
    assert not torch.signbit(dst[key][dst[key] == 0]).any()
    assert torch.equal(src[key], dst[key])  # equal as values


# ---------------------------------------------------------------------------------- sparse-24-bitmask


def test_sparse24_bitmask_decompresses_bit_exactly(pruned, tmp_path):
    from compressed_tensors.config import SparsityCompressionConfig

    out = write_sparse24_bitmask(pruned, tmp_path / "s24")
    res = verify_sparse24_bitmask(pruned, out)
    assert res["ok"] and res["bit_exact"] == res["targets"] == 14 and not res["mismatched"]
    assert res["other_tensors"] == 6 and not res["other_mismatched"]
    assert res["negative_zeros"] > 0  # magnitude pruning leaves -0.0; compared as +0.0
    # fp32: half the values (1/2) plus 1 bit per 32-bit weight (1/32) plus a 16-byte shape per layer
    assert 0.53 < res["ratio"] < 0.535 and res["dense_bytes"] == 294912

    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["version"]
    s = q["sparsity_config"]
    assert (s["format"], s["sparsity_structure"], s["targets"], s["ignore"]) == \
        ("sparse-24-bitmask", "2:4", ["Linear"], ["lm_head"])
    src = load_file(str(pruned / "model.safetensors"))  # zeros over all weights (the embedding is large)
    zeros = sum(int((t == 0).sum()) for t in src.values())
    assert s["global_sparsity"] == pytest.approx(zeros / sum(t.numel() for t in src.values()))
    assert type(SparsityCompressionConfig.load_from_registry(s["format"], **s)).__name__ == "Sparse24BitMaskConfig"

    # the tensor layout vLLM <= 0.18.1 allocates (CompressedTensors24.create_weights)
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        assert f"{BROKEN_LAYER}.weight" not in keys
        shape = fh.get_tensor(f"{BROKEN_LAYER}.shape")
        values = fh.get_tensor(f"{BROKEN_LAYER}.compressed")
        bitmask = fh.get_tensor(f"{BROKEN_LAYER}.bitmask")
    rows, cols = shape.flatten().tolist()
    assert shape.dtype == torch.int64 and tuple(shape.shape) == (2, 1)
    assert tuple(values.shape) == (rows, cols // 2) and values.dtype == torch.float32
    assert tuple(bitmask.shape) == (rows, cols // 8) and bitmask.dtype == torch.uint8
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= keys
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == keys and MASKS in {f.name for f in out.iterdir()}


def test_sparse24_refuses_other_patterns(tiny_model_dir, tmp_path):
    src = _prune_folder(tiny_model_dir, tmp_path / "4of8", NM(4, 8))
    with pytest.raises(MaskproError, match="stores only 2:4, use write_vllm_checkpoint"):
        write_sparse24_bitmask(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.environ.get("MASKPRO_LEGACY_CT"),
                    reason="set MASKPRO_LEGACY_CT to an unpacked compressed-tensors<=0.14 to cross-check")
def test_sparse24_matches_the_legacy_library_compressor(pruned, tmp_path):
    """compressed-tensors' own Sparse24BitMaskCompressor (<= 0.14) writes the same tensors and reads ours."""
    out = write_sparse24_bitmask(pruned, tmp_path / "s24")
    script = f"""
import json, torch
from safetensors.torch import load_file
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import Sparse24BitMaskTensor
from maskpro.export.sparse24 import verify_sparse24_bitmask
assert verify_sparse24_bitmask({str(pruned)!r}, {str(out)!r})["ok"]
cfg = json.load(open({str(out / "config.json")!r}))["quantization_config"]
dense = dict(ModelCompressor.from_compression_config(cfg).sparsity_compressor.decompress({str(out)!r}))
ours = load_file({str(out / "model.safetensors")!r})
for k, v in load_file({str(pruned / "model.safetensors")!r}).items():
    v = torch.where(v == 0, torch.zeros(()), v)
    assert torch.equal(dense[k].view(torch.int32), v.view(torch.int32)), k
    name = k.removesuffix(".weight")
    if name + ".compressed" in ours:
        for p, t in Sparse24BitMaskTensor.from_dense(v).dict(name).items():
            assert torch.equal(t, ours[p]) and t.dtype == ours[p].dtype, p
print("legacy ok")
"""
    env = {**os.environ, "PYTHONPATH": os.environ["MASKPRO_LEGACY_CT"]}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "legacy ok" in run.stdout, run.stderr[-2000:]


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("writer", [write_vllm_checkpoint, write_sparse24_bitmask])
def test_broken_pattern_is_refused_naming_layer_and_group(broken, tmp_path, writer):
    with pytest.raises(MaskproError) as err:
        writer(broken, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and BROKEN_LAYER in msg
    assert f"row {BROKEN_ROW}, columns {BROKEN_GROUP_COL}..{BROKEN_GROUP_COL + 3}" in msg
    assert "has 3 non-zeros" in msg and "re-run maskpro prune" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_bad_inputs_are_one_line_errors(pruned, tiny_model_dir, tmp_path):
    cases = [
        (lambda: write_vllm_checkpoint(tmp_path / "nope", tmp_path / "o1"), "is not a folder"),
        (lambda: write_vllm_checkpoint(tiny_model_dir, tmp_path / "o2"), "not a maskpro output"),
        (lambda: write_vllm_checkpoint(pruned, pruned), "would replace the source"),
        (lambda: write_sparse24_bitmask(pruned, pruned.parent), "would replace the source"),
        (lambda: write_vllm_checkpoint(pruned, tmp_path / "o3", dtype="int4"), "unknown dtype"),
        (lambda: verify_vllm_checkpoint(pruned, tmp_path / "nope", [1, 2, 3]), "is not a folder"),
        (lambda: verify_sparse24_bitmask(pruned, pruned), "no sparse-24-bitmask sparsity_config"),
    ]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    cases.append((lambda: write_vllm_checkpoint(pruned, busy), "is not a maskpro export"))
    for call, match in cases:
        with pytest.raises(MaskproError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
    assert (busy / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------- atomic


def test_failed_export_leaves_the_previous_output_intact(pruned, broken, tmp_path, monkeypatch):
    out = write_vllm_checkpoint(pruned, tmp_path / "vllm", max_shard_bytes=64 * 1024)
    before = _files(out)
    with pytest.raises(MaskproError):
        write_vllm_checkpoint(broken, out)          # refused before writing
    assert _files(out) == before

    calls = []
    real = export_vllm._write_shard

    def dies_on_third_shard(tensors, folder, number):
        calls.append(number)
        if len(calls) == 3:
            raise OSError("No space left on device")  # what a full disk looks like mid-export
        return real(tensors, folder, number)

    monkeypatch.setattr(export_vllm, "_write_shard", dies_on_third_shard)
    with pytest.raises(OSError, match="No space left"):
        write_vllm_checkpoint(pruned, out, dtype="bf16", max_shard_bytes=64 * 1024)
    assert len(calls) == 3 and _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vllm"]  # no temp folder left beside it
    monkeypatch.undo()
    assert write_vllm_checkpoint(pruned, out, dtype="bf16") == out  # a later export replaces it
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_vllm_checkpoint_reloads_with_the_same_logits(smollm2_path, text, tmp_path):
    src = _prune_folder(smollm2_path, tmp_path / "smollm2-2of4")
    out = write_vllm_checkpoint(src, tmp_path / "smollm2-vllm", dtype="bf16")
    res = verify_vllm_checkpoint(src, out, text, max_tokens=128)
    assert res["identical"] and res["argmax_agreement"] == 1.0 and res["tokens"] == 128
    assert res["layers_checked"] == 210 and res["dtype"] == "bfloat16"
    size = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    assert size < 0.55 * (src / "model.safetensors").stat().st_size  # bf16 halves the fp32 source
