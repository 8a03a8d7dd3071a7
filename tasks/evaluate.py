"""Stage `evaluate`: accuracy of a policy on the held-out eval prompts, as the field reports it.

Greedy decoding (one completion per prompt) and, with `evaluate.samples` n > 0, n samples
per prompt at the training temperature (top_k, top_p). Every completion is checked twice
(dashflow/core/answers.py): `strict` (the DASH paper's checker: a box in the last 4 lines) and
`flexible` (the last box anywhere, else the last number). Per checker the stats are
greedy accuracy and, over the n samples, mean@n, the unbiased pass@k for k = 1, 2, 4, .., n
and maj@n -- strict next to flexible, never one alone.
Runs for the policies `schedule.evaluate` in params.yaml lists (the base policy = -1).
Beside its output directory it writes `eval.json` (the stats), which `dvc metrics` reads:
<iter>/eval.json next to <iter>/eval/.

Inputs : base/prompts/eval.parquet, a policy   Output: <iter>/eval/part-00000.parquet (schema.EVAL)
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from dashflow.core import answers, problems, rewards, samplers, sandbox, sandbox_runner, schema, store
from dashflow.core import code as code_mod
from dashflow.core import policy as policy_mod
from dashflow.core import prompts as prompts_mod
from dashflow.core.config import Params
from dashflow.core.stage import Stage

# What makes the evaluation rows (the sets' prompts, the policy and the code are its inputs).
# sample.token_budget and max_batch_size size the generation batches only: each request has
# its own seeded stream.
STAGE = Stage("evaluate", __name__, code=(answers, rewards, samplers, policy_mod, prompts_mod, schema, sandbox,
                                         sandbox_runner, code_mod), params=(
    "run.seed", "model.dtype", "evaluate.sets", "evaluate.num_prompts", "evaluate.max_new_tokens", "evaluate.samples",
    "sample.backend", "sample.temperature", "sample.top_p", "sample.top_k", "reward.timeout_s", "reward.max_chars",
    "sandbox.timeout_s", "sandbox.memory_mb", "sandbox.output_kb", "sandbox.processes", "sandbox.work_mb"))


ANSWER_COLUMNS = ("strict_answer", "strict_correct", "flexible_answer", "flexible_correct", "reward_error")


def accuracy_stats(rows: list[dict], n: int) -> dict[str, float]:
    """Per checker: greedy accuracy; over n samples per prompt, mean@n, pass@k and maj@n."""
    stats: dict[str, float] = {}
    for ex in answers.EXTRACTIONS:
        greedy = [r[f"{ex}_correct"] for r in rows if r["mode"] == "greedy"]
        stats[f"greedy_{ex}"] = sum(greedy) / max(len(greedy), 1)
        if not n:
            continue
        per_prompt: dict[str, list[dict]] = {}
        for r in rows:
            if r["mode"] == "sampled":
                per_prompt.setdefault(r["prompt_id"], []).append(r)
        groups = [sorted(g, key=lambda r: r["sample_index"]) for g in per_prompt.values()]
        correct = [[r[f"{ex}_correct"] for r in g] for g in groups]
        mean = lambda xs: sum(xs) / max(len(xs), 1)
        stats[f"mean@{n}_{ex}"] = mean([mean(c) for c in correct])
        for k in answers.ks(n):
            stats[f"pass@{k}_{ex}"] = mean([answers.pass_at_k(len(c), sum(c), k) for c in correct])
        stats[f"maj@{n}_{ex}"] = mean([answers.maj_at_k([r[f"{ex}_answer"] for r in g], c, n)
                                       for g, c in zip(groups, correct)])
    return stats


def checkpoint_identity(path: Path) -> dict[str, str]:
    """Content digest of a checkpoint directory that is not a stage output (any HF model dir)."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file())
    return {"checkpoint": ",".join(f"{p.name}:{store.file_sha256(p)[:16]}" for p in files)}


SETS = "sets"  # stats key: each set's {key, shard}, what lets the next output carry a set over
SET_KEYS = {"kind", "path", "num_prompts", "hub_name", "hub_config", "hub_split", "question_field", "answer_field",
            "hub_format"}
FILE_KINDS = ("gsm8k", "math", "mbpp", "humaneval")


def _prefixed(name: str, stats: dict) -> dict:
    return dict(stats) if name == answers.HELDOUT else {f"{name}/{k}": v for k, v in stats.items()}


