"""bench/arms.py --merge: one table over seeds run in separate invocations (hand-made JSON;
the numbers below are worked out by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

KEYS = ("reward_mean", "reward_last", "strict_base", "strict_last", "flexible_base", "flexible_last",
        "mean_completion_tokens", "kept_fraction", "tokens_per_kept_row", "clip_fraction",
        "mean_strict_last", "pass_strict_last")


def _result(strict_last: float, curve: list[float], seconds: float) -> dict:
    """One (arm, seed) result as bench/arms.py writes it."""
    r = {key: 0.5 for key in KEYS}
    r.update(strict_last=strict_last, flexible_last=strict_last, reward_curve=curve,
             reward_mean=sum(curve) / len(curve),
             time_s={k: seconds for k in ("sampling", "reward", "learner", "overhead", "total")})
    return r


def _invocation(path, arms: dict, iterations: int = 8) -> None:
    listed = [{"arm": a, "per_seed": {str(s): r for s, r in runs.items()}} for a, runs in arms.items()]
    path.write_text(json.dumps({"iterations": iterations, "seeds": [], "tiny": False, "overrides": {"a": 1},
                                "machine": "m", "arms": listed}))


def _merge(tmp_path, *names):
    out = tmp_path / "merged.json"
    args = [sys.executable, str(ROOT / "bench" / "arms.py"), "--out", str(out)]
    for name in names:
        args += ["--merge", str(tmp_path / name)]
    wide = dict(os.environ, COLUMNS="1000")  # the error panel must not fold a path
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=wide)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_merge_takes_each_seed_once_with_spread_and_no_times(tmp_path):
    _invocation(tmp_path / "a.json", {"dash": {0: _result(0.5, [0.2, 0.4], 30.0),
                                               1: _result(0.625, [0.3, 0.5], 31.0)},
                                      "dyn": {0: _result(0.75, [0.4, 0.6], 100.0)}})
    _invocation(tmp_path / "b.json", {"dash": {0: _result(0.5, [0.2, 0.4], 40.0),   # seed 0 again: the same run
                                               2: _result(0.25, [0.1, 0.1], 41.0)},
                                      "dyn": {0: _result(0.5, [0.4, 0.6], 90.0)}})  # seed 0 again: not the same
    proc, merged = _merge(tmp_path, "a.json", "b.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dash, dyn = merged["arms"]
    assert (dash["arm"], dash["seeds"], dyn["seeds"]) == ("dash", [0, 1, 2], [0])
    # strict last over seeds 0, 1, 2: (0.5 + 0.625 + 0.25) / 3 = 0.458333..., min 0.25, max 0.625
    assert dash["strict_last"]["min"] == 0.25 and dash["strict_last"]["max"] == 0.625
    assert abs(dash["strict_last"]["mean"] - 1.375 / 3) < 1e-12
    # reward mean over seeds: (0.3 + 0.4 + 0.1) / 3
    assert abs(dash["reward_mean"]["mean"] - 0.8 / 3) < 1e-12
    assert dyn["strict_last"]["mean"] == 0.75  # the first file's seed 0 is kept
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    assert dash["from"] == {"0": a, "1": a, "2": b}
    # times compare only within one invocation: none in the merged table
    assert dash["time_s"]["total"] == {"mean": None, "min": None, "max": None}
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| dash |"))
    assert row.split("|")[2].strip() == "-" and "45.8% (25.0..62.5)" in row
    assert merged["said"] == [
        f"dash seed 0 is in {tmp_path / 'a.json'} and {tmp_path / 'b.json'}: the same run (reward curve and "
        "evaluations equal)",
        f"dyn seed 0 is in {tmp_path / 'a.json'} and {tmp_path / 'b.json'}: not the same run (differs in "
        "strict_last, flexible_last); the first is kept"]


def test_merge_refuses_files_of_different_setups_and_names_the_file(tmp_path):
    _invocation(tmp_path / "a.json", {"dash": {0: _result(0.5, [0.2], 30.0)}})
    _invocation(tmp_path / "b.json", {"dash": {1: _result(0.5, [0.2], 30.0)}}, iterations=4)
    (tmp_path / "c.json").write_text('{"arms": []}')
    proc, merged = _merge(tmp_path, "a.json", "b.json")
    assert proc.returncode == 2 and merged is None
    assert "b.json: iterations is 4 but" in proc.stderr and "a.json has 8" in proc.stderr
    proc, merged = _merge(tmp_path, "a.json", "c.json")
    assert proc.returncode == 2 and merged is None
    assert "c.json: not a bench/arms.py --out JSON" in proc.stderr
