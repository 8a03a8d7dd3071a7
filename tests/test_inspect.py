"""`dashflow inspect`, `diff` and `report` on hand-made stage outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dashflow.app.cli import app
from dashflow.app.inspecting import InspectError, diff, summarize
from dashflow.core import store
from dashflow.ops.report import ReportError, collect, plot, write_report


def _rollouts(rewards_by_prompt: dict[str, list[float]], lengths=None):
    rows, k = [], 0
    for pid, rewards in rewards_by_prompt.items():
        for g, r in enumerate(rewards):
            n = lengths[k] if lengths else 3
            rows.append({"prompt_id": pid, "sample_index": g, "prompt": f"question {pid}", "answer": "1",
                         "completion": f"completion {pid}/{g}", "completion_token_ids": list(range(n)),
                         "finish_reason": "stop" if n < 8 else "length", "reward": r, "correct": r == 1.0,
                         "parsed_answer": "1" if r else "0", "reward_error": None if g else "TimeoutException: x"})
            k += 1
    return rows


@pytest.fixture
def stage_dir(tmp_path):
    # p0: all correct, p1: mixed (1 of 2), p2: all wrong; lengths 2, 4 | 6, 8 | 10, 12
    rows = _rollouts({"p0": [1.0, 1.0], "p1": [1.0, 0.0], "p2": [0.0, 0.0]}, lengths=[2, 4, 6, 8, 10, 12])
    d = tmp_path / "rewarded"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4]), d / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), d / "part-00001.parquet")
    return d


def test_summary_numbers(stage_dir):
    s = summarize(stage_dir)
    assert s["rows"] == 6 and s["prompts"] == 3
    assert (s["groups"], s["all_correct"], s["all_wrong"], s["mixed"]) == (3, 1, 1, 1)
    assert s["reward_mean"] == pytest.approx(0.5) and s["accuracy"] == pytest.approx(0.5)
    assert s["reward_distribution"] == {"0.0": 3, "1.0": 3}
    assert s["finish_reasons"] == {"stop": 3, "length": 3}
    assert s["reward_errors"] == 3 and s["reward_error_examples"] == ["TimeoutException: x"]
    # lengths 2..12 step 2, linear interpolation: p10 = 2 + 0.5 * 2 = 3, p50 = 7, p90 = 11
    t = s["completion_tokens"]
    assert (t["p10"], t["p50"], t["p90"], t["max"], t["mean"]) == pytest.approx((3.0, 7.0, 11.0, 12, 7.0))
    assert s["examples"]["best"]["reward"] == 1.0 and s["examples"]["worst"]["reward"] == 0.0
    assert s["examples"]["best"]["completion"].startswith("completion p0")


def test_filters(stage_dir):
    s = summarize(stage_dir, where="reward < 0.5")
    assert s["rows"] == 3 and s["reward_mean"] == 0.0 and s["prompts"] == 2
    s = summarize(stage_dir, prompt_id="p1")
    assert s["rows"] == 2 and s["reward_mean"] == 0.5
    s = summarize(stage_dir, where="completion_tokens >= 6 and finish_reason == 'stop'")
    assert s["rows"] == 1 and s["examples"]["random"]["prompt_id"] == "p1"
    assert summarize(stage_dir, where="reward > 5")["rows"] == 0
    with pytest.raises(InspectError, match=r"--where 'rewrd < 1'.*columns are"):
        summarize(stage_dir, where="rewrd < 1")
    assert set(summarize(stage_dir, limit=1)["examples"]) == {"best"}
    # the rest of the grammar: or, not, a boolean column alone, `in`, chained comparison, negatives
    both = summarize(stage_dir, where="reward < 0.5 or prompt_id == 'p1'")["rows"]
    assert both == summarize(stage_dir, where="not (reward >= 0.5 and prompt_id != 'p1')")["rows"] > 3
    assert summarize(stage_dir, where="correct")["rows"] == 3 == summarize(stage_dir, where="not correct")["rows"]
    assert summarize(stage_dir, where="prompt_id in ['p0', 'p2']")["rows"] == 4
    assert summarize(stage_dir, where="3 <= completion_tokens < 7")["rows"] == \
        summarize(stage_dir, where="completion_tokens >= 3 and completion_tokens < 7")["rows"]
    assert summarize(stage_dir, where="reward > -1")["rows"] == 6


@pytest.mark.parametrize("where", [
    "@store.os.system('touch {f}')==0",                       # the pandas-query injection that ran
    "__import__('os').system('touch {f}') == 0",
    "reward.__class__ == 1",
    "open('{f}', 'w') is None",
    "[x for x in ()] == []",
    "reward < (lambda: __import__('os').system('touch {f}'))()",
])
def test_where_runs_no_code_and_says_what_is_allowed(stage_dir, tmp_path, where):
    marker = tmp_path / "pwned"
    with pytest.raises(InspectError, match=r"--where .*allowed: columns, literals"):
        summarize(stage_dir, where=where.format(f=marker))
    result = CliRunner().invoke(app, ["inspect", str(stage_dir), "--where", where.format(f=marker)])
    assert result.exit_code != 0 and "allowed" in result.output
    assert not marker.exists()


@pytest.mark.parametrize("where, message", [
    ("prompt_id in [1, 'a']", r"--where .*Arrow"),                 # mixed literal types
    ("reward < 100000000000000000000", r"--where .*OverflowError"),  # a 20-digit literal
    ("not " * 20000 + "correct", r"--where: 80,007 characters; at most 2,000"),
    ("(" * 300 + "correct" + ")" * 300, r"--where .*(nested|not an expression)"),
])
def test_where_that_arrow_cannot_build_is_one_line_not_a_traceback(stage_dir, where, message):
    with pytest.raises(InspectError, match=message):
        summarize(stage_dir, where=where)
    result = CliRunner().invoke(app, ["inspect", str(stage_dir), "--where", where])
    assert result.exit_code != 0 and "Traceback" not in result.output and result.exception is None or \
        isinstance(result.exception, SystemExit)


def test_cli_json_schema_and_errors(stage_dir, tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(stage_dir), "--json", "--where", "reward == 1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"path", "rows", "prompts", "groups", "all_correct", "all_wrong", "mixed", "reward_mean",
            "reward_distribution", "accuracy", "completion_tokens", "finish_reasons", "reward_errors",
            "examples", "filter"} <= set(data)
    assert data["rows"] == 3
    text = CliRunner().invoke(app, ["inspect", str(stage_dir)])
    assert text.exit_code == 0 and "all_correct" in text.output and "── best" in text.output
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InspectError, match="not a stage output"):
        summarize(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "part-00000.parquet").write_bytes(b"nope")
    with pytest.raises(InspectError, match="unreadable Parquet"):
        summarize(bad)
    missing = CliRunner().invoke(app, ["inspect", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "no such file" in missing.output


def test_inspect_an_older_revision_through_dvc(tmp_path, monkeypatch):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1")
    sh = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    out = tmp_path / "data" / "rewarded"
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_rollouts({"p0": [1.0, 0.0]})), out / "part-00000.parquet")
    sh(sys.executable, "-m", "dvc", "add", "-q", "data/rewarded")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "v1")
    pq.write_table(pa.Table.from_pylist(_rollouts({"p0": [0.0, 0.0], "p1": [0.0, 0.0]})), out / "part-00000.parquet")
    sh(sys.executable, "-m", "dvc", "add", "-q", "data/rewarded")
    sh("git", "commit", "-qam", "v2")
    monkeypatch.chdir(tmp_path)
    old = summarize("data/rewarded", rev="HEAD~1")
    new = summarize("data/rewarded")
    assert (old["rows"], old["reward_mean"]) == (2, 0.5)
    assert (new["rows"], new["reward_mean"]) == (4, 0.0)
    with pytest.raises(InspectError, match="not in revision"):
        summarize("data/elsewhere", rev="HEAD~1")
    import dvc.api  # the README's snippet

    with dvc.api.open("data/rewarded/part-00000.parquet", rev="HEAD~1", mode="rb") as f:
        assert pq.read_table(f).num_rows == 2


def _eval_dir(root, name, correct: dict[str, bool], tokens: dict[str, int]):
    d = root / name
    d.mkdir(parents=True)
    rows = [{"prompt_id": p, "mode": "greedy", "sample_index": 0, "strict_correct": c, "flexible_correct": True,
             "completion_tokens": tokens[p], "strict_answer": str(int(c)), "flexible_answer": str(int(c)),
             "prompt": "q", "answer": "1", "completion": "x", "reward_error": None} for p, c in correct.items()]
    rows += [dict(r, mode="sampled", strict_correct=False) for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), d / "part-00000.parquet")
    return d


def test_diff_same_prompts(tmp_path):
    a = _eval_dir(tmp_path, "a", {"p0": False, "p1": True, "p2": False}, {"p0": 30, "p1": 20, "p2": 10})
    b = _eval_dir(tmp_path, "b", {"p0": True, "p1": False, "p2": True, "p3": True}, {"p0": 10, "p1": 20, "p2": 4, "p3": 1})
    d = diff(a, b, mode="greedy")
    assert d["shared_prompts"] == 3
    assert (d["score_a"], d["score_b"]) == pytest.approx((1 / 3, 2 / 3))
    assert (d["tokens_a"], d["tokens_b"]) == pytest.approx((20.0, 34 / 3))
    assert (d["improved"], d["worsened"], d["answers_changed"]) == (2, 1, 3)
    assert [c["prompt_id"] for c in d["changes"]] == ["p0", "p1", "p2"]
    assert diff(a, b, mode="sampled")["score_b"] == 0.0
    result = CliRunner().invoke(app, ["diff", str(a), str(b)])
    assert result.exit_code == 0 and "improved 2, worsened 1" in result.output


def test_diff_without_shared_prompts_explains(tmp_path):
    a = _eval_dir(tmp_path, "a", {"p0": True}, {"p0": 1})
    b = _eval_dir(tmp_path, "b", {"p1": True}, {"p1": 1})
    with pytest.raises(InspectError, match="share no prompt_id"):
        diff(a, b)


def _fake_run(root, n):
    for i in range(n):
        it = root / f"iter-{i:04d}"
        it.mkdir(parents=True)
        (it / "metrics.json").write_text(json.dumps({
            "iteration": i, "reward_mean": 0.1 * i, "kept_fraction": 0.5, "mean_completion_tokens": 40 - i,
            "time": {"sampling": 10.0, "reward": 1.0, "learner": 5.0 + i, "overhead": 2.0, "total": 18.0 + i}}))
    for i, acc in ((-1, 0.25), (n - 1, 0.5)):
        d = root / ("base" if i < 0 else f"iter-{i:04d}") / "eval"
        store.run_stage("evaluate", i, d, inputs={}, params={}, code="t",
                        build=lambda tmp, a=acc: {"stats": {"greedy_strict": a, "greedy_flexible": 2 * a,
                                                            "mean@4_strict": a / 2, "mean@4_flexible": a}})


def test_report_plots_every_iteration(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, 3)
    data = collect(run)
    assert data["iteration"] == [0, 1, 2]
    assert data["eval"] == {"iteration": [-1, 2], "greedy_strict": [0.25, 0.5], "greedy_flexible": [0.5, 1.0],
                            "mean@n_strict": [0.125, 0.25], "mean@n_flexible": [0.25, 0.5]}
    fig = plot(data, tmp_path / "p.png")
    reward_ax, length_ax, kept_ax, time_ax = fig.axes[:4]
    assert list(reward_ax.lines[0].get_xdata()) == [0, 1, 2]
    assert list(reward_ax.lines[0].get_ydata()) == pytest.approx([0.0, 0.1, 0.2])
    assert list(reward_ax.lines[1].get_xdata()) == [-1, 2]          # greedy eval incl. the base model
    assert [list(line.get_ydata()) for line in reward_ax.lines[1:]] == [[0.25, 0.5], [0.5, 1.0], [0.125, 0.25], [0.25, 0.5]]
    assert list(length_ax.lines[0].get_ydata()) == [40, 39, 38]
    assert list(kept_ax.lines[0].get_ydata()) == [0.5, 0.5, 0.5]
    assert len(time_ax.containers) == 4 and all(len(c) == 3 for c in time_ax.containers)
    tops = [bar.get_y() + bar.get_height() for bar in time_ax.containers[-1]]
    assert tops == pytest.approx([18.0, 19.0, 20.0])                 # stacked to each iteration's total
    result = write_report(run)
    import matplotlib.image

    img = matplotlib.image.imread(result["png"])
    assert img.shape[:2] == (750, 1100)
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert json.loads((run / "report.json").read_text())["iteration"] == [0, 1, 2]


def test_report_on_a_non_run_directory(tmp_path):
    with pytest.raises(ReportError, match="no iter-\\*/metrics.json"):
        collect(tmp_path)