def set_prompts(params: Params, name: str, spec: dict, limit: int) -> list[dict]:
    """The first `limit` prompts of an evaluation set (with the task's answer instruction)."""
    where = f"params.yaml evaluate.sets.{name}"
    if not isinstance(spec, dict) or "kind" not in spec or set(spec) - SET_KEYS:
        raise store.StageError(f"{where} = {spec!r}: expected {{kind: heldout | {' | '.join(FILE_KINDS)} | hub, ...}} "
                               f"with keys among {', '.join(sorted(SET_KEYS))}")
    kind = spec["kind"]
    try:
        instruction = problems.instruction(dict(params["task"], hub_format=spec.get("hub_format")), kind)
        if kind == answers.HELDOUT:
            rows = prompts_mod.read_prompts(params, "eval").to_pylist()
        elif kind in FILE_KINDS:
            if not spec.get("path"):
                raise store.StageError(f"{where}: kind {kind} needs path (a JSONL or Parquet file)")
            rows = problems.load_file(Path(spec["path"]), kind, instruction)
        elif kind == "hub":
            rows = problems.load_hub(spec["hub_name"], spec.get("hub_config"), spec.get("hub_split", "test"),
                                     spec.get("question_field", "question"), spec.get("answer_field", "answer"),
                                     instruction, spec.get("hub_format"))
        else:
            raise store.StageError(f"{where}: unknown kind {kind!r}; choose heldout, {', '.join(FILE_KINDS)} or hub")
    except problems.ProblemError as exc:
        raise store.StageError(f"{where}: {exc}") from exc
    if kind != answers.HELDOUT:  # the run's prompt format: its system message and demonstrations
        context = prompts_mod.task_context(params)
        rows = [dict(r, context=context) for r in rows]
    return rows[:limit]


def run(params: Params, iteration: int | None, force: bool = False, policy: Path | None = None,
        out: Path | None = None) -> store.Manifest:
    """Evaluate the policy of `iteration` (-1 = base) on every evaluation set into its eval
    directory (one shard per set), or, with `policy` and `out`, any checkpoint directory into
    `out`. A set whose prompts, policy, settings and code are unchanged since the previous
    output is carried over from it, not generated again: adding a set evaluates only it."""
    layout = params.layout
    cfg = STAGE.config(params, iteration)
    sample_cfg = params.stage("sample")
    reward_cfg = rewards.settings(params)
    policy_dir = Path(policy) if policy is not None else layout.policy(iteration)
    out_dir = Path(out) if out is not None else layout.eval(iteration)
    if policy is not None and not (policy_dir / "config.json").is_file():
        raise store.StageError(f"evaluate: {policy_dir} is not a model checkpoint directory (no config.json)")
    label = STAGE.label(iteration)
    if policy is None:  # a run's policy: it must be a finished stage output
        store.require_output(policy_dir, needed_by=label)
    stage_output = store.read_manifest(policy_dir) is not None
    if cfg.get("sets") is None:  # the task's default sets (the built-in tasks': heldout); in the key
        try:
            cfg = dict(cfg, sets=problems.task_defaults(params["task"])["eval_sets"])
        except problems.ProblemError as exc:
            raise store.StageError(f"evaluate: {exc}") from exc
    sets = cfg["sets"]
    prompt_sets = {name: set_prompts(params, name, spec, int(spec.get("num_prompts", cfg["num_prompts"])))
                   for name, spec in sets.items()}
    stage_params = STAGE.key_params(params, iteration, sets=sets)  # the sets as resolved (null: the task's)
    code = STAGE.code_digest()
    policy_id = (store.read_manifest(policy_dir).digest if stage_output else checkpoint_identity(policy_dir))
    # what makes one set's rows: not the other sets
    per_set = {k: v for k, v in stage_params.items() if k not in ("evaluate.sets", "derived.sets")}
    set_keys = {name: store.json_digest({"prompts": prompts, "policy": policy_id, "code": code, **per_set})
                for name, prompts in prompt_sets.items()}

    def carried(previous: store.Manifest | None, name: str, index: int, tmp: Path) -> dict | None:
        """The previous output's shard and stats of this set, if they were made the same way."""
        record = (previous.stats.get(SETS, {}).get(name) or {}) if previous is not None else {}
        if record.get("key") != set_keys[name]:
            return None
        shard = record.get("shard")
        info = previous.outputs.get(shard or "")
        if not info or not (out_dir / shard).is_file() or \
                store.file_digest(out_dir / shard, store.recorded_digest(info)[0]) != store.recorded_digest(info)[1]:
            return None
        store.link_or_copy(out_dir / shard, tmp / store.shard_name(index))
        return answers.set_stats(previous.stats).get(name)

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        stats: dict = {SETS: {}}
        loaded = None
        previous = store.read_manifest(out_dir)
        for index, (name, prompts) in enumerate(prompt_sets.items()):
            kept = carried(previous, name, index, tmp)
            stats[SETS][name] = {"key": set_keys[name], "shard": store.shard_name(index), "carried": kept is not None}
            if kept is not None:
                stats.update(_prefixed(name, kept))
                continue
            if loaded is None:
                loaded = samplers.make_sampler(
                    sample_cfg, str(policy_dir), device=policy_mod.pick_device(params["run"]["device"]),
                    dtype=params["model"]["dtype"])
            rows, one = evaluate_set(loaded, prompts, cfg, sample_cfg, reward_cfg, params["run"]["seed"],
                                     f"{label} {name}", context=policy_mod.context_length(policy_dir))
            store.write_shard(tmp, index, pa.Table.from_pylist([dict(r, eval_set=name) for r in rows], schema=schema.EVAL),
                              schema.EVAL, stage=label)
            stats.update(_prefixed(name, one))
        return {"stats": stats, "timing": {"work_s": time.perf_counter() - t0}}

    manifest = STAGE.run(
        params, iteration, inputs={"prompts": layout.base / "prompts", **({"policy": policy_dir} if stage_output else {})},
        build=build, force=force, out=out_dir, derived={"sets": sets}, extra_inputs=None if stage_output else policy_id,
    )
    if out is None and iteration is not None:
        # what `dvc metrics show` lists for an evaluation: accuracies, mean lengths, prompts, per set
        shown = {k: v for k, v in manifest.stats.items() if k != SETS}
        store.write_json(layout.eval_json(iteration), {"iteration": manifest.iteration, **shown})
    return manifest


