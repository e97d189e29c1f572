"""The data-parallel learning benchmark on CPU: one process with its 2-micro-batch reference, then torchrun with 2
gloo processes; the JSON must show both runs, the comparison, and bit-identical masks and logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_one_and_two_processes_write_rows_and_an_identical_digest(tmp_path):
    out = tmp_path / "learn-distributed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    bench = ["-m", "maskpro.bench.learn_distributed", "--config", "tiny", "--memory", "lean", "--out", str(out)]
    one = subprocess.run([sys.executable, *bench, "--reference-world", "2"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *bench], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    r = json.loads(out.read_text())
    w1, w2 = r["runs"]["tiny/lean/b8/w1"], r["runs"]["tiny/lean/b8/w2"]
    assert (w1["world_size"], w2["world_size"], w2["env"]["world_size"]) == (1, 2, 2)
    assert w2["env"]["device"] == "cpu" and "learn_distributed" in w2["env"]["command"]
    assert w1["rows_per_forward"] == 8 and w2["rows_per_forward"] == 4
    assert w1["reference"]["2"]["rows_per_forward"] == 4
    assert w1["learner_state_bytes"] < 4 * w1["linear_weights"] + 1024   # lean: the logits and a few floats
    for row in (w1, w2):
        assert row["ms_p10"] <= row["ms_per_step"] <= row["ms_p90"] and row["steps_per_s"] > 0
    cmp = r["comparisons"]["tiny/lean/b8/w2"]
    assert cmp["masks_identical_to_reference"] and cmp["logits_identical_to_reference"]
    assert cmp["speedup"] == w2["steps_per_s"] / w1["steps_per_s"]
