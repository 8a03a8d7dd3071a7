"""The learner computes what the DASH paper's code computes (issue: results a researcher can
trust). Each test here failed on the code before the fix it names; stages run on real
Parquet and the real SmolLM2 model (tiny sizes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from conftest import ROOT, fork_run, tiny_params
from dashflow.core import algorithms, batches, samplers, schema, store, update
from dashflow.core import policy as policy_mod
from dashflow.core import prompts as prompts_mod
from dashflow.core.config import PRESETS, Params
from dashflow.core.optimizer_state import OPTIMIZER_FILE
from dashflow.tasks import advantage, learn, prepare, reward, sample
from dashflow.tasks import filter as filter_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    """Iteration 0 of the tiny run up to `reward`: 4 prompt groups of 3 real completions."""
    params = tiny_params(tmp_path_factory.mktemp("faithful"))
    prepare.run(params)
    sample.run(params, 0)
    reward.run(params, 0)
    advantage.run(params, 0)
    return params


# ---------------------------------------------------------------- 1. the arms


def test_arms_differ_in_exactly_what_the_paper_varies():
    def diff(a, b):
        return {k for k in set(PRESETS[a]) | set(PRESETS[b]) if PRESETS[a].get(k) != PRESETS[b].get(k)}

    assert diff("grpo", "preemptive") == {"sample.batching"}
    assert diff("preemptive", "dash") == {"filter.enabled"}
    assert diff("dash", "dash-nokl") == {"learn.kl_coef"}
    assert diff("dash", "multi") == {"learn.steps"}
    assert diff("dash", "mini") == {"learn.update", "learn.steps"}
    # the code arm: the paper's code threshold (0.01), on the code task, with room for a function
    assert diff("dash", "dash-code") == {"filter.threshold", "task.kind", "task.num_train", "task.num_eval",
                                         "sample.max_new_tokens", "evaluate.max_new_tokens"}
    grpo = Params.load(ROOT / "params.yaml", {"run.preset": "grpo"})
    # the authors' standard GRPO: one group per generation call, ONE on-policy step per batch,
    # dr_grpo normaliser, std-normalised advantages (eps 1e-4), k3 KL 0.04, bf16 autocast, no filter
    assert grpo["sample"]["batching"] == "per_group" and grpo["filter"]["enabled"] is False
    assert (grpo["learn"]["update"], grpo["learn"]["steps"]) == ("multi", 1)
    assert algorithms.planned_steps(grpo["learn"]["update"], grpo["learn"]["steps"], 16) == 1
    assert grpo["learn"]["loss_agg"] == "constant" and grpo["advantage"]["epsilon"] == 1e-4
    assert (grpo["learn"]["kl_coef"], grpo["learn"]["kl_estimator"]) == (0.04, "k3")
    assert grpo["learn"]["precision"] == "bf16-mixed"
    assert (grpo["sample"]["temperature"], grpo["sample"]["top_k"]) == (0.9, 50)


# ---------------------------------------------------------------- 2. a filter that only saves compute


HAND_ADVANTAGES = [[1.0, -0.5, -0.5],      # a mixed group
                   [0.0, 0.0, 0.0],        # all-equal rewards: nothing to learn
                   [0.05, -0.05, 0.0],     # small |A|: dropped at threshold 0.1
                   [0.8, -0.4, -0.4]]


def _learn_variant(src: Params, root: Path, name: str, *, threshold: float | None, zero_small: bool = False,
                   edit=None, **overrides) -> tuple[store.Manifest, dict]:
    """learn@0 on the real rollouts with HAND_ADVANTAGES, filtered at `threshold` (None: the
    filter off); zero_small: the small-|A| group's advantages set to 0 instead; `edit`, a
    function of the advantaged table, changes it further."""
    params = tiny_params(root, name, **overrides, **({"filter.enabled": False} if threshold is None
                                                      else {"filter.threshold": threshold}))
    fork_run(src, params, iteration_stages=("sample", "reward"))
    table = store.read_stage(src.layout.stage_dir("advantage", 0), schema.ADVANTAGED, stage="test")
    order = list(dict.fromkeys(table.column("prompt_id").to_pylist()))
    assert len(order) == 4 and table.num_rows == 12
    adv = [HAND_ADVANTAGES[order.index(p)][k] for p, k in zip(table.column("prompt_id").to_pylist(),
                                                             table.column("sample_index").to_pylist())]
    if zero_small:
        adv = [0.0 if abs(a) < 0.1 else a for a in adv]
    table = table.set_column(table.column_names.index("advantage"), "advantage", pa.array(adv, pa.float32()))
    if edit is not None:
        table = edit(table)

    def build(tmp):
        store.write_shard(tmp, 0, table, schema.ADVANTAGED, stage="test")
        return {}

    store.run_stage("advantage", 0, params.layout.stage_dir("advantage", 0), inputs={},
                    params={"hand": adv, "edit": edit.__name__ if edit else None},
                    code="hand", build=build)
    filter_stage.run(params, 0)
    m = learn.run(params, 0)
    return m, policy_mod.read_weights(params.layout.policy(0))


def _same_update(a, b, base, loss_abs: float = 1e-7):
    """Same loss and gradient norm (before AdamW, which would hide a constant factor) and the
    same weight update up to float rounding (relative to the update's own size)."""
    (ma, wa), (mb, wb) = a, b
    # (at ratio 1 the loss value is -sum(A) / n: ~0 up to rounding for zero-mean groups)
    assert ma.stats["loss"] == pytest.approx(mb.stats["loss"], rel=1e-5, abs=loss_abs)
    assert ma.stats["grad_norm"] == pytest.approx(mb.stats["grad_norm"], rel=1e-5)
    da = torch.cat([(wa[k] - base[k]).flatten() for k in base])
    db = torch.cat([(wb[k] - base[k]).flatten() for k in base])
    assert da.norm() > 0 and ((da - db).norm() / da.norm()).item() < 1e-3


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean", "constant"])
def test_filtering_zero_advantage_rows_leaves_the_update_exactly_as_it_was(rollouts, tmp_path, loss_agg):
    """Threshold 0 drops the all-equal group and the one zero row: 8 of 12 rows reach the
    learner, and loss, gradient norm and new weights equal the unfiltered update's (the loss
    is normalised by the batch as sampled, not by the kept rows)."""
    everything = _learn_variant(rollouts, tmp_path, "all", threshold=None, **{"learn.loss_agg": loss_agg})
    zero = _learn_variant(rollouts, tmp_path, "zero", threshold=0.0, **{"learn.loss_agg": loss_agg})
    assert (everything[0].stats["rows"], zero[0].stats["rows"]) == (12, 8)
    assert zero[0].stats["sampled_rows"] == 12 and everything[0].stats["grad_norm"] > 0
    _same_update(everything, zero, policy_mod.read_weights(rollouts.layout.policy(-1)))


def test_filtering_small_advantages_changes_the_update_by_those_rows_only(rollouts, tmp_path):
    """Threshold 0.1 also drops the small-|A| group: the update equals the unfiltered update
    of the same batch with those rows' advantages set to 0 -- nothing else changes."""
    small = _learn_variant(rollouts, tmp_path, "small", threshold=0.1)
    zeroed = _learn_variant(rollouts, tmp_path, "zeroed", threshold=None, zero_small=True)
    assert (small[0].stats["rows"], zeroed[0].stats["rows"]) == (6, 12)
    _same_update(small, zeroed, policy_mod.read_weights(rollouts.layout.policy(-1)))


def _set(table: pa.Table, name: str, values: list) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, pa.array(values, table.schema.field(name).type))


