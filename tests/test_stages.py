"""Each stage on real Parquet input with the real SmolLM2 model (tiny sizes, no Prefect)."""

from __future__ import annotations

import json
import math

import pyarrow.compute as pc
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import fork_run, tiny_params
from dashflow.core import answers, batches, optimizer_state, prompts, rewards, sampled_batch, schema, store
from dashflow.core import policy as policy_mod
from dashflow.core.optimizer_state import OPTIMIZER_FILE, HeldState
from dashflow.tasks import advantage, evaluate, learn, prepare, reference, reward, sample
from dashflow.tasks import filter as filter_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run0(tmp_path_factory):
    """Iteration 0 of the tiny run, stage by stage."""
    params = tiny_params(tmp_path_factory.mktemp("stages"))
    manifests = {"prepare": prepare.run(params)}
    for name, module in (("sample", sample), ("reward", reward), ("advantage", advantage),
                         ("filter", filter_stage), ("learn", learn)):
        manifests[name] = module.run(params, 0)
    return params, manifests


def _table(params, stage, schema_):
    return store.read_stage(params.layout.stage_dir(stage, 0), schema_, stage="test")


def test_prepare_writes_the_split_and_a_loadable_policy(run0):
    params, m = run0
    assert m["prepare"].stats == {"train_prompts": 24, "eval_prompts": 4, "demonstrations": 1, "system": False}
    train, evals = prompts.read_prompts(params, "train"), prompts.read_prompts(params, "eval")
    assert train.num_rows == 24 and evals.num_rows == 4
    assert not set(train.column("prompt_id").to_pylist()) & set(evals.column("prompt_id").to_pylist())
    assert policy_mod.weight_files(params.layout.policy(-1))


def test_sample_writes_whole_groups_with_token_ids_and_logprobs(run0):
    params, m = run0
    table = _table(params, "sample", schema.ROLLOUTS)
    assert table.num_rows == 4 * 3 == m["sample"].stats["rows"]
    assert [n for n in m["sample"].outputs] == ["part-00000.parquet", "part-00001.parquet"]  # 2 groups per shard
    for path in store.shard_paths(params.layout.stage_dir("sample", 0), needed_by="test"):
        shard = store.read_shard(path, schema.ROLLOUTS, stage="test")
        counts = pc.value_counts(shard.column("prompt_id")).to_pylist()
        assert sorted(c["counts"] for c in counts) == [3, 3]
    base_digest = store.read_manifest(params.layout.policy(-1)).digest
    for row in table.to_pylist():
        assert 1 <= len(row["completion_token_ids"]) <= 12
        assert len(row["sampler_logprobs"]) == len(row["completion_token_ids"])
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in row["sampler_logprobs"])
        assert row["finish_reason"] == ("stop" if len(row["completion_token_ids"]) < 12 or
                                        row["completion_token_ids"][-1] == 2 else "length")
        assert row["policy_version"] == base_digest[:16]
        assert row["iteration"] == 0 and row["sample_index"] in (0, 1, 2)
    # the rendered prompt: the default's one demonstration turn, then the row's own question
    tok = policy_mod.load_tokenizer(params.layout.policy(-1))
    demo = prompts.turns(prompts.read_prompts(params, "train").to_pylist()[0])
    assert [t["role"] for t in demo] == ["user", "assistant"] and "\\boxed{" in demo[1]["content"]
    for row in table.to_pylist():
        assert row["prompt_text"] == tok.decode(row["prompt_token_ids"])
        assert row["prompt_text"].index(demo[1]["content"]) < row["prompt_text"].index(row["prompt"])
        assert row["prompt_text"].endswith(f"{row['prompt']}<|im_end|>\n<|im_start|>assistant\n")


def test_sample_is_reproducible(run0):
    params, m = run0
    again = sample.run(params, 0, force=True)
    assert not again.cached and again.digest == m["sample"].digest


