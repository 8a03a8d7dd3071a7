"""The benchmark scripts run at the tiny size and print their tables. (What they measure is
reported by running them at full size; see bench/RESULTS.md. No timing is asserted.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

SCRIPTS = {
    # script: (extra arguments, a column header its table must have, rows in the JSON)
    "arms.py": (["--presets", "grpo,dash:learn.objective=cispo", "-n", "1"], "time saved vs grpo", 2),
    "sampler.py": (["--backends", "hf,vllm"], "bare generate tok/s", 6),
    "learner.py": ([], "bare fwd+bwd tok/s", 2),
    "overhead.py": ([], "overhead share", 2),
    "scaling.py": ([], "rollouts/s", 2),
    "scaleout.py": ([], "stage wall s", 4),
    "prompt_format.py": (["--samples", "1", "--formats", "0,2"], "greedy strict", 2),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_runs_tiny_and_prints_its_table(script, tmp_path):
    extra, header, rows = SCRIPTS[script]
    out = tmp_path / "result.json"
    args = [sys.executable, str(ROOT / "bench" / script), "--tiny", "--out", str(out), *extra]
    if script == "arms.py":
        args += ["--root", str(tmp_path / "arms")]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert header in table[0], proc.stdout[-3000:]
    assert set(table[1].replace("|", "").strip()) <= set("-: ")  # the markdown separator row
    result = json.loads(out.read_text())
    listed = result.get("arms") or result.get("rows")
    assert len(listed) >= rows and len(table) >= 2 + rows