def test_dropping_truncated_rows_masks_their_loss_and_nothing_else(rollouts, tmp_path):
    """filter.drop_truncated (DAPO's overlong filtering): the rows cut at max_new_tokens never
    reach the learner, and the update equals the unfiltered one with their advantages set to 0.
    (The tiny run's 12 new tokens cut nearly every completion, so the test marks sample 1 of
    each group as cut and the others as stopped.)"""
    def second_cut(t):
        return _set(t, "finish_reason", ["length" if k == 1 else "stop" for k in t.column("sample_index").to_pylist()])

    def zero_second(t):
        t = second_cut(t)
        return _set(t, "advantage", [0.0 if k == 1 else a for a, k in
                                     zip(t.column("advantage").to_pylist(), t.column("sample_index").to_pylist())])

    dropped = _learn_variant(rollouts, tmp_path, "drop", threshold=None, edit=second_cut,
                             **{"filter.drop_truncated": True})
    zeroed = _learn_variant(rollouts, tmp_path, "zeroed", threshold=None, edit=zero_second)
    assert (dropped[0].stats["rows"], zeroed[0].stats["rows"]) == (8, 12)
    kept = store.read_manifest(tmp_path / "drop" / "iter-0000" / "kept")
    assert kept.stats["dropped"] == {"truncated": 4}
    _same_update(dropped, zeroed, policy_mod.read_weights(rollouts.layout.policy(-1)))