def evaluate_set(loaded, prompts: list[dict], cfg: dict, sample_cfg: dict, reward_cfg: dict, seed: int,
                 label: str, context: int | None = None) -> tuple[list[dict], dict]:
    """Greedy and n sampled completions of each prompt, checked strict and flexible: (rows, stats)."""
    sampler, tokenizer = loaded
    ids = [policy_mod.chat_prompt(tokenizer, p["prompt"], prompts_mod.turns(p)) for p in prompts]
    policy_mod.check_fits([(p["prompt_id"], i) for p, i in zip(prompts, ids)], int(cfg["max_new_tokens"]), context,
                          stage=label, setting="evaluate.max_new_tokens")
    shown = [tokenizer.decode(i) for i in ids]
    n = int(cfg["samples"])
    rows, stats = [], {}
    for mode, copies in (("greedy", 1), ("sampled", n)):
        if not copies:
            continue
        order = [(p, j) for p in range(len(prompts)) for j in range(copies)]
        comps = sampler.generate([ids[p] for p, _ in order], max_new_tokens=cfg["max_new_tokens"],
                                 temperature=sample_cfg["temperature"], top_p=sample_cfg["top_p"],
                                 top_k=int(sample_cfg.get("top_k") or 0), seed=seed + 7919,
                                 greedy=mode == "greedy", desc=f"{label} {mode}")
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in comps]
        scored = rewards.score_many([{"completion": t, "answer": prompts[p]["answer"]} for t, (p, _) in zip(texts, order)],
                                   [], reward_cfg, desc=label)
        for (p, j), c, text, s in zip(order, comps, texts, scored):
            rows.append({"prompt_id": prompts[p]["prompt_id"], "prompt": prompts[p]["prompt"],
                         "answer": prompts[p]["answer"], "prompt_text": shown[p], "mode": mode, "sample_index": j, "completion": text,
                         "completion_tokens": len(c.token_ids), **{k: s[k] for k in ANSWER_COLUMNS}})
        stats[f"{mode}_mean_tokens"] = sum(len(c.token_ids) for c in comps) / max(len(comps), 1)
        for ex in answers.EXTRACTIONS:  # completions with no answer (math) or no code (code) to check
            stats[f"{mode}_{ex}_none"] = sum(s[f"{ex}_answer"] is None for s in scored) / max(len(scored), 1)
    stats.update(accuracy_stats(rows, n))
    stats["samples"] = n
    stats["prompts"] = len(prompts)
    return rows, stats


# Evaluation only reads a checkpoint; retrying it is safe.
evaluate_task = STAGE.task(run)
