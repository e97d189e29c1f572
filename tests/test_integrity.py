"""Damaged files: every command that opens a model folder says which file is damaged in one line (exit 2),
and a truncated masks file no longer passes a check."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import save_file

from maskpro.errors import MaskproError
from maskpro.integrity import check_safetensors, read_json
from maskpro.schema import check_folder_files


@pytest.fixture
def tensors(tmp_path):
    import torch

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(3, 4)}, str(path))
    return path


def test_a_whole_file_passes_and_every_damage_is_named(tensors):
    check_safetensors(tensors)
    data = tensors.read_bytes()
    cases = {"truncated": data[:-7], "padded": data + b"\0" * 8, "tiny": data[:5],
             "random": bytes(range(256)) * 40, "bad header": data[:8] + b"{" * (len(data) - 8)}
    for name, content in cases.items():
        broken = tensors.with_name(f"{name.replace(' ', '_')}.safetensors")
        broken.write_bytes(content)
        with pytest.raises(MaskproError, match=f"{broken.name} is damaged") as e:
            check_safetensors(broken)
        assert "\n" not in str(e.value) and "re-running the command that wrote it" in str(e.value), name


def test_json_files_parse_or_are_named(tmp_path):
    good = tmp_path / "config.json"
    good.write_text(json.dumps({"model_type": "llama"}))
    assert read_json(good) == {"model_type": "llama"}
    good.write_text('{"model_type": "lla')
    with pytest.raises(MaskproError, match="config.json is damaged .not valid JSON"):
        check_folder_files(tmp_path)


def _damaged_copy(folder, tmp_path, name: str, cut: int):
    copy = tmp_path / f"damaged-{name}"
    shutil.copytree(folder, copy)
    f = copy / name
    f.write_bytes(f.read_bytes()[:cut] if cut > 0 else f.read_bytes()[:cut or None])
    return copy


@pytest.mark.parametrize("name, cut", [("model.safetensors", 100_000), ("masks.safetensors", -100),
                                       ("maskpro.json", 20), ("config.json", 30)])
def test_every_command_names_the_damaged_file(tiny_pruned, tmp_path, capsys, name, cut):
    from maskpro.cli import main as maskpro_main
    from maskpro.export.cli import check_main, export_main
    from maskpro.serve.cli import main as serve_main

    folder = _damaged_copy(tiny_pruned, tmp_path, name, cut)
    runs = {"maskpro-check": lambda: check_main([str(folder)]),
            "maskpro check": lambda: maskpro_main(["check", "--model", str(folder)]),
            "maskpro-export vllm": lambda: export_main([str(folder), "--engine", "vllm", "--out",
                                                       str(tmp_path / "out")]),
            "maskpro-serve": lambda: serve_main([str(folder), "--port", "0"])}
    for command, run in runs.items():
        code = run()
        err = capsys.readouterr().err.strip()
        assert code == 2, (command, code, err)
        assert len(err.splitlines()) == 1 and f"{name} is damaged" in err and "Traceback" not in err, (command, err)
    assert not (tmp_path / "out").exists()  # nothing was exported from the damaged folder


def _flip_byte(path, at: float = 0.6) -> None:
    """Change one byte; in text, one letter into another (the file still parses)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    if path.suffix == ".json":  # a letter inside a string (not of true/false/null), so it still parses
        i = data.index(b'"', i) + 1
        while not (data[i] < 128 and chr(data[i]).isalpha()):
            i = data.index(b'"', i + 1) + 1
        data[i] = ord("q") if data[i] != ord("q") else ord("z")
    else:
        data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "masks.safetensors", "tokenizer.json"])
def test_a_changed_byte_is_caught_by_the_recorded_sha256(tiny_pruned, tmp_path, capsys, name):
    """Same size, valid header, one bit different: only the record of sizes and hashes can tell."""
    from maskpro.artifacts import load_masks, read_metadata
    from maskpro.cli import main as maskpro_main
    from maskpro.export.cli import check_main
    from maskpro.models import resolve_model_path

    record = read_metadata(tiny_pruned)["files"]
    assert set(record) >= {"model.safetensors", "masks.safetensors", "config.json", "tokenizer.json"}
    assert "maskpro.json" not in record and all(len(v["sha256"]) == 64 for v in record.values())
    copy = tmp_path / "copy"
    shutil.copytree(tiny_pruned, copy)
    resolve_model_path(copy)  # an intact copy passes
    _flip_byte(copy / name, 0.9 if name.endswith(".json") else 0.6)
    expected = f"{name} is not the file maskpro.json records (its sha256 differs)"
    pattern = expected.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(MaskproError, match=pattern):
        resolve_model_path(copy)
    if name == "masks.safetensors":
        with pytest.raises(MaskproError, match=pattern):
            load_masks(copy)
    assert check_main([str(copy), "--quiet"]) == 2
    assert maskpro_main(["check", "--model", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(expected in line for line in err)


def test_a_listed_file_that_is_gone_is_named(tiny_pruned, tmp_path):
    from maskpro.models import resolve_model_path

    copy = tmp_path / "copy"
    shutil.copytree(tiny_pruned, copy)
    (copy / "generation_config.json").unlink()
    with pytest.raises(MaskproError, match=r"generation_config.json is missing \(listed in maskpro.json\)"):
        resolve_model_path(copy)


def test_exports_record_their_own_files(tiny_pruned, tmp_path):
    from maskpro.artifacts import read_metadata
    from maskpro.export.check import check_path
    from maskpro.export.vllm import write_vllm_checkpoint
    from maskpro.integrity import sha256

    out = write_vllm_checkpoint(tiny_pruned, tmp_path / "vllm")
    record = read_metadata(out)["files"]
    assert record["model.safetensors"]["sha256"] == sha256(out / "model.safetensors")
    assert record["masks.safetensors"] == read_metadata(tiny_pruned)["files"]["masks.safetensors"]  # copied whole
    assert check_path(out).ok
    _flip_byte(out / "model.safetensors")
    with pytest.raises(MaskproError, match="sha256 differs"):
        check_path(out)