def test_reward_adds_columns_matching_the_checker(run0):
    params, m = run0
    table = _table(params, "reward", schema.REWARDED)
    assert table.num_rows == 12
    extraction = rewards.settings(params)["functions"]["math"]["extraction"]
    for row in table.to_pylist():
        parsed = answers.extract(row["completion"], extraction)
        correct = parsed is not None and answers.check(parsed, row["answer"])[0]
        assert (row["reward"], row["reward_math"], row["correct"], row["parsed_answer"]) == (
            float(correct), float(correct), correct, parsed)
        for ex in answers.EXTRACTIONS:
            parsed = answers.extract(row["completion"], ex)
            assert row[f"{ex}_correct"] == (parsed is not None and answers.check(parsed, row["answer"])[0])
    assert m["reward"].stats["reward_mean"] == pytest.approx(sum(table.column("reward").to_pylist()) / 12)
    assert m["reward"].stats["strict_accuracy"] == pytest.approx(sum(table.column("strict_correct").to_pylist()) / 12)


def test_advantage_matches_the_grpo_formula(run0):
    params, _ = run0
    rows = _table(params, "advantage", schema.ADVANTAGED).to_pylist()
    assert len(rows) == 12
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(row["prompt_id"], []).append(row)
    for group in groups.values():
        r = [x["reward"] for x in group]
        mean = sum(r) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in r) / 2)
        for x in group:
            assert x["advantage"] == pytest.approx((x["reward"] - mean) / (std + 1e-6), abs=1e-5)
            assert x["group_mean"] == pytest.approx(mean)


def test_filter_keeps_rows_above_threshold(run0):
    params, m = run0
    advantaged = _table(params, "advantage", schema.ADVANTAGED).to_pylist()
    kept = _table(params, "filter", schema.KEPT).to_pylist()
    expected = [(r["prompt_id"], r["sample_index"]) for r in advantaged if abs(r["advantage"]) > 0.1]
    assert [(r["prompt_id"], r["sample_index"]) for r in kept] == expected
    assert m["filter"].stats["rows_kept"] == len(expected)


def test_learn_writes_a_loadable_checkpoint_with_optimizer_state(run0):
    params, m = run0
    out = params.layout.policy(0)
    assert {"model.safetensors.index.json", "config.json"} <= {p.name for p in out.iterdir()}
    assert OPTIMIZER_FILE not in {p.name for p in out.iterdir()}
    # the 0.54 GB of float32 weights as shards of at most SHARD_SIZE (128 MB), so the store
    # hashes them on every core: 538 MB -> 5 shards, each listed by the index and the manifest
    shards = policy_mod.weight_files(out)
    assert [f.name for f in shards] == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert all(f.stat().st_size <= policy_mod.SHARD_SIZE + 10**5 for f in shards)  # + the header
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert {f.name for f in shards} <= set(m["learn"].outputs)
    assert set(policy_mod.read_weights(out)) == set(index["weight_map"])
    # the AdamW state lands in its own output, same stage key; the policy is stored in the
    # samplers' dtype (float32 here), so it is the learner's weights themselves
    opt = store.read_manifest(params.layout.optimizer(0))
    assert opt.key == m["learn"].key and list(opt.outputs) == [OPTIMIZER_FILE]
    assert all("xxh128" in info for info in opt.outputs.values())            # not DVC's: a fast digest
    assert all("md5" in info for info in m["learn"].outputs.values())         # DVC's, handed to it
    assert policy_mod.checkpoint_dtype(out) == "float32"
    state = torch.load(params.layout.optimizer(0) / OPTIMIZER_FILE)
    assert len(state["state"]) == sum(1 for _ in AutoModelForCausalLM.from_pretrained(out).parameters()) \
        or not m["learn"].stats["updated"]
    if m["filter"].stats["rows_kept"]:
        assert m["learn"].stats["updated"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_files_are_byte_for_byte_what_save_pretrained_writes(run0, tmp_path, dtype):
    """write_weights writes each shard itself (around the page cache, md5 on the way), yet
    every file -- shards, index, configs -- is the one transformers' save_pretrained writes,
    for float32 weights and for a bfloat16 state dict (bfloat16 checkpoints); the digest
    taken while writing is the shard's md5."""
    import hashlib

    params, _ = run0
    model = policy_mod.load_model(params.layout.policy(-1), torch.device("cpu"), "float32")
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "library", state_dict=dict(state), max_shard_size=policy_mod.SHARD_SIZE)
    policy_mod.write_weights(model, tmp_path / "ours", dict(state))
    names = sorted(p.name for p in (tmp_path / "library").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) == (5 if dtype == torch.float32 else 3)
    for name in names:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "library" / name).read_bytes(), name
    shard = policy_mod.weight_files(tmp_path / "ours")[0]
    assert store.hashed.digest_written(shard, "md5") == hashlib.md5(shard.read_bytes()).hexdigest()


