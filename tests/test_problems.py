"""Prompt sources: the arithmetic task, the GSM8K/MATH loaders, their errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from dashflow.core import problems
from dashflow.core.problems import ProblemError


def test_arithmetic_is_seeded_disjoint_and_correct():
    train, evals = problems.arithmetic(200, 40, seed=3, level_weights=[0.4, 0.25, 0.15, 0.2], instruction="Box it.")
    again, _ = problems.arithmetic(200, 40, seed=3, level_weights=[0.4, 0.25, 0.15, 0.2], instruction="Box it.")
    other, _ = problems.arithmetic(200, 40, seed=4, level_weights=[0.4, 0.25, 0.15, 0.2], instruction="Box it.")
    assert train == again and train != other
    assert len(train) == 200 and len(evals) == 40
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    for row in train + evals:
        a, op, b = row["prompt"].removeprefix("What is ").split("?")[0].split()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
        assert row["answer"] == str(expected)
        assert row["prompt"].endswith("Box it.")
    levels = {r["source"] for r in train}
    assert levels == {"arithmetic-L1", "arithmetic-L2", "arithmetic-L3", "arithmetic-L4"}


def test_gsm8k_loader_on_real_rows():
    # the first 20 of 200 real GSM8K train rows (MIT licence beside them in tests/data)
    path = ROOT / "tests" / "data" / "gsm8k_train_sample.jsonl"
    rows = problems.load_file(path, "gsm8k", "Box it.")
    assert len(rows) == 20
    first = json.loads(path.read_text().splitlines()[0])
    assert rows[0]["answer"] == first["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    assert rows[0]["prompt"] == first["question"].strip() + " Box it."
    assert "####" not in rows[0]["solution"]
    train, evals = problems.split(rows, num_train=15, num_eval=5, seed=0)
    assert len(train) == 15 and len(evals) == 5
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in evals}


@pytest.mark.parametrize("content, message", [
    ('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n', r"bad.jsonl: row 2: missing field 'answer'"),
    ('{"question": "1+1?", "answer": "it is 2"}\n', r"row 1: field 'answer' does not end in '####"),
    ('{"question": "1+1?", "answer": ["#### 3"]}\n', r"bad.jsonl: row 1: field 'answer' is a list \(\['#### 3'\]\); expected text"),
    ('{"question": {"q": 1}, "answer": "#### 3"}\n', r"bad.jsonl: row 1: field 'question' is a dict"),
    ('{"question": "' + "x" * 70_000 + '", "answer": "#### 3"}\n',
     r"bad.jsonl: row 1: field 'question' is 70,000 characters long; at most 65,536 are allowed"),
])
def test_a_gsm8k_row_that_is_missing_broken_not_text_or_huge_is_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ProblemError, match=message):
        problems.load_file(path, "gsm8k", "")


def test_a_parquet_task_file_that_is_not_parquet_is_named(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    with pytest.raises(ProblemError, match=r"train.parquet: not a readable Parquet file .*or name it .jsonl"):
        problems.load_file(path, "gsm8k", "")


def test_math_loader_answer_or_boxed_solution_parquet(tmp_path):
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"problem": "Half of 1?", "answer": "\\frac{1}{2}", "solution": None},
        {"problem": "Sum?", "answer": None, "solution": "We get $\\boxed{\\frac{3}{4}}$."},
    ]), path)
    rows = problems.load_file(path, "math", "")
    assert [r["answer"] for r in rows] == ["\\frac{1}{2}", "\\frac{3}{4}"]


def test_math_row_without_answer_or_box(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"problem": "x?", "solution": "no box here"}\n')
    with pytest.raises(ProblemError, match=r"m.jsonl: row 1: field 'solution' has no \\boxed"):
        problems.load_file(path, "math", "")
    path.write_text('{"solution": "\\\\boxed{1}"}\n')
    with pytest.raises(ProblemError, match=r"row 1: missing field 'problem'"):
        problems.load_file(path, "math", "")


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ProblemError, match=r"x.jsonl: row 2: not valid JSON"):
        problems.load_file(path, "gsm8k", "")


def test_last_boxed_nested_braces():
    assert problems.last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert problems.last_boxed("nothing") is None


def test_sft_target_ends_in_the_checked_answer_format():
    from dashflow.core.problems import last_boxed, sft_target

    assert sft_target("2 + 3 = 5. The answer is \\boxed{5}.", "5") == "2 + 3 = 5. The answer is \\boxed{5}."
    gsm = sft_target("She has 3 + 4 = 7 apples.", "7")  # GSM8K: worked answer without the '#### 7' line
    assert gsm == "She has 3 + 4 = 7 apples.\n\nThe answer is \\boxed{7}." and last_boxed(gsm) == "7"
    assert sft_target(None, "12") == "The answer is \\boxed{12}."


USER_TASK = '''
def squares(seed, count=5, offset=0):
    for n in range(count):
        yield {"question": f"What is {n + offset} squared?", "answer": str((n + offset) ** 2),
               "solution": f"{n + offset} x {n + offset} = \\\\boxed{{{(n + offset) ** 2}}}", "id": f"sq-{n}"}


def broken(seed):
    yield {"question": "no answer here"}


def twice(seed):
    yield {"question": "a", "answer": "1", "id": "x"}
    yield {"question": "b", "answer": "2", "id": "x"}
'''


def test_a_task_of_your_own_by_import_path(tmp_path, monkeypatch):
    from dashflow.core import problems as p

    (tmp_path / "my_tasks.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {"kind": "my_tasks:squares", "options": {"count": 6, "offset": 1}, "num_train": 4, "num_eval": 2,
           "instruction": "Box it."}
    train, evals = p.load_task(cfg, seed=0)
    rows = sorted(train + evals, key=lambda r: r["prompt_id"])
    assert [r["prompt_id"] for r in rows] == [f"sq-{n}" for n in range(6)]
    assert rows[2] == {"prompt_id": "sq-2", "prompt": "What is 3 squared? Box it.", "answer": "9",
                       "solution": "3 x 3 = \\boxed{9}", "source": "my_tasks:squares"}
    assert len(train) == 4 and len(evals) == 2 and not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in evals}
    with pytest.raises(p.ProblemError, match=r"task my_tasks:broken: problem 0: missing field 'answer'"):
        p.load_task(dict(cfg, kind="my_tasks:broken", options={}), seed=0)
    with pytest.raises(p.ProblemError, match=r"id 'x' is not unique"):
        p.load_task(dict(cfg, kind="my_tasks:twice", options={}), seed=0)
    with pytest.raises(p.ProblemError, match=r"task.kind = 'my_tasks:nope': my_tasks has no function 'nope'"):
        p.load_task(dict(cfg, kind="my_tasks:nope"), seed=0)
    with pytest.raises(p.ProblemError, match=r"cannot import 'no_such_tasks_mod'"):
        p.load_task(dict(cfg, kind="no_such_tasks_mod:f"), seed=0)


def test_prepare_keys_a_task_of_your_own_by_its_source(tmp_path, monkeypatch):
    from conftest import tiny_params
    from dashflow.tasks import prepare

    (tmp_path / "my_tasks2.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    params = tiny_params(tmp_path / "runs", **{"task.kind": "my_tasks2:squares", "task.options": {"count": 8},
                                              "task.num_train": 6, "task.num_eval": 2})
    m = prepare.prepare_prompts(params)
    assert m.stats == {"train_prompts": 6, "eval_prompts": 2, "demonstrations": 1, "system": False} and prepare.prepare_prompts(params).cached
    (tmp_path / "my_tasks2.py").write_text(USER_TASK + "\n# edited\n")
    assert not prepare.prepare_prompts(params).cached


def test_a_task_brings_its_default_reward_and_eval_sets_where_params_say_null(tmp_path, monkeypatch):
    from conftest import tiny_params
    from dashflow.core import problems as p
    from dashflow.core import rewards

    (tmp_path / "my_tasks3.py").write_text(USER_TASK + '''
REWARD_FUNCTIONS = {"boxed": {"function": "math", "extraction": "strict", "weight": 2.0}}
EVAL_SETS = {"mine": {"kind": "math", "path": "mine.jsonl"}}
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    nulls = {"reward.functions": None, "evaluate.sets": None}
    mine = tiny_params(tmp_path / "runs", **{"task.kind": "my_tasks3:squares"}, **nulls)
    assert rewards.settings(mine)["functions"] == {"boxed": {"function": "math", "extraction": "strict", "weight": 2.0}}
    assert p.task_defaults(mine["task"])["eval_sets"] == {"mine": {"kind": "math", "path": "mine.jsonl"}}
    # a task module without them, and the built-in tasks: the math reward (flexible) and the held-out split
    plain = tiny_params(tmp_path / "runs", **{"task.kind": "my_tasks:squares"}, **nulls)
    (tmp_path / "my_tasks.py").write_text(USER_TASK)
    for params in (plain, tiny_params(tmp_path / "runs", **nulls)):
        assert rewards.settings(params)["functions"] == {"math": {"weight": 1.0, "extraction": "flexible"}}
        assert p.task_defaults(params["task"])["eval_sets"] == {"heldout": {"kind": "heldout"}}
    # params.yaml's own value wins over the task's
    explicit = {"reward.functions": {"math": {"weight": 1.0, "extraction": "flexible"}}}
    assert rewards.settings(tiny_params(tmp_path / "runs", **{"task.kind": "my_tasks3:squares"}, **explicit))[
        "functions"] == {"math": {"weight": 1.0, "extraction": "flexible"}}
