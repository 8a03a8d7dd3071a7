"""params/paper.yaml, the DASH paper's setup: it loads and validates as the paper's numbers,
and it runs end to end on CPU with the embedded model and tiny sizes substituted by overrides."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, TINY
from dashflow.core.config import Params, ParamsError

PAPER = ROOT / "params" / "paper.yaml"


def test_the_paper_file_is_the_papers_setup():
    p = Params.load(PAPER)
    assert p["model"]["name"] == "Qwen/Qwen2.5-0.5B-Instruct" and p["model"]["dtype"] == "bfloat16"
    assert p["run"]["device"] == "cuda" and p["sample"]["backend"] == "vllm"
    assert p["sample"]["prompts_per_iteration"] * p["sample"]["samples_per_prompt"] == 256
    assert (p["sample"]["samples_per_prompt"], p["sample"]["max_new_tokens"], p["sample"]["temperature"],
            p["sample"]["top_k"]) == (4, 2048, 0.9, 50)
    assert (p["learn"]["lr"], p["learn"]["lr_schedule"], p["learn"]["precision"]) == (3.0e-6, "linear", "bf16-mixed")
    # the dash preset on top: one on-policy step per batch, dr_grpo's normaliser, KL 0.04, filter 0.1
    assert (p["learn"]["update"], p["learn"]["steps"], p["learn"]["loss_agg"], p["learn"]["kl_coef"]) == (
        "multi", 1, "constant", 0.04)
    assert p["filter"]["enabled"] and p["filter"]["threshold"] == 0.1
    assert p["reward"]["functions"] == {"math": {"weight": 1.0, "extraction": "strict"}}
    assert set(p["evaluate"]["sets"]) == {"math500", "gsm8k"} and p["task"]["kind"] == "math"
    assert p.iterations == 117 and list(p["schedule"]["evaluate"]) == ["base", "19", "39", "59", "79", "99", "116"]
    # everything it does not set is params.yaml's
    assert p["learn"]["max_grad_norm"] == Params.load(ROOT / "params.yaml")["learn"]["max_grad_norm"]


def test_an_extending_file_refuses_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {ROOT / 'params.yaml'}\nlearn:\n  lr_typo: 1.0e-6\n")
    with pytest.raises(ParamsError, match="unknown parameter 'learn.lr_typo'"):
        Params.load(bad)
    bad.write_text(f"extends: {ROOT / 'params.yaml'}\nlearner:\n  lr: 1.0e-6\n")
    with pytest.raises(ParamsError, match="unknown section 'learner'"):
        Params.load(bad)
    bad.write_text(f"extends: {ROOT / 'params.yaml'}\nlearn:\n  lr: fast\n")
    with pytest.raises(ParamsError, match="learn.lr = 'fast' is not allowed"):
        Params.load(bad)


@pytest.mark.slow
def test_the_paper_file_runs_on_cpu_with_tiny_sizes(prefect_server, tmp_path):
    from dashflow.flows.dash_rl import dash_rl

    math_train, math500, gsm8k = tmp_path / "math_train.jsonl", tmp_path / "math500.jsonl", tmp_path / "gsm8k.jsonl"
    math_train.write_text("".join(json.dumps({"problem": f"What is {a} + {b}?", "solution": f"{a} + {b} = \\boxed{{{a + b}}}"})
                                  + "\n" for a in range(6) for b in range(5)))
    math500.write_text("".join(json.dumps({"problem": f"What is {a} - 1?", "answer": str(a - 1)}) + "\n" for a in range(3)))
    gsm8k.write_text("".join(json.dumps({"question": f"Tom has {a} pens and buys 2. How many?",
                                         "answer": f"{a} + 2 = {a + 2}\n#### {a + 2}"}) + "\n" for a in range(2)))
    overrides = dict(TINY, **{
        "run.iterations": 1, "run.root": str(tmp_path / "runs"), "run.device": "cpu",
        "model.name": "embedded:smollm2-135m-instruct", "model.dtype": "float32", "sample.backend": "hf",
        "sample.token_budget": 16384, "sample.max_batch_size": 64, "learn.micro_batch_tokens": 256,
        "task.path": str(math_train), "task.num_eval": 0,
        "evaluate.sets": {"math500": {"kind": "math", "path": str(math500)},
                          "gsm8k": {"kind": "gsm8k", "path": str(gsm8k)}}})
    state = dash_rl(params_path=str(PAPER), overrides=overrides, return_state=True)
    assert state.is_completed()
    run = tmp_path / "runs" / "dash-paper"
    m = json.loads((run / "iter-0000" / "metrics.json").read_text())
    assert m["rows"] == 4 * 3 and m["learner"]["precision"] == "bf16-mixed" and m["learner"]["optimizer_steps"] == 1
    ev = json.loads((run / "iter-0000" / "eval.json").read_text())
    assert (ev["math500/prompts"], ev["gsm8k/prompts"]) == (3, 2) and "greedy_strict" not in ev
    assert {"math500/greedy_strict", "math500/greedy_flexible", "gsm8k/pass@2_strict", "gsm8k/maj@2_flexible"} <= set(ev)