def test_a_sequence_mask_removes_exactly_the_mismatched_sequences(rollouts, tmp_path):
    """learn.tis_mode sequence_mask, bounds [0.5, 3]: the first group's sampler log-probs are
    lowered by 3 on their first token (its sequences' ratio R = e^3 = 20 > 3), so those
    sequences -- and only those -- leave the loss: the update equals the uncorrected one with
    their advantages set to 0 (every other ratio is 1 up to the hf sampler's float32 noise)."""
    first = None

    def mismatched(t):
        nonlocal first
        first = t.column("prompt_id")[0].as_py()
        lp = [[x - 3.0 if k == 0 and p == first else x for k, x in enumerate(row)]
              for row, p in zip(t.column("sampler_logprobs").to_pylist(), t.column("prompt_id").to_pylist())]
        return _set(t, "sampler_logprobs", lp)

    def zero_first(t):
        return _set(t, "advantage", [0.0 if p == t.column("prompt_id")[0].as_py() else a for a, p in
                                     zip(t.column("advantage").to_pylist(), t.column("prompt_id").to_pylist())])

    masked = _learn_variant(rollouts, tmp_path, "mask", threshold=None, edit=mismatched, **{
        "learn.tis_cap": 3.0, "learn.tis_min": 0.5, "learn.tis_mode": "sequence_mask"})
    zeroed = _learn_variant(rollouts, tmp_path, "zero", threshold=None, edit=zero_first)
    table = store.read_stage(rollouts.layout.stage_dir("advantage", 0), schema.ADVANTAGED, stage="test")
    tokens = [len(c) for c in table.column("completion_token_ids").to_pylist()]
    first_tokens = sum(n for n, p in zip(tokens, table.column("prompt_id").to_pylist()) if p == first)
    assert masked[0].stats["mismatch_masked"] == pytest.approx(first_tokens / sum(tokens))
    # the kept sequences' weights are R = 1 up to the sampler's float noise (|1 - R| ~ 1e-5),
    # which scales the ~0 loss value (-sum(A) / n) by as much
    _same_update(masked, zeroed, policy_mod.read_weights(rollouts.layout.policy(-1)), loss_abs=1e-5)


def test_objectives_agree_at_one_on_policy_step_and_part_off_policy(rollouts, tmp_path):
    """learn.objective: at one on-policy step ppo, gspo and cispo give the same update (ratio
    1); with two steps per batch the second step is off-policy and they part: at GSPO's
    paper's clip (3e-4 / 4e-4) gspo clips whole sequences and ppo single tokens, while cispo
    keeps every token's gradient."""
    base = policy_mod.read_weights(rollouts.layout.policy(-1))
    one = {o: _learn_variant(rollouts, tmp_path, f"{o}1", threshold=None, **{"learn.objective": o})
           for o in ("ppo", "gspo", "cispo")}
    for o in ("gspo", "cispo"):
        assert one[o][0].stats["grad_norm"] == pytest.approx(one["ppo"][0].stats["grad_norm"], rel=1e-5)
        da = torch.cat([(one[o][1][k] - base[k]).flatten() for k in base])
        db = torch.cat([(one["ppo"][1][k] - base[k]).flatten() for k in base])
        assert ((da - db).norm() / db.norm()).item() < 1e-3
    two = {o: _learn_variant(rollouts, tmp_path, f"{o}2", threshold=None, **{
        "learn.objective": o, "learn.steps": 2, "learn.clip_eps": 3e-4, "learn.clip_eps_high": 4e-4})
        for o in ("ppo", "gspo", "cispo")}
    assert all(two[o][0].stats["optimizer_steps"] == 2 for o in two)
    # at 3e-4 / 4e-4 the second step clips: whole sequences for gspo, single tokens for ppo;
    # cispo caps only ratios above 5 (a few low-probability tokens) and keeps their gradient
    clip = {o: two[o][0].stats["clip_fraction"] for o in two}
    assert clip["gspo"] > 0.05 and clip["ppo"] > 0.05 and clip["cispo"] < 0.05, clip
    for a, b in (("ppo", "gspo"), ("ppo", "cispo"), ("gspo", "cispo")):
        da = torch.cat([(two[a][1][k] - base[k]).flatten() for k in base])
        db = torch.cat([(two[b][1][k] - base[k]).flatten() for k in base])
        assert ((da - db).norm() / db.norm()).item() > 1e-2, (a, b)


# ---------------------------------------------------------------- 3 + 7. optimizer settings, schedule


