"""``maskpro-serve --tensor-parallel-size N`` reaches the engine's own tensor-parallel option.

The command line is built from the parsed arguments as ``main`` builds it; a stand-in executable on PATH
takes the place of ``vllm`` / ``trtllm-serve`` (neither installs on a CPU machine) and is never run.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from maskpro.serve.cli import build_parser, external_command

from maskpro.errors import MaskproError


@pytest.fixture
def engines_on_path(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for exe in ("vllm", "trtllm-serve"):
        (bin_dir / exe).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / exe).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bin_dir


def _args(argv: list[str], extra: list[str] = ()):
    a = build_parser().parse_args(argv)
    a.engine_args = list(extra)
    return a


def test_vllm_gets_tensor_parallel_size(engines_on_path, tiny_model_dir):
    cmd = external_command(_args([str(tiny_model_dir), "--backend", "vllm", "--tensor-parallel-size", "2",
                                  "--port", "8011"], ["--quantization", "maskpro"]))
    assert cmd[0] == str(engines_on_path / "vllm") and cmd[1:3] == ["serve", str(tiny_model_dir)]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert cmd[-2:] == ["--quantization", "maskpro"]


def test_trtllm_gets_tp_size_and_an_engine_must_match_it(engines_on_path, tiny_model_dir, tmp_path):
    cmd = external_command(_args([str(tiny_model_dir), "--backend", "trtllm", "--tensor-parallel-size", "4",
                                  "--port", "8012"]))
    assert cmd[0] == str(engines_on_path / "trtllm-serve") and cmd[cmd.index("--tp_size") + 1] == "4"
    engine = tmp_path / "trt" / "engine"   # maskpro-export --engine trtllm --tp 2
    engine.mkdir(parents=True)
    (engine / "rank0.engine").write_bytes(b"")
    (engine / "config.json").write_text(json.dumps({"pretrained_config": {"mapping": {"tp_size": 2}}}))
    argv = [str(tmp_path / "trt"), "--backend", "trtllm", "--tokenizer", str(tiny_model_dir), "--port", "8013"]
    cmd = external_command(_args([*argv, "--tensor-parallel-size", "2"]))
    assert cmd[cmd.index("--tp_size") + 1] == "2" and cmd[cmd.index("--backend") + 1] == "tensorrt"
    with pytest.raises(MaskproError, match="built for tensor parallelism 2, not 4"):
        external_command(_args([*argv, "--tensor-parallel-size", "4"]))


def test_every_backend_choice_is_registered():
    from maskpro.serve.cli import BACKENDS

    choices = next(a.choices for a in build_parser()._actions if a.dest == "backend")
    assert tuple(choices) == tuple(BACKENDS) and BACKENDS["torch"].command is None
    assert all(BACKENDS[name].command is not None for name in ("vllm", "trtllm"))
