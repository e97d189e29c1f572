"""maskpro-bench's command line: every subcommand has help, bad input is one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from maskpro.bench import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sub", list(cli.SUBCOMMANDS))
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: maskpro-bench {sub}") and "--out" in out
    assert "``" not in out  # docstrings are shown as plain text


def test_top_level_help_lists_subcommands_and_runs_as_installed_script():
    out = subprocess.run([sys.executable, "-m", "maskpro.bench.cli", "--help"], capture_output=True, text=True,
                         check=True, cwd="/").stdout
    assert all(sub in out for sub in cli.SUBCOMMANDS) and "examples:" in out
    # the source-tree spelling still works and is the same parser
    legacy = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--help"], capture_output=True, text=True,
                            check=True, cwd=ROOT).stdout
    assert legacy.startswith("usage: maskpro-bench kernels")


@pytest.mark.parametrize("argv, words", [
    (["kernels", "--config", "llama3"], "unknown model config 'llama3'"),
    (["kernels", "--shapes", "4096by4096"], "bad shape"),
    (["kernels", "--paths", "triton"], "need a CUDA GPU"),
    (["generate", "--config", "llama2-7b:x"], "layer count"),
    (["generate", "--runtime", "fast", "--points", "1x512"], "BATCH:PROMPT pairs"),
    (["generate", "--runtime", "fast", "--vllm-results", "/nonexistent.json"], "does not exist"),
    (["generate", "--runtime", "fast"], "needs a GPU"),
    (["learn", "--configs", "gpt5"], "unknown model config"),
    (["serve", "--url", "localhost:8000"], "not an http(s) URL"),
    (["serve"], "either --url"),
    (["quality", "--methods", "lottery"], "unknown method 'lottery'"),
    (["report", "--results", "/nonexistent/results"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(argv, words, capsys, tmp_path):
    assert cli.main([*argv, "--out-dir" if argv[0] != "report" else "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maskpro-bench: error: ") and words in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["kernels", "--tokens", "0"], ["kernels", "--tokens", "1", "x"], ["bogus"],
                                  ["generate", "--batch-sizes"]])
def test_bad_arguments_are_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maskpro-bench: error: ") and "--help" in err, err