def test_optimizer_settings_and_schedule_apply_after_loading_the_previous_state(rollouts, tmp_path):
    """learn@1 loads learn@0's AdamW state, whose lr and betas are those of iteration 0; the
    parameters of iteration 1 must win, and the linear schedule of a 2-step run halves lr."""
    params = tiny_params(tmp_path, **{"learn.lr_schedule": "linear", "learn@1.lr": 7e-6,
                                      "learn@1.betas": [0.8, 0.95], "learn@1.weight_decay": 0.01})
    fork_run(rollouts, params, iteration_stages=("sample", "reward", "advantage"))
    filter_stage.run(params, 0)
    first = learn.run(params, 0)
    assert first.stats["lr"] == pytest.approx(2e-5)                    # step 0 of 2: factor 1
    for f in params.layout.stage_dir("filter", 0).iterdir():           # iteration 1 learns from the same rows
        store.link_or_copy(f, params.layout.stage_dir("filter", 1) / f.name)
    second = learn.run(params, 1)
    assert second.stats["lr"] == pytest.approx(7e-6 * 0.5)             # step 1 of 2: factor 1/2
    state = torch.load(params.layout.optimizer(1) / OPTIMIZER_FILE, weights_only=True)
    group = state["param_groups"][0]
    assert group["lr"] == pytest.approx(3.5e-6) and tuple(group["betas"]) == (0.8, 0.95)
    assert group["weight_decay"] == 0.01
    # the moments were continued, not restarted: AdamW's step count is 2
    assert all(float(s["step"]) == 2.0 for s in state["state"].values())


# ---------------------------------------------------------------- 4. precision


def test_bf16_mixed_at_lr_3e_6_moves_the_weights(rollouts, tmp_path):
    """model.dtype bfloat16 (the samplers' dtype) with bf16-mixed learning: float32 master
    weights, so an update of lr 3e-6 lands on (nearly) every weight. Pure bf16 weights moved
    0.57% of them."""
    m, new = _learn_variant(rollouts, tmp_path, "bf16", threshold=0.1, **{
        "model.dtype": "bfloat16", "learn.precision": "bf16-mixed", "learn.lr": 3e-6})
    base = policy_mod.read_weights(rollouts.layout.policy(-1))
    # the policy is stored in the samplers' dtype (bfloat16); the learner's float32 weights are
    # the policy plus the low bits the optimizer state keeps
    layout = tiny_params(tmp_path, "bf16").layout
    assert m.stats["precision"] == "bf16-mixed" and new["model.embed_tokens.weight"].dtype == torch.bfloat16
    master = {k: v.detach() for k, v in policy_mod.load_master(
        layout.policy(0), layout.optimizer(0) / policy_mod.LOW_BITS_FILE, torch.device("cpu")).named_parameters()}
    moved = sum(int((master[k] != base[k]).sum()) for k in master) / sum(v.numel() for v in master.values())
    assert moved > 0.5, moved