def test_bfloat16_checkpoints_keep_the_learners_float32_weights_exact(run0, tmp_path):
    """model.checkpoint_dtype: bfloat16 -- the policy is the float32 weights rounded to nearest
    (ties away); the optimizer state keeps their low 16 bits; policy + low bits are the
    float32 weights the learner computed, bit for bit."""
    from conftest import fork_run

    src, _ = run0
    params = tiny_params(tmp_path, **{"filter.threshold": 0.0, "model.checkpoint_dtype": "bfloat16"})
    fork_run(src, params, iteration_stages=("sample", "reward", "advantage"))
    for stage in (filter_stage, reference):
        stage.run(params, 0)
    # the same update, once stored in float32 (the master weights themselves) and once in bfloat16
    full = learn.run(params.with_overrides({"model.checkpoint_dtype": "float32"}), 0)
    exact = {k: v.clone() for k, v in policy_mod.read_weights(params.layout.policy(0)).items()}
    half = learn.run(params, 0)
    assert half.key != full.key and half.stats["loss"] == full.stats["loss"]
    out = params.layout.policy(0)
    assert policy_mod.checkpoint_dtype(out) == "bfloat16"
    assert list(store.read_manifest(params.layout.optimizer(0)).outputs) == [policy_mod.LOW_BITS_FILE,
                                                                             OPTIMIZER_FILE]
    stored = policy_mod.read_weights(out)
    master = policy_mod.load_master(out, params.layout.optimizer(0) / policy_mod.LOW_BITS_FILE, torch.device("cpu"))
    named = dict(master.named_parameters())
    assert all(torch.equal(named[k].detach().view(torch.int32), exact[k].view(torch.int32)) for k in named)
    assert all(torch.equal(policy_mod.split_master(named[k].detach())[0].view(torch.int16),
                           stored[k].view(torch.int16)) for k in named)
    moved = sum(int((named[k].detach() != stored[k].float()).sum()) for k in named)
    assert moved > 0.9 * sum(v.numel() for v in named.values())  # the low bits carry information


def _policy_logprob(model, prompt_ids, completion_ids):
    ids, att, tgt, mask = batches.collate([prompt_ids], [completion_ids], 2)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
    return float((lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * mask).sum())


def test_learn_moves_logprobs_in_the_direction_of_the_advantage(tmp_path, run0):
    """Hand-set advantages on two real rollouts of one prompt: +1 and -1. One AdamW step
    must widen the log-prob margin of the +1 completion over the -1 completion."""
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    src_params, _ = run0
    params = tiny_params(tmp_path, **{"learn.lr": 1e-5, "sample.temperature": 1.0})
    rows = _table(src_params, "advantage", schema.ADVANTAGED).slice(0, 2).to_pylist()
    assert rows[0]["prompt_id"] == rows[1]["prompt_id"]
    rows[0]["advantage"], rows[1]["advantage"] = 1.0, -1.0

    def build(tmp):
        table = pa.Table.from_pylist(rows, schema=schema.KEPT)
        store.write_shard(tmp, 0, table, schema.KEPT, stage="test")
        sampled_batch.write_sampled(tmp, sampled_batch.sampled_groups(table))
        return {}

    for f in src_params.layout.policy(-1).iterdir():  # reuse the prepared base policy
        store.link_or_copy(f, params.layout.policy(-1) / f.name)
    store.run_stage("filter", 0, params.layout.stage_dir("filter", 0), inputs={}, params={}, code="hand", build=build)
    m = learn.run(params, 0)
    assert m.stats["updated"] and m.stats["rows"] == 2 and m.stats["grad_norm"] > 0
    margin = []
    for path in (params.layout.policy(-1), params.layout.policy(0)):
        model = AutoModelForCausalLM.from_pretrained(path)
        good, bad = (_policy_logprob(model, r["prompt_token_ids"], r["completion_token_ids"]) for r in rows)
        margin.append(good - bad)
    assert margin[1] > margin[0], margin


