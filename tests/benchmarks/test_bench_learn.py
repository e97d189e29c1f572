"""The learn benchmark on a tiny config: ms/step of each variant and the computed MaskLLM memory column."""

from __future__ import annotations

import json
import math

from maskpro.bench import cli, configs
from maskpro.bench.learn_speed import maskllm_bytes, maskpro_bytes
from maskpro.nm import NM


def test_learn_tiny_config_writes_ms_per_step_and_memory_model(tmp_path):
    out = tmp_path / "learner-test.json"
    assert cli.main(["learn", "--configs", "tiny", "--steps", "3", "--warmup", "1", "--naive-steps", "2",
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["env"]["command"].startswith("maskpro-bench learn")
    c = r["configs"]["tiny"]
    n = configs.CONFIGS["tiny"].linear_weights()
    assert c["linear_weights"] == n
    for variant in ("maskpro", "naive"):  # the in-run baseline and ours, same process, same model
        row = c["rows"][variant]
        assert row["ms_p10"] <= row["ms_per_step"] <= row["ms_p90"] and row["ms_per_step"] > 0
        assert row["peak_rss_mib"] > 0 and isinstance(row["trusted"], bool)
    assert set(c["rows"]["maskpro"]["breakdown_ms"]) == {"sample", "forward", "update"}
    assert c["speedup_vs_naive"] == c["rows"]["naive"]["ms_per_step"] / c["rows"]["maskpro"]["ms_per_step"]
    mm = c["memory_model"]
    # fp32 on CPU: MaskLLM keeps C(4,2) = 6 fp32 logits per group of 4 weights
    assert mm["maskllm"]["logits_fp32"] == n // 4 * 6 * 4
    assert mm["maskllm"] == maskllm_bytes(n, 4) and mm["maskpro"] == maskpro_bytes(n, 4)
    assert mm["maskllm_over_maskpro"] == mm["maskllm"]["total_lower_bound"] / mm["maskpro"]["total"]
    assert r["maskllm_assumptions"] and out.with_suffix(".png").is_file()


def test_memory_formulas():
    n = 4096
    ours = maskpro_bytes(n, 2)  # fp16: 4 B logits, 4 B noise, 1 B mask, two 2-byte weight copies
    assert ours["total"] == 13 * n and ours["bytes_per_weight"] == 13
    theirs = maskllm_bytes(n, 2)
    assert theirs["logits_fp32"] == n / 4 * math.comb(4, 2) * 4 == 6 * n  # 1.5 logits per weight
    assert theirs["adamw_moments_fp32"] == 2 * theirs["logits_fp32"]
    assert theirs["total_lower_bound"] == sum(v for k, v in theirs.items() if k.endswith(("fp32", "frozen", "masked")))
    assert theirs["total_lower_bound"] == (6 + 6 + 12 + 6 + 4 + 2 + 2) * n
    assert maskllm_bytes(n, 2, NM(2, 8))["logits_fp32"] == n // 8 * 28 * 4  # C(8,2) = 28 candidates