def test_bf16_autocast_loss_and_gradient_agree_with_fp32(rollouts):
    table = store.read_stage(rollouts.layout.stage_dir("sample", 0), schema.ROLLOUTS, stage="test")
    prompts = table.column("prompt_token_ids").to_pylist()[:6]
    completions = table.column("completion_token_ids").to_pylist()[:6]
    model = policy_mod.load_model(rollouts.layout.policy(-1), torch.device("cpu"))
    ids, att, tgt, mask = batches.collate(prompts, completions, 2)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.8, -0.4, -0.4])

    def loss_and_grad(bf16: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        loss = algorithms.policy_gradient_loss(algorithms.token_logprobs(logits, tgt, 0.9), adv, mask, mask.sum())
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (l32, g32), (l16, g16) = loss_and_grad(False), loss_and_grad(True)
    # bf16 keeps 8 significant bits: log-probs agree to ~1e-2, and this loss (a signed sum
    # that nearly cancels across the group) to a few per cent
    assert l16 == pytest.approx(l32, rel=5e-2)
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    assert cosine > 0.99 and g16.norm().item() == pytest.approx(g32.norm().item(), rel=5e-2), cosine


def test_gradient_checkpointing_gives_the_same_gradient(rollouts):
    table = store.read_stage(rollouts.layout.stage_dir("sample", 0), schema.ROLLOUTS, stage="test")
    ids, att, tgt, mask = batches.collate(table.column("prompt_token_ids").to_pylist()[:3],
                                             table.column("completion_token_ids").to_pylist()[:3], 2)
    model = policy_mod.load_model(rollouts.layout.policy(-1), torch.device("cpu"))
    model.train()

    def grad():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        (algorithms.token_logprobs(logits, tgt, 1.0) * mask).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    plain = grad()
    update.enable_gradient_checkpointing(model)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert torch.allclose(grad(), plain, atol=1e-6)


# ---------------------------------------------------------------- 6. the sampling distribution


def test_sampler_applies_exactly_the_configured_processors(rollouts, tmp_path):
    """A checkpoint whose generation_config sets a repetition penalty (as Qwen2.5-Instruct's
    does) and a top_k: neither may reach the sampled distribution. The recorded log-probs are
    those of temperature -> top_k -> top_p, which the learner recomputes token for token;
    the untruncated log-probs the learner trains on are lower by log(kept mass), which is the
    bias TIS weights would carry if the two were compared directly."""
    ckpt = tmp_path / "qwen-like"
    for f in rollouts.layout.policy(-1).iterdir():
        if f.name not in (store.MANIFEST, "generation_config.json"):   # a hard link would write through
            store.link_or_copy(f, ckpt / f.name)                      # to the shared run's base policy
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"repetition_penalty": 1.5, "top_k": 2, "temperature": 0.1, "do_sample": True, "eos_token_id": 2}))
    sampler, tok = samplers.make_sampler({"backend": "hf", "token_budget": 4096, "max_batch_size": 8}, str(ckpt),
                                         device=torch.device("cpu"), dtype="float32")
    table = store.read_stage(rollouts.layout.stage_dir("sample", 0), schema.ROLLOUTS, stage="test")
    prompts = table.column("prompt_token_ids").to_pylist()[::3]
    comps = sampler.generate(prompts, max_new_tokens=10, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    completions = [c.token_ids for c in comps]
    model = policy_mod.load_model(ckpt, torch.device("cpu"))
    plain, processed = batches.completion_logprobs(model, prompts, completions, pad_id=tok.pad_token_id,
                                                      temperature=1.0, token_budget=4096, desc="t", top_k=5, top_p=0.9)
    recorded = [lp for c in comps for lp in c.logprobs]
    ours = [lp for row in processed for lp in row]
    assert len(recorded) == len(ours) > 10
    assert max(abs(a - b) for a, b in zip(recorded, ours)) < 1e-3
    gaps = [p - q for row_p, row_q in zip(plain, processed) for p, q in zip(row_p, row_q)]
    assert all(g <= 1e-6 for g in gaps) and min(gaps) < -1e-3


# ---------------------------------------------------------------- 7. prompt order


def test_each_epoch_walks_the_train_split_in_a_fresh_order():
    prompts = pa.Table.from_pylist([{"prompt_id": f"p{i}"} for i in range(6)])
    picks = [r["prompt_id"] for i in range(3) for r in prompts_mod.iteration_prompts(prompts, i, 4, seed=0)]
    first, second = picks[:6], picks[6:]
    assert sorted(first) == sorted(second) == [f"p{i}" for i in range(6)]   # every prompt once per epoch
    assert first != second                                                  # in a new order
    assert picks == [r["prompt_id"] for i in range(3) for r in prompts_mod.iteration_prompts(prompts, i, 4, seed=0)]
    assert picks != [r["prompt_id"] for i in range(3) for r in prompts_mod.iteration_prompts(prompts, i, 4, seed=1)]


def test_learner_refuses_a_filter_output_without_the_sampled_record(rollouts, tmp_path):
    params = tiny_params(tmp_path)
    fork_run(rollouts, params, iteration_stages=("sample", "reward", "advantage"))
    kept = store.read_stage(rollouts.layout.stage_dir("advantage", 0), schema.ADVANTAGED, stage="test")

    def build(tmp):
        store.write_shard(tmp, 0, kept, schema.KEPT, stage="test")
        return {}

    store.run_stage("filter", 0, params.layout.stage_dir("filter", 0), inputs={}, params={}, code="old", build=build)
    with pytest.raises(store.StageError, match=r"learn@0: .*kept/sampled.json is missing.*rerun"):
        learn.run(params, 0)
    assert not params.layout.policy(0).exists()


def test_reward_of_the_fixture_is_real(rollouts):
    """Guard for the tests above: the hand advantages sit on real completions."""
    table = store.read_stage(rollouts.layout.stage_dir("reward", 0), schema.REWARDED, stage="test")
    assert table.num_rows == 12 and all(math.isfinite(r) for r in table.column("reward").to_pylist())