def test_nothing_kept_passes_the_policy_on_unchanged(tmp_path, run0):
    src_params, _ = run0
    params = tiny_params(tmp_path, **{"filter.threshold": 100.0})
    for name in ("policy", "prompts"):
        for f in (src_params.layout.base / name).iterdir():
            store.link_or_copy(f, params.layout.base / name / f.name)
    for module in (sample, reward, advantage, filter_stage):
        module.run(params, 0)
    m = learn.run(params, 0)
    assert not m.stats["updated"] and m.stats["rows"] == 0 and m.stats["sampled_rows"] == 12
    # the step still happens (as without the filter): zero gradient from a fresh AdamW moves nothing
    assert m.stats["optimizer_steps"] == 1 and m.stats["grad_norm"] == 0.0
    base = policy_mod.read_weights(params.layout.policy(-1))
    new = policy_mod.read_weights(params.layout.policy(0))
    assert all(torch.equal(base[k], new[k]) for k in base)


def test_missing_column_stops_the_next_stage_with_file_and_column(tmp_path, run0):
    src_params, _ = run0
    params = tiny_params(tmp_path)
    rollouts = _table(src_params, "sample", schema.ROLLOUTS)

    def build(tmp):  # a "rewarded" output that lacks the reward column
        import pyarrow.parquet as pq
        pq.write_table(rollouts, tmp / "part-00000.parquet")
        return {}

    store.run_stage("reward", 0, params.layout.stage_dir("reward", 0), inputs={}, params={}, code="bad", build=build)
    with pytest.raises(store.StageError, match=r"advantage@0: .*rewarded/part-00000.parquet: missing column 'reward'"):
        advantage.run(params, 0)
    assert not params.layout.stage_dir("advantage", 0).exists()


def test_evaluate_base_greedy_and_sampled(run0):
    params, _ = run0
    m = evaluate.run(params, -1)
    table = store.read_stage(params.layout.eval(-1), schema.EVAL, stage="test")
    assert table.num_rows == 4 * (1 + 2)  # 4 prompts: greedy + evaluate.samples = 2 (the tiny config)
    greedy = table.filter(pc.equal(table.column("mode"), "greedy"))
    sampled = table.filter(pc.equal(table.column("mode"), "sampled")).to_pylist()
    assert greedy.num_rows == 4 and sorted(r["sample_index"] for r in sampled) == [0, 0, 0, 0, 1, 1, 1, 1]
    for ex in answers.EXTRACTIONS:
        assert m.stats[f"greedy_{ex}"] == pytest.approx(sum(greedy.column(f"{ex}_correct").to_pylist()) / 4)
        per_prompt = {}
        for r in sampled:
            per_prompt.setdefault(r["prompt_id"], []).append(r[f"{ex}_correct"])
        assert m.stats[f"mean@2_{ex}"] == pytest.approx(sum(map(sum, per_prompt.values())) / 8)
        assert m.stats[f"pass@2_{ex}"] == pytest.approx(sum(any(v) for v in per_prompt.values()) / 4)
        assert m.stats[f"pass@1_{ex}"] == pytest.approx(m.stats[f"mean@2_{ex}"])
        assert f"maj@2_{ex}" in m.stats
    assert evaluate.run(params, -1).cached


