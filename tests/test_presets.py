"""Each of the DASH paper's arms, selected by `preset`, runs through the real flow on the
tiny config and writes the metrics that tell the arms apart."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, TINY
from dashflow.core.config import PRESETS

pytestmark = pytest.mark.slow


# dash-code (the code task) has its own run: tests/test_code_task.py
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "dash-code"])
def test_preset_runs_and_writes_its_metrics(preset, prefect_server, tmp_path):
    from dashflow.flows.dash_rl import dash_rl

    overrides = dict(TINY, **{"run.root": str(tmp_path), "run.name": preset})
    state = dash_rl(params_path=str(ROOT / "params.yaml"), overrides=overrides, iterations=1, preset=preset,
                    return_state=True)
    assert state.is_completed()
    run = tmp_path / preset
    m = json.loads((run / "iter-0000" / "metrics.json").read_text())
    lm = m["learner"]
    sample = json.loads((run / "iter-0000" / "rollouts" / "_manifest.json").read_text())["stats"]
    cfg = PRESETS[preset]
    groups = TINY["sample.prompts_per_iteration"]
    kept_rows = round(m["kept_fraction"] * m["rows"])
    assert m["rows"] == groups * TINY["sample.samples_per_prompt"]
    ev = json.loads((run / "iter-0000" / "eval.json").read_text())
    assert {"greedy_strict", "greedy_flexible", "mean@2_strict", "pass@2_flexible"} <= set(ev)
    assert (run / "report.png").exists()
    assert sample["generation_batches"] == (groups if cfg["sample.batching"] == "per_group" else 1)
    if not cfg["filter.enabled"]:
        assert m["kept_fraction"] == 1.0
    assert kept_rows > 0 and m["updated"] and lm["loss"] is not None
    if cfg["learn.mode"] == "sft" or m["mixed_group_fraction"] > 0:
        assert lm["grad_norm"] > 0
    else:  # every group's rewards are equal: zero advantages, and the KL to the (identical) reference has zero slope
        assert lm["grad_norm"] == 0.0 and lm["loss"] == 0.0
    # every arm of the paper steps once per sampled batch (grpo too); Multi/Mini K = 3 times
    expected_steps = 3 if preset in ("multi", "mini") else 1
    assert lm["optimizer_steps"] == expected_steps and lm["precision"] == "bf16-mixed"
    # the loss is normalised by the batch as sampled (SFT: one reference solution per prompt)
    assert lm["sampled_rows"] == (groups if cfg["learn.mode"] == "sft" else m["rows"])
    has_kl = cfg["learn.kl_coef"] > 0 and cfg["learn.mode"] == "rl"
    assert has_kl == (preset not in ("dash-nokl", "sft"))
    assert (lm["kl_to_reference"] is not None) == has_kl
    # the reference stage runs in every iteration; it scores the kept rows only when KL is on
    ref = json.loads((run / "iter-0000" / "reference" / "_manifest.json").read_text())["stats"]
    assert ref["rows"] == (kept_rows if has_kl else 0)
    if cfg["learn.mode"] == "rl":
        # the sampler runs float32 weights (model.dtype), the learner bf16 autocast: ~2e-2 apart
        assert lm["sampler_mismatch"] < 0.1 and lm["entropy"] > 0
        if _steps_with_kept_rows(run, cfg) > 1:
            assert lm["approx_kl_to_sampling"] > 0   # a step after one that moved the weights is off-policy
        else:
            assert lm["clip_fraction"] == 0.0      # one on-policy step: the ratio is 1


def _steps_with_kept_rows(run, cfg) -> int:
    """How many of the learner's planned steps see a kept row (Mini: a step whose groups the
    filter all dropped moves no weight, so the next step may still be on-policy)."""
    from dashflow.core import schema, store
    from dashflow.core.algorithms import plan_steps
    from dashflow.core.sampled_batch import read_sampled

    it = run / "iter-0000"
    sampled = [g["prompt_id"] for g in read_sampled(it / "kept", needed_by="test")]
    kept = set(store.read_stage(it / "kept", schema.KEPT, stage="test")["prompt_id"].to_pylist())
    plan = plan_steps(sampled, cfg["learn.update"], cfg["learn.steps"])
    return sum(any(g in kept for g in step) for step in plan)
