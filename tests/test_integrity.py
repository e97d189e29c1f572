"""Damaged files: every command that opens a model folder says which file is damaged in one line (exit 2),
and a truncated masks file no longer passes a check."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import save_file

from maskpro.errors import MaskproError
from maskpro.integrity import check_folder_files, check_safetensors, read_json


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