def test_evaluate_on_two_sets_then_a_third_evaluates_only_the_new_one(tmp_path, run0):
    params, _ = run0
    import json

    gsm, mth = tmp_path / "gsm8k_test.jsonl", tmp_path / "math500.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {a} + 2?", "answer": f"{a} + 2 = {a + 2}\n#### {a + 2}"}) + "\n"
                           for a in range(3)))
    mth.write_text(json.dumps({"problem": "What is 9 - 4?", "solution": "9 - 4 = \\boxed{5}"}) + "\n")
    two = {"heldout": {"kind": "heldout"}, "gsm8k": {"kind": "gsm8k", "path": str(gsm)}}
    p2 = tiny_params(tmp_path / "runs", "sets", **{"evaluate.sets": two})
    fork_run(params, p2, iteration_stages=())
    m = evaluate.run(p2, -1)
    table = store.read_stage(p2.layout.eval(-1), schema.EVAL, stage="test")
    counts = {c["values"]: c["counts"] for c in pc.value_counts(table.column("eval_set")).to_pylist()}
    assert counts == {"heldout": 4 * 3, "gsm8k": 3 * 3}  # (greedy + 2 samples) per prompt
    gsm_greedy = [r for r in table.to_pylist() if r["eval_set"] == "gsm8k" and r["mode"] == "greedy"]
    assert [r["answer"] for r in gsm_greedy] == ["2", "3", "4"]
    for ex in answers.EXTRACTIONS:
        assert m.stats[f"gsm8k/greedy_{ex}"] == pytest.approx(sum(r[f"{ex}_correct"] for r in gsm_greedy) / 3)
        assert f"greedy_{ex}" in m.stats and f"gsm8k/pass@2_{ex}" in m.stats
    shown = json.loads(p2.layout.eval_json(-1).read_text())
    assert shown["gsm8k/prompts"] == 3 and shown["prompts"] == 4 and "sets" not in shown
    assert answers.set_stats(shown)["gsm8k"]["greedy_strict"] == m.stats["gsm8k/greedy_strict"]

    three = dict(two, math500={"kind": "math", "path": str(mth)})
    p3 = tiny_params(tmp_path / "runs", "sets", **{"evaluate.sets": three})
    m3 = evaluate.run(p3, -1)
    assert not m3.cached
    assert {n: r["carried"] for n, r in m3.stats["sets"].items()} == {"heldout": True, "gsm8k": True, "math500": False}
    assert m3.outputs["part-00000.parquet"]["md5"] == m.outputs["part-00000.parquet"]["md5"]
    assert m3.outputs["part-00001.parquet"]["md5"] == m.outputs["part-00001.parquet"]["md5"]
    assert m3.stats["math500/prompts"] == 1 and m3.stats["gsm8k/greedy_strict"] == m.stats["gsm8k/greedy_strict"]
    assert evaluate.run(p3, -1).cached
    with pytest.raises(store.StageError, match=r"evaluate.sets.bad: unknown kind 'csv'"):
        evaluate.run(tiny_params(tmp_path / "runs", "sets", **{"evaluate.sets": {"bad": {"kind": "csv"}}}), -1)


