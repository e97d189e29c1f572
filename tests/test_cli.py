"""The command line: one-line errors, and a real kill -9 of a learning run that resumes to the same result."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from maskpro.artifacts import load_masks
from maskpro.checkpoint import load_tensors
from maskpro.cli import main
from maskpro.learner import CHECKPOINT


@pytest.mark.parametrize("args,msg", [
    (["prune", "--method", "foo", "--out", "x"], "unknown method 'foo'"),
    (["prune", "--nm", "4:4", "--out", "x"], "invalid sparsity 4:4"),
    (["prune", "--nm", "2-4", "--out", "x"], "write it as N:M"),
    (["prune", "--method", "maskpro", "--init", "nope", "--out", "x"], "unknown --init 'nope'"),
    (["eval", "--model", "/nonexistent/model"], "not a local Hugging Face folder"),
    (["check", "--model", "/nonexistent"], "not a maskpro output"),
])
def test_bad_input_is_one_line_with_exit_2(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and err.count("\n") == 0 and err.startswith("maskpro: error:")


def test_missing_data_and_indivisible_dims(tiny_model_dir, tmp_path, capsys):
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--data-dir", str(tmp_path / "no"),
                 "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "data directory" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "magnitude", "--nm", "2:5",
                 "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "not divisible by M=5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _prune_cmd(model, out, steps=300):
    return [sys.executable, "-m", "maskpro.cli", "prune", "--model", str(model), "--method", "maskpro",
            "--init", "magnitude", "--steps", str(steps), "--checkpoint-every", "10", "--batch-size", "2",
            "--seq-len", "16", "--n-docs", "8", "--lr", "300", "--scale", "3", "--out", str(out), "-q"]


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_prune_cmd(tiny_model_dir, ref), check=True, timeout=600, capture_output=True)

    out = tmp_path / "killed"
    ckpt = tmp_path / "killed.work" / CHECKPOINT
    proc = subprocess.Popen(_prune_cmd(tiny_model_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step, deadline = 0, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file():
            try:
                step = load_tensors(ckpt)[1]["step"]
            except Exception:  # never a torn file (atomic rename), but be safe while polling
                step = 0
            if step >= 30:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; raise --steps"
    assert 30 <= load_tensors(ckpt)[1]["step"] < 300 and not out.exists()

    done = subprocess.run(_prune_cmd(tiny_model_dir, out), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_masks(ref), load_masks(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sub", ["prune", "eval", "check"])
def test_help_states_each_default_once(sub, capsys):
    import re

    with pytest.raises(SystemExit):
        main([sub, "--help"])
    text = " ".join(capsys.readouterr().out.split())       # undo argparse's line wrapping
    for option in re.split(r" (?=--?[a-z])", text):
        assert option.count("(default") <= 1 and "(default: None)" not in option, option
    shown = {"prune": ["policy-gradient steps of the learner (default: 1000)", "--seed SEED seed of the data draws "
                       "and the learner's sampling (default: 0)", "--device DEVICE cpu, cuda, cuda:N or auto "
                       "(default: auto)"],
             "eval": ["--seq-len SEQ_LEN (default: 2048)", "--batch-size BATCH_SIZE (default: 4)"],
             "check": []}[sub]
    assert [s for s in shown if s not in text] == []  # every default is there, in the form users read it


@pytest.mark.parametrize("option, words", [(["--steps", "-5"], "--steps must be >= 1"),
                                           (["--seq-len", "0"], "--seq-len must be >= 1"),
                                           (["--calib-samples", "0"], "--calib-samples must be >= 1"),
                                           (["--batch-size", "0"], "--batch-size must be >= 1"),
                                           (["--n-docs", "-1"], "--n-docs must be >= 0"),
                                           (["--ema", "1.5"], "--ema must be in [0, 1)"),
                                           (["--lr", "0"], "--lr and --scale must be > 0")])
def test_bad_numbers_are_refused_before_the_model_loads(option, words, tmp_path, capsys):
    # the model folder does not exist either: the option must be what is reported, so it was checked first
    assert main(["prune", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), *option]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_out_is_checked_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    for out, words in ((a_file, "is a file; name a folder"), (a_file / "sub", "cannot be created"),
                       (taken, "pass --overwrite")):
        # the model does not exist: the --out problem must be what is reported, so it came first
        assert main(["prune", "--model", str(tmp_path / "absent"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert main(["prune", "--model", str(tmp_path / "absent"), "--out", str(taken), "--overwrite"]) == 2
    assert "not a local Hugging Face folder" in capsys.readouterr().err   # --overwrite lets it through to the load


def test_the_default_work_folder_goes_after_success_unless_kept(tiny_model_dir, tmp_path):
    base = ["prune", "--model", str(tiny_model_dir), "--method", "maskpro", "--init", "magnitude", "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--n-docs", "4", "-q"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "maskpro.json").is_file() and not (tmp_path / "a.work").exists()
    assert main(base + ["--out", str(tmp_path / "b"), "--keep-work"]) == 0
    assert (tmp_path / "b.work" / CHECKPOINT).is_file()
