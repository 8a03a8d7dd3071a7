"""Code tasks (dashflow/core/code.py): the built-in synthetic task and MBPP / HumanEval files, read
through the real loaders and checked by running their reference solutions in the sandbox."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from dashflow.core import code, problems, sandbox
from dashflow.core.config import PRESETS, Params

WEIGHTS = [0.4, 0.25, 0.15, 0.2]


def test_pyfunc_is_seeded_distinct_split_and_every_reference_passes_its_own_tests():
    train, evals = code.pyfunc(40, 8, seed=3, level_weights=WEIGHTS, instruction=code.INSTRUCTION)
    again, _ = code.pyfunc(40, 8, seed=3, level_weights=WEIGHTS, instruction=code.INSTRUCTION)
    other, _ = code.pyfunc(40, 8, seed=4, level_weights=WEIGHTS, instruction=code.INSTRUCTION)
    assert train == again and train != other
    assert (len(train), len(evals)) == (40, 8)
    prompts = [r["prompt"] for r in train + evals]
    assert len(set(prompts)) == 48                                  # distinct problems, disjoint split
    row = train[0]
    tests = code.tests_of(row["answer"])
    assert tests["format"] == "mbpp" and len(tests["asserts"]) == 3
    assert all(a in row["prompt"] for a in tests["asserts"])       # shown as MBPP shows them
    assert row["prompt"].endswith(code.INSTRUCTION) and row["source"].startswith("pyfunc-L")
    assert {r["source"] for r in train + evals} >= {"pyfunc-L1", "pyfunc-L4"}
    outcomes = sandbox.run_many([(code.extract(r["solution"], "strict"), code.tests_of(r["answer"]))
                                 for r in train + evals], sandbox.Limits(), workers=2)
    assert [o.ok for o in outcomes] == [True] * 48
    # a wrong program fails them: the asserts test something
    wrong = sandbox.run(code.extract(row["solution"], "strict").replace("return", "return 1 + "), tests)
    assert wrong.passed < 3


def test_pyfunc_refuses_more_problems_than_it_has():
    with pytest.raises(code.CodeTaskError, match="cannot draw 600 distinct problems"):
        code.pyfunc(400, 200, seed=0, level_weights=WEIGHTS, instruction="")


MBPP_ROWS = [
    {"task_id": 11, "text": "Write a function to remove first and last occurrence of a given character.",
     "code": "def remove_Occ(s, ch):\n    return s.replace(ch, '', 1)[::-1].replace(ch, '', 1)[::-1]",
     "test_list": ["assert remove_Occ('hello','l') == 'heo'", "assert remove_Occ('abcda','a') == 'bcd'"],
     "test_setup_code": ""},
    {"task_id": 12, "prompt": "Write a function to compute the square root rounded down.",
     "code": "def isqrt_(n):\n    return math.isqrt(n)", "test_list": ["assert isqrt_(17) == 4"],
     "test_imports": ["import math"]},
]
HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/0", "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n"
                                         "    \"\"\"Sum of xs.\"\"\"\n",
     "canonical_solution": "    return sum(xs)\n", "entry_point": "total",
     "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mbpp_and_humaneval_files_become_prompts_whose_reference_solutions_pass(tmp_path):
    mbpp = problems.load_file(_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS), "mbpp", code.INSTRUCTION)
    table = pa.Table.from_pylist(HUMANEVAL_ROWS)
    pq.write_table(table, tmp_path / "he.parquet")
    he = problems.load_file(tmp_path / "he.parquet", "humaneval", code.INSTRUCTION)
    assert [r["prompt_id"] for r in mbpp + he] == ["mbpp-11", "mbpp-12", "he-HumanEval/0"]
    assert "Your code should pass these tests:\nassert remove_Occ('hello','l') == 'heo'" in mbpp[0]["prompt"]
    assert code.tests_of(mbpp[1]["answer"])["setup"] == "import math"
    assert he[0]["prompt"].startswith("Complete the following Python function:\n```python\nfrom typing import List")
    outcomes = [sandbox.run(code.extract(r["solution"], "strict"), code.tests_of(r["answer"])) for r in mbpp + he]
    assert [(o.passed, o.total) for o in outcomes] == [(2, 2), (1, 1), (2, 2)]
    # a completion that gives the whole HumanEval function, without the prompt's import, passes:
    # the prompt runs first
    body = "def total(xs: List[int]) -> int:\n    return sum(xs)"
    assert sandbox.run(body, code.tests_of(he[0]["answer"])).ok


@pytest.mark.parametrize("kind,row,message", [
    ("mbpp", {"text": "x"}, "row 1: field 'test_list' must be a non-empty list of assert strings"),
    ("mbpp", {"test_list": ["assert 1"]}, "row 1: missing field 'text' or 'prompt'"),
    ("humaneval", {"prompt": "def f():\n", "test": "def check(c): pass"}, "row 1: missing field 'entry_point'"),
])
def test_a_bad_code_row_names_the_file_the_row_and_the_field(tmp_path, kind, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(problems.ProblemError, match=f"bad.jsonl: {message}"):
        problems.load_file(path, kind, "")


def test_the_code_preset_and_the_code_tasks_defaults():
    params = Params.load(ROOT / "params.yaml", ["run.preset=dash-code"])
    assert params["filter"]["threshold"] == 0.01 and params["task"]["kind"] == "pyfunc"
    assert PRESETS["dash"]["filter.threshold"] == 0.1
    from dashflow.core import rewards

    assert rewards.settings(params)["functions"] == {"code": {"weight": 1.0, "extraction": "strict"}}
    assert problems.instruction(params["task"]) == code.INSTRUCTION
    assert problems.instruction({"kind": "arithmetic", "instruction": None}) == "Put the final answer in \\boxed{}."
    assert problems.instruction({"kind": "mbpp", "instruction": "Mine."}) == "Mine."


def test_sft_trains_on_the_reference_code_and_refuses_a_problem_without_one():
    train, _ = code.pyfunc(2, 0, seed=0, level_weights=WEIGHTS, instruction="")
    assert problems.sft_target(train[0]["solution"], train[0]["answer"]) == train[0]["solution"]
    assert problems.sft_target("x = 1", "5") == "x = 1\n\nThe answer is \\boxed{5}."
    with pytest.raises(problems.ProblemError, match="needs each problem's reference solution"):
        problems.sft_target(None, train[0]["answer"])


@pytest.mark.slow
def test_the_code_preset_runs_the_flow_rewarding_by_tests(prefect_server, tmp_path):
    from conftest import TINY
    from dashflow.core import schema, store
    from dashflow.flows.dash_rl import dash_rl

    overrides = dict(TINY, **{"run.root": str(tmp_path), "run.name": "code", "sample.max_new_tokens": 48,
                              "evaluate.max_new_tokens": 48, "task.num_train": 12})
    state = dash_rl(params_path=str(ROOT / "params.yaml"), overrides=overrides, iterations=1, preset="dash-code",
                    return_state=True)
    assert state.is_completed()
    it = tmp_path / "code" / "iter-0000"
    rewarded = store.read_stage(it / "rewarded", schema.REWARDED, stage="test").to_pylist()
    assert len(rewarded) == TINY["sample.prompts_per_iteration"] * TINY["sample.samples_per_prompt"]
    assert all(r["prompt"].endswith(code.INSTRUCTION) and code.tests_of(r["answer"]) for r in rewarded)
    for r in rewarded:   # reward = code, strict: all tests pass on the last ```python block
        assert r["reward"] == r["reward_code"] == float(r["strict_correct"])
        assert 0.0 <= r["tests_passed"] <= 1.0 and (r["tests_passed"] == 1.0) == r["strict_correct"]
        assert r["parsed_answer"] == code.extract(r["completion"], "strict")
    stats = json.loads((it / "rewarded" / "_manifest.json").read_text())["stats"]
    assert stats["strict_none"] == sum(code.extract(r["completion"], "strict") is None for r in rewarded)
    assert stats["tests_passed_mean"] == pytest.approx(sum(r["tests_passed"] for r in rewarded) / len(rewarded))
    kept = store.read_stage(it / "kept", schema.KEPT, stage="test").to_pylist()
    assert all(abs(r["advantage"]) > 0.01 for r in kept)
    ev = json.loads((it / "eval.json").read_text())
    assert {"greedy_strict", "greedy_flexible", "greedy_strict_none", "greedy_flexible_none"} <= set(ev)