def test_reference_scores_kept_rows_with_the_base_model(tmp_path, run0):
    """The reference log-probs are the base model's (temperature-scaled, untruncated) log-probs
    of every kept completion token, as the learner computes its own; at iteration 0 the
    policy *is* the base model, so the KL is 0 and the learner matches the sampler."""
    src_params, m = run0
    params = tiny_params(tmp_path, **{"learn.kl_coef": 0.04})
    fork_run(src_params, params)
    assert params.needs_reference(0) and not src_params.needs_reference(0)
    ref_m = reference.run(params, 0)
    table = store.read_stage(params.layout.stage_dir("reference", 0), schema.REFERENCED, stage="test")
    assert table.num_rows == m["filter"].stats["rows_kept"] == ref_m.stats["rows"] > 0
    base = policy_mod.load_model(params.layout.policy(-1), torch.device("cpu"))
    rows = table.to_pylist()
    plain, _ = batches.completion_logprobs(base, [r["prompt_token_ids"] for r in rows],
                                              [r["completion_token_ids"] for r in rows], pad_id=2,
                                              temperature=params["sample"]["temperature"], token_budget=4096, desc="t")
    diffs, gaps = [], []
    for row, expected in zip(rows, plain):
        assert len(row["ref_logprobs"]) == len(row["completion_token_ids"])
        diffs += [abs(a - b) for a, b in zip(row["ref_logprobs"], expected)]
        gaps += [a - b for a, b in zip(row["ref_logprobs"], row["sampler_logprobs"])]
    assert max(diffs) < 1e-3, max(diffs)
    assert max(gaps) < 1e-3  # untruncated <= the sampler's top-k renormalised log-probs
    lm = learn.run(params, 0)
    assert lm.stats["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the step
    assert lm.stats["sampler_mismatch"] < 1e-3


def test_learn_with_three_passes_goes_off_policy(tmp_path, run0):
    src_params, m = run0
    params = tiny_params(tmp_path, **{"learn.steps": 3, "learn.update": "multi", "learn.lr": 1e-4})
    fork_run(src_params, params)
    stats = learn.run(params, 0).stats
    assert stats["optimizer_steps"] == 3 and stats["rows"] == m["filter"].stats["rows_kept"]
    # the first pass is on-policy (KL 0), the next two are not: the mean over passes is > 0
    assert stats["approx_kl_to_sampling"] > 0 and 0 <= stats["clip_fraction"] <= 1
    assert stats["sampler_mismatch"] < 1e-3  # old log-probs (learner) vs sampler log-probs, same weights
    one_params = tiny_params(tmp_path / "one", **{"learn.lr": 1e-4})
    fork_run(src_params, one_params)
    one = learn.run(one_params, 0)
    assert one.stats["optimizer_steps"] == 1 and one.stats["approx_kl_to_sampling"] == pytest.approx(0.0, abs=1e-7)
    assert one.stats["clip_fraction"] == 0.0
    a = policy_mod.read_weights(params.layout.policy(0))
    b = policy_mod.read_weights(one_params.layout.policy(0))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_sft_learns_the_reference_solutions(tmp_path, run0):
    from transformers import AutoModelForCausalLM

    from dashflow.core import policy, problems

    src_params, _ = run0
    # no demonstration turn: the base model does not already write the reference format
    params = tiny_params(tmp_path, **{"learn.mode": "sft", "learn.lr": 1e-4, "task.fewshot": 0})
    prepare.run(params)
    stats = learn.run(params, 0).stats
    assert stats["mode"] == "sft" and stats["rows"] == 4 and stats["optimizer_steps"] == 1
    tok = policy.load_tokenizer(params.layout.policy(-1))
    row = prompts.iteration_prompts(prompts.read_prompts(params, "train"), 0, 4, 0)[0]
    target = tok(problems.sft_target(row["solution"], row["answer"]), add_special_tokens=False)["input_ids"]
    prompt = policy.chat_prompt(tok, row["prompt"], prompts.turns(row))
    nll = [-_policy_logprob(AutoModelForCausalLM.from_pretrained(params.layout.policy(i)), prompt, target)
           for i in (-1, 0)]
    assert nll[1] < nll[0], nll


def test_a_policy_is_loaded_once_per_process_and_a_new_landing_is_loaded_again(run0, tmp_path):
    import os
    import shutil

    from safetensors.torch import save_file

    params, _ = run0
    base, cpu = params.layout.policy(-1), torch.device("cpu")
    first = policy_mod.inference_model(base, cpu, "float32")
    assert policy_mod.inference_model(base, cpu, "float32") is first
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert policy_mod.load_tokenizer(copy) is policy_mod.load_tokenizer(base)     # the same bytes: one tokenizer
    other = policy_mod.inference_model(copy, cpu, "float32")
    assert other is not first                                                      # another checkpoint: its own
    # a new landing (written beside, renamed over): loaded again, with the new weights
    from safetensors.torch import load_file

    shard = next(f for f in policy_mod.weight_files(copy) if "model.norm.weight" in load_file(f))
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
    save_file(tensors, copy / ".new.safetensors", metadata={"format": "pt"})
    os.replace(copy / ".new.safetensors", shard)
    again = policy_mod.inference_model(copy, cpu, "float32")
    assert again is not other and torch.equal(again.state_dict()["model.norm.weight"], tensors["model.norm.weight"])
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text().replace("}", ' }', 1))
    assert policy_mod.load_tokenizer(copy) is not policy_mod.load_tokenizer(base)  # other bytes: another tokenizer
    policy_mod.release_inference_model()


