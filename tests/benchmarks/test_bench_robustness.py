"""``maskpro-bench robustness``: bad requests against a real server, and how a command's outcome is classed."""

from __future__ import annotations

import json

from maskpro.bench import cli
from maskpro.bench.robustness import Case, classify


def test_bad_requests_to_a_real_server_are_one_line_errors(tmp_path):
    out = tmp_path / "robustness.json"
    assert cli.main(["robustness", "--families", "requests", "--out", str(out)], record_command=False) == 0
    result = json.loads(out.read_text())
    assert result["tried"] >= 16 and result["by_family"]["requests"] == result["tried"]
    assert result["tracebacks"] == 0 and result["silent_successes"] == 0 and result["other"] == 0
    codes = {c["name"]: c["code"] for c in result["cases"]}
    assert codes["no API key"] == codes["wrong API key"] == 401 and codes["unknown model"] == 404
    assert result["env"]["git_commit"] is not None or result["env"]["command"]


def test_outcomes_are_classed_by_exit_code_and_last_line():
    def outcome(code, err, argv=("maskpro-check", "x"), expect=2):
        case = Case("options", "t", list(argv), expect)
        classify(case, code, err)
        return case.outcome

    assert outcome(2, "INFO loading\nmaskpro-check: error: x is damaged; copy it again\n") == "one_line_error"
    assert outcome(0, "") == "silent_success"
    assert outcome(1, "Traceback (most recent call last):\n  ...\nValueError: x\n") == "traceback"
    assert outcome(None, "") == "traceback"  # hung
    assert outcome(1, "maskpro-check: error: x\n") == "other"  # wrong exit code for bad input
    assert outcome(2, "error: x\n") == "other"  # no program prefix
