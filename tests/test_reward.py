"""Reward functions as plug-ins: the built-in math reward, user functions by import path, weights,
one column per function, and every failure (exception, timeout, bad return) recorded per row."""

from __future__ import annotations

import signal
import textwrap
import threading
import time

import pyarrow as pa
import pytest

from dashflow.core import rewards, schema, store

USER_MODULE = textwrap.dedent('''
    import time

    def brevity(prompt, completion, answer, metadata):
        return 1.0 - metadata["completion_tokens"] / 10

    def picky(prompt, completion, answer, metadata):
        if "boom" in completion:
            raise RuntimeError("exploded on " + metadata["prompt_id"])
        if "slow" in completion:
            time.sleep(30)
        if "text" in completion:
            return "yes"
        return float(answer in prompt)
''')


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the spawned scoring process imports it too
    return tmp_path


def _rollouts(completions: list[str], answer: str = "12") -> pa.Table:
    n = len(completions)
    return pa.Table.from_pylist([{
        "run": "t", "iteration": 0, "prompt_id": f"p{i}", "sample_index": 0, "prompt": "What is 7 + 5 (12)?",
        "answer": answer, "prompt_token_ids": [1], "completion_token_ids": list(range(i + 1)), "completion": c,
        "sampler_logprobs": [0.0] * (i + 1), "finish_reason": "stop", "policy_version": "v"}
        for i, c in enumerate(completions)], schema=schema.ROLLOUTS) if n else schema.ROLLOUTS.empty_table()


CFG = {"timeout_s": 1, "max_chars": 4000}


def test_weighted_functions_each_in_its_own_column(user_rewards):
    cfg = dict(CFG, functions={"math": {"weight": 1.0, "extraction": "strict"},
                               "short": {"function": "my_rewards:brevity", "weight": 0.5}})
    table = rewards.add_rewards(_rollouts(["\\boxed{12}", "12", "\\boxed{13}"]), cfg)
    rows = table.to_pylist()
    assert [r["reward_math"] for r in rows] == [1.0, 0.0, 0.0]            # strict: a bare 12 does not count
    assert [r["reward_short"] for r in rows] == pytest.approx([0.9, 0.8, 0.7])  # 1 - tokens / 10
    assert [r["reward"] for r in rows] == pytest.approx([1.45, 0.4, 0.35])
    assert [r["strict_correct"] for r in rows] == [True, False, False]
    assert [r["flexible_correct"] for r in rows] == [True, True, False]   # recorded whichever one pays
    assert [r["correct"] for r in rows] == [True, False, False] and rows[1]["parsed_answer"] is None
    assert all(r["reward_error"] is None for r in rows)


def test_flexible_math_reward_pays_the_bare_number():
    cfg = dict(CFG, functions={"math": {"extraction": "flexible"}})
    rows = rewards.add_rewards(_rollouts(["\\boxed{12}", "12", "no"]), cfg).to_pylist()
    assert [r["reward"] for r in rows] == [1.0, 1.0, 0.0] and rows[1]["parsed_answer"] == "12"


def test_exception_timeout_and_bad_return_are_recorded_per_row(user_rewards):
    cfg = dict(CFG, functions={"math": {"extraction": "flexible"}, "picky": {"function": "my_rewards:picky"}})
    t0 = time.monotonic()
    rows = rewards.add_rewards(_rollouts(["\\boxed{12}", "boom \\boxed{12}", "slow \\boxed{12}", "text 12"]), cfg).to_pylist()
    elapsed = time.monotonic() - t0
    assert [r["reward_picky"] for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert [r["reward_math"] for r in rows] == [1.0, 1.0, 1.0, 1.0]     # the other function still paid
    assert [r["reward"] for r in rows] == [2.0, 1.0, 1.0, 1.0]
    assert rows[0]["reward_error"] is None
    assert rows[1]["reward_error"] == "picky: RuntimeError: exploded on p1"
    assert rows[2]["reward_error"] == "picky: timed out after 1 s"
    assert rows[3]["reward_error"] == "picky: TypeError: returned 'yes', not a finite number"
    assert elapsed < 10  # the 30 s sleep was cut at the 1 s bound


def test_rows_are_scored_in_a_spawned_process_off_the_main_thread(user_rewards):
    """Prefect may run a task in a worker thread, where no alarm can be set: the rows go to a
    spawned process (whose main thread can), with the same results."""
    cfg = dict(CFG, functions={"math": {"extraction": "flexible"}, "picky": {"function": "my_rewards:picky"}})
    rows = [{"prompt": "12?", "completion": c, "answer": "12", "prompt_id": "p", "completion_token_ids": [1]}
            for c in ("\\boxed{12}", "slow 12")]
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", rewards.score_many(rows, rewards.functions(cfg), cfg)))
    thread.start()
    thread.join(60)
    assert [r["reward"] for r in out["r"]] == [2.0, 1.0]
    assert out["r"][1]["reward_error"] == "picky: timed out after 1 s"


def test_the_alarm_puts_an_outer_alarm_back():
    """A Prefect task timeout set before the reward stage still fires, with the time it had left."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(time.monotonic()))
    try:
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        with rewards.time_bound(5):
            time.sleep(0.2)
        assert 1.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 1.3
        time.sleep(1.6)
        assert fired and 1.4 < fired[0] - t0 < 1.9
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("functions,message", [
    ({}, "must map names"),
    ({"math": {"weight": 1, "colour": "red"}}, "allowed keys are function, weight, extraction"),
    ({"Bad-Name": {"function": "math"}}, "must match"),
    ({"error": {"function": "math"}}, "not 'error'"),
    ({"x": {"function": "nocolon"}}, "import path module:function"),
    ({"math": {"weight": "heavy"}}, "a finite number"),
    ({"math": {"extraction": "lenient"}}, "one of strict, flexible"),
])
def test_bad_reward_settings_are_refused_with_the_key(functions, message):
    with pytest.raises(store.StageError, match=message):
        rewards.functions({"functions": functions})


def test_a_function_that_cannot_be_imported_names_the_setting():
    with pytest.raises(store.StageError, match=r"reward.functions.mine.function = 'no_such_module_x:f'.*cannot import"):
        rewards.add_rewards(_rollouts(["1"]), dict(CFG, functions={"mine": {"function": "no_such_module_x:f"}}))
    with pytest.raises(store.StageError, match="has no function 'nothing'"):
        rewards.add_rewards(_rollouts(["1"]), dict(CFG, functions={"mine": {"function": "json:nothing"}}))


def test_overlong_shaping_adds_dapos_length_penalty_to_the_reward():
    """reward.overlong_buffer 2 of max_new_tokens 4: completions of 1..4 tokens lose 0, 0,
    1/2 and (cut at the limit) all of overlong_penalty 0.5; the penalty is its own column."""
    cfg = dict(CFG, functions={"math": {"extraction": "flexible"}}, overlong_buffer=2, overlong_penalty=0.5,
               max_new_tokens=4)
    rows = rewards.add_rewards(_rollouts(["12", "12", "12", "no"]), cfg).to_pylist()
    assert [len(r["completion_token_ids"]) for r in rows] == [1, 2, 3, 4]
    assert [r["reward_overlong"] for r in rows] == [0.0, 0.0, -0.25, -0.5]
    assert [r["reward"] for r in rows] == [1.0, 1.0, 0.75, -0.5]
    assert "reward_overlong" not in rewards.add_rewards(_rollouts(["12"]), dict(cfg, overlong_buffer=0)).column_names