def test_learn_hands_its_weights_to_the_samplers_and_they_sample_what_the_file_holds(run0, tmp_path):
    from dashflow.core import samplers

    params = tiny_params(tmp_path / "runs")
    fork_run(run0[0], params)
    with HeldState(params) as state:
        learn.run(params, 0, held=state)
        held = next(iter(state.entries.values()))[0]
        served = policy_mod.inference_model(params.layout.policy(0), torch.device("cpu"), "float32")
        assert served is held                                     # no second copy, no read of the file
        gen_config = held.generation_config.to_dict()

        def complete(model):
            tokenizer = policy_mod.load_tokenizer(params.layout.policy(0))
            sampler = samplers.HFSampler(model, tokenizer, [tokenizer.eos_token_id], token_budget=4096, max_batch_size=8)
            out = sampler.generate([[1, 2, 3], [4, 5]], max_new_tokens=6, temperature=1.0, top_p=1.0, seed=7)
            return [(c.token_ids, c.logprobs) for c in out]

        from_memory = complete(served)
        assert held.generation_config.to_dict() == gen_config   # sampling left the learner's model as it was
    from_file = complete(policy_mod.load_model(params.layout.policy(0), torch.device("cpu"), "float32"))
    assert from_memory == from_file
    policy_mod.release_inference_model()


def test_a_held_state_is_written_in_the_background_and_lands_the_bytes_a_synchronous_write_lands(run0, tmp_path):
    """Every learn.state_every iterations of a flow the held optimizer state is written in a
    thread while the next stages run; it lands the same bytes as learn's own write (run0's,
    outside a flow), and the model stays held for the next learn."""
    params, m = run0
    flow = tiny_params(tmp_path / "runs", **{"learn.state_every": 1})  # learn@0 is not the schedule's last
    fork_run(params, flow)
    with HeldState(flow) as held:
        landed = learn.run(flow, 0, held=held)
        assert held.due and held.writer is None                     # due; the flow starts it ...
        assert store.read_manifest(flow.layout.optimizer(0)) is None
        held.write_due()                                             # ... after its bookkeeping
        writer = held.writer
        assert writer is not None and writer.name == "dashflow-optimizer-state"
        held.wait()
        assert not writer.is_alive() and held.writer is None
        state = store.read_manifest(flow.layout.optimizer(0))
        assert state.key == landed.key == m["learn"].key and store.content_problem(flow.layout.optimizer(0), state) is None
        assert (flow.layout.optimizer(0) / OPTIMIZER_FILE).read_bytes() == \
            (params.layout.optimizer(0) / OPTIMIZER_FILE).read_bytes()
        assert list(held.entries) == [landed.key]                  # still held: learn@1 takes it from memory
    assert held.entries == {}
    # a due write that the flow never started is written by whoever needs it next
    again = tiny_params(tmp_path / "again", **{"learn.state_every": 1})
    fork_run(params, again)
    with HeldState(again) as held:
        learn.run(again, 0, held=held)
        held.wait()
        assert not held.due and held.writer is None
        assert store.read_manifest(again.layout.optimizer(0)).key == landed.key
    policy_mod.release_inference_model()


