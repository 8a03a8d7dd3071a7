"""`dashflow inspect` on a hand-made rollout table."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dashflow.cli import app
from dashflow.inspecting import InspectError, summarize


@pytest.fixture
def stage_dir(tmp_path):
    rows = []
    for p in range(2):
        for g in range(2):
            n_tokens = [2, 4, 6, 8][2 * p + g]
            rows.append({"prompt_id": f"p{p}", "sample_index": g, "prompt": f"q{p}", "answer": "1",
                         "completion": f"c{p}{g}", "completion_token_ids": list(range(n_tokens)),
                         "finish_reason": "stop" if g == 0 else "length", "reward": float(p == 0 and g == 0),
                         "correct": p == 0 and g == 0, "parsed_answer": "1", "reward_error": None,
                         "group_std": 0.7 if p == 0 else 0.0})
    d = tmp_path / "rewarded"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), d / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), d / "part-00001.parquet")
    return d


def test_summary_numbers(stage_dir):
    s = summarize(stage_dir)
    assert s["rows"] == 4 and s["prompts"] == 2 and s["groups"] == 2 and s["mixed_groups"] == 1
    assert s["reward_mean"] == 0.25 and s["accuracy"] == 0.25
    assert s["finish_reasons"] == {"stop": 2, "length": 2}
    # lengths 2, 4, 6, 8: linear quantiles p10 = 2.6, p50 = 5, p90 = 7.4
    assert s["completion_tokens"]["p10"] == pytest.approx(2.6)
    assert s["completion_tokens"]["p50"] == pytest.approx(5.0)
    assert s["completion_tokens"]["p90"] == pytest.approx(7.4)
    assert s["completion_tokens"]["max"] == 8
    assert s["examples"]["best"]["completion"] == "c00"


def test_cli_json_and_errors(stage_dir, tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(stage_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 4
    text = CliRunner().invoke(app, ["inspect", str(stage_dir)])
    assert "4 rows, 2 prompts" in text.output
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InspectError, match="not a stage output"):
        summarize(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "part-00000.parquet").write_bytes(b"nope")
    with pytest.raises(InspectError, match="unreadable Parquet"):
        summarize(bad)
