"""The prompt format (task.system, task.fewshot, task.demonstrations): drawn and given
demonstrations, the chat turns every reader renders, the cache keys it moves, and the
rendered prompt `dashflow inspect --full-prompt` shows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_params
from dashflow.core import models, problems, prompts, schema, store
from dashflow.core import policy as policy_mod
from dashflow.tasks import evaluate, prepare, sample

TRAIN = [{"prompt_id": f"p{k}", "prompt": f"What is {k} + 1? Box it.", "answer": str(k + 1), "solution": None,
          "source": "t"} for k in range(10)]


def test_fewshot_draws_train_rows_seeded_with_their_worked_answers():
    one = prompts.demonstrations({"fewshot": 2}, TRAIN, seed=0)
    assert one == prompts.demonstrations({"fewshot": 2}, TRAIN, seed=0)
    assert one != prompts.demonstrations({"fewshot": 2}, TRAIN, seed=1)
    for d in one:
        k = int(d["question"].split()[2])
        assert d["question"] == TRAIN[k]["prompt"]
        assert d["answer"] == f"The answer is \\boxed{{{k + 1}}}."   # sft_target of a row without a solution
    assert prompts.demonstrations({"fewshot": 0}, TRAIN, seed=0) == []
    with pytest.raises(problems.ProblemError, match="task.fewshot = 11: the train split has only 10 prompts"):
        prompts.demonstrations({"fewshot": 11}, TRAIN, seed=0)


def test_given_demonstrations_win_over_fewshot_and_a_file_is_checked_row_by_row(tmp_path):
    given = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5.\nThe final answer is \\boxed{5}."}]
    assert prompts.demonstrations({"fewshot": 3, "demonstrations": given}, TRAIN, seed=0) == given
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps(given[0]) + "\n\n" + json.dumps({"question": "x", "answer": ""}) + "\n")
    with pytest.raises(problems.ProblemError, match=rf"{path}: row 3: field 'answer' must be a non-empty string"):
        prompts.demonstrations({"demonstrations": str(path)}, TRAIN, seed=0)
    path.write_text(json.dumps(given[0]) + "\n")
    assert prompts.demonstrations({"demonstrations": str(path)}, TRAIN, seed=0) == given


def test_context_is_system_then_demonstration_turns():
    demos = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    turns = json.loads(prompts.context({"system": "Be brief."}, demos))
    assert turns == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
                     {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                     {"role": "assistant", "content": "a2"}]
    assert prompts.context({"system": None}, []) == "[]"
    assert prompts.turns({"context": None}) == [] and prompts.turns({}) == []


@pytest.mark.slow
def test_chat_prompt_renders_the_turns_through_the_chat_template():
    tok = policy_mod.load_tokenizer(models.resolve_model("embedded:smollm2-135m-instruct"))
    ids = policy_mod.chat_prompt(tok, "What is 4 + 4?", [{"role": "system", "content": "Box it."},
                                                          {"role": "user", "content": "What is 1 + 1?"},
                                                          {"role": "assistant", "content": "\\boxed{2}"}])
    assert tok.decode(ids) == ("<|im_start|>system\nBox it.<|im_end|>\n<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n"
                               "<|im_start|>assistant\n\\boxed{2}<|im_end|>\n<|im_start|>user\nWhat is 4 + 4?<|im_end|>\n"
                               "<|im_start|>assistant\n")


@pytest.mark.slow
def test_the_format_moves_the_keys_of_the_stages_that_read_prompts(tmp_path):
    params = tiny_params(tmp_path, **{"task.fewshot": 1})
    first = prepare.run(params)
    policy_before = store.read_manifest(params.layout.policy(-1))
    rows = sample.run(params, 0)
    system = params.with_overrides({"task.system": "Put the final answer in \\boxed{}."})
    again = prepare.run(system)
    assert not again.cached and again.digest != first.digest           # prompts rebuilt
    assert store.read_manifest(system.layout.policy(-1)).key == policy_before.key   # base policy untouched
    resampled = sample.run(system, 0)
    assert not resampled.cached and resampled.digest != rows.digest     # its input changed
    table = store.read_stage(system.layout.stage_dir("sample", 0), schema.ROLLOUTS, stage="test").to_pylist()
    assert all(r["prompt_text"].startswith("<|im_start|>system\nPut the final answer in \\boxed{}.<|im_end|>")
               for r in table)
    # an evaluation set from another file gets the run's format too
    gsm = ROOT / "tests" / "data" / "gsm8k_train_sample.jsonl"
    rows = evaluate.set_prompts(system, "gsm", {"kind": "gsm8k", "path": str(gsm)}, 2)
    assert [prompts.turns(r)[0]["role"] for r in rows] == ["system", "system"]
    # `dashflow inspect --full-prompt` shows the whole rendered prompt
    out = subprocess.run([sys.executable, "-m", "dashflow.app.cli", "inspect",
                          str(system.layout.stage_dir("sample", 0)), "--limit", "1", "--full-prompt"],
                         capture_output=True, text=True, check=True).stdout
    assert "prompt, as the policy saw it:" in out and "Put the final answer in \\boxed{}.<|im_end|>" in out
    assert prompts.turns(prompts.read_prompts(system, "train").to_pylist()[0])[1]["content"] in out


def test_dynamic_sampling_rounds_draw_new_prompts_and_leave_the_next_iterations_alone():
    import pyarrow as pa

    from dashflow.core import prompts

    table = pa.table({"prompt_id": [f"p{i}" for i in range(10)]})
    first = prompts.iteration_prompts(table, 0, 4, seed=0)
    used = {r["prompt_id"] for r in first}
    more = prompts.round_prompts(table, 0, 1, 4, seed=0, used=used)
    assert len(more) == 4 and not used & {r["prompt_id"] for r in more}
    assert more == prompts.round_prompts(table, 0, 1, 4, seed=0, used=used)        # seeded
    assert more != prompts.round_prompts(table, 0, 2, 4, seed=0, used=used)        # each round its own order
    everything = used | {r["prompt_id"] for r in more}
    assert len(prompts.round_prompts(table, 0, 2, 4, seed=0, used=everything)) == 2  # what is left