def test_a_background_state_write_that_fails_stops_the_next_learn_and_is_written_again_on_leaving(
        run0, tmp_path, monkeypatch, capsys):
    params, m = run0
    flow = tiny_params(tmp_path / "runs", **{"learn.state_every": 1})
    fork_run(params, flow)
    write_state = optimizer_state.write_state

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(optimizer_state, "write_state", disk_full)
    with HeldState(flow) as held:
        learn.run(flow, 0, held=held)  # the policy lands; its state is written in the thread, which fails
        held.write_due()
        with pytest.raises(store.StageError, match=r"writing the optimizer state in the background failed: learn@0: "
                                                   r"no space left on the device holding .*iter-0000/optimizer "):
            held.wait()
        # nothing half-written: no manifest, no staging directory
        assert store.read_manifest(flow.layout.optimizer(0)) is None
        assert not [p.name for p in flow.layout.optimizer(0).parent.iterdir() if "optimizer" in p.name]
        assert held.entries                                          # the state is still held ...
        monkeypatch.setattr(optimizer_state, "write_state", write_state)
    state = store.read_manifest(flow.layout.optimizer(0))            # ... and leaving the flow writes it
    assert state is not None and state.key == m["learn"].key
    assert (flow.layout.optimizer(0) / OPTIMIZER_FILE).read_bytes() == \
        (params.layout.optimizer(0) / OPTIMIZER_FILE).read_bytes()
    policy_mod.release_inference_model()


_PREWARM_SCRIPT = """
import json, sys, threading
from dashflow.flows.dash_rl import prewarm
from dashflow.core import policy

found = []


class Recorder:  # notes which thread first imports each transformers module; imports nothing
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformers":
            found.append([name, threading.current_thread().name])


sys.meta_path.insert(0, Recorder())
before = "transformers" in sys.modules
prewarm(sys.argv[1], {"model.name": sys.argv[2]})
policy.load_tokenizer(sys.argv[2])
model = policy.load_model(sys.argv[2], policy.pick_device("cpu"))
print(json.dumps({"before": before, "found": found, "model": type(model).__name__}))
"""


def test_prewarm_imports_the_model_code_in_its_thread_and_the_first_load_waits_for_it(run0):
    """Every transformers module the first tokenizer and model loads need is imported by
    prewarm's thread, the llama class included; none by the main thread beside it."""
    import subprocess
    import sys

    from conftest import ROOT

    params, _ = run0
    out = subprocess.run([sys.executable, "-c", _PREWARM_SCRIPT, str(ROOT / "params.yaml"),
                          str(params.layout.policy(-1))], cwd=ROOT, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] is False and seen["model"] == "LlamaForCausalLM"
    by_thread = {}
    for name, thread in seen["found"]:
        by_thread.setdefault(thread, []).append(name)
    assert set(by_thread) == {"dashflow-prewarm"}, {t: n[:5] for t, n in by_thread.items()}
    assert {"transformers", "transformers.modeling_utils", "transformers.models.llama.modeling_llama",
            "transformers.tokenization_utils_tokenizers"} <= set(by_thread["dashflow-prewarm"])


def test_learn_trains_the_base_model_sample_served_instead_of_loading_it_again(run0, tmp_path):
    """learn@0 in the process that ran sample@0 takes the float32 base model out of the
    inference cache (no second load); the update is the same bytes as one loaded from the file."""
    params = tiny_params(tmp_path / "runs")
    fork_run(run0[0], params)
    served = policy_mod.inference_model(params.layout.policy(-1), torch.device("cpu"), "float32")  # sample@0's
    before = served.state_dict()["model.norm.weight"].clone()
    taken = learn.run(params, 0)
    assert taken.stats["updated"] and policy_mod._inference == {}              # out of the cache
    assert not torch.equal(served.state_dict()["model.norm.weight"], before)    # it is the model that trained
    loaded = learn.run(params, 0, force=True)                                   # nothing held: read from the file
    assert not loaded.cached and loaded.digest == taken.digest and loaded.stats["loss"] == taken.stats["loss"]
