"""Stage `learn`: the policy update from one sampled batch, in small accumulated micro-batches.

RL mode (default): the kept rows (after gradient filtering) are planned into optimizer
steps (`learn.update`, `learn.steps`: DASH takes one step; "Multi" takes K passes,
"Mini" K mini-batches, standard GRPO one step per prompt group). Each step's rows are
packed into micro-batches of at most `learn.micro_batch_tokens` padded tokens; the
per-token loss (clipped surrogate x optional TIS weight + optional beta x KL to the
reference, see tasks/algorithms.py) is aggregated with constants of the whole step, so
accumulating the micro-batch gradients gives exactly the step's loss.

With more than one step, the log-probs of the sampling policy ("old") are computed once,
before the first step, by a no-grad pass; with one step they are the step's own
log-probs, detached (identical values, no extra pass).

SFT mode (`learn.mode: sft`, the paper's SFT-H): the iteration's prompts with the
dataset's reference solutions as completions, cross-entropy with the same micro-batching,
aggregation and checkpoint format; RL vs SFT is one parameter apart.

The AdamW state is saved beside the weights and loaded by the next iteration. If no row
was kept, the policy is passed on unchanged and the manifest says so. A non-finite loss
or gradient stops the stage before anything is written, so a good checkpoint is never
replaced by a bad one.

Inputs : iter-i/kept (or iter-i/reference when the KL penalty is on; the prompts in SFT
         mode), the policy and optimizer state written by iteration i-1 (none before the first)
Output : iter-i/policy/ (model.safetensors, config, tokenizer) and iter-i/optimizer/
         (optimizer.pt, AdamW's state: twice the weights' size, needed only by the next
         learn, so the retention setting can drop old ones while keeping the policies)
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dashflow.config import Params
from tasks import algorithms, problems, reference, schema, store
from tasks import policy as policy_mod
from tasks.prefecting import stage_task
from tasks.prepare import read_prompts
from tasks.sample import iteration_prompts

OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class Batch:
    """The rows one sampled batch gives the learner, in group order."""

    prompts: list[list[int]]
    completions: list[list[int]]
    groups: list[str]
    advantages: torch.Tensor | None = None          # [N]; None in SFT mode
    sampler_logprobs: list[list[float]] | None = None
    ref_logprobs: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def rl_batch(table) -> Batch:
    col = lambda name: table.column(name).to_pylist()  # noqa: E731
    return Batch(col("prompt_token_ids"), col("completion_token_ids"), col("prompt_id"),
                 torch.tensor(col("advantage"), dtype=torch.float32), col("sampler_logprobs"),
                 col("ref_logprobs") if "ref_logprobs" in table.column_names else None)


def sft_batch(params: Params, iteration: int, tokenizer) -> Batch:
    """The iteration's prompts (the same ones `sample` drew) with reference solutions as completions."""
    cfg = params.stage("sample", iteration)
    rows = iteration_prompts(read_prompts(params, "train"), iteration, cfg["prompts_per_iteration"],
                             params["run"]["seed"])
    prompts, completions = [], []
    for row in rows:
        target = problems.sft_target(row["solution"], row["answer"])
        prompts.append(policy_mod.chat_prompt(tokenizer, row["prompt"]))
        completions.append(tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return Batch(prompts, completions, [r["prompt_id"] for r in rows])


class Tally:
    """Sums of the learner's per-token and per-step metrics over the whole stage."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def mean(self, name: str) -> float | None:
        return self.sums[name] / self.counts[name] if self.counts.get(name) else None


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout = params.layout
    cfg = params.stage("learn", iteration)
    sample_cfg = params.stage("sample", iteration)
    sft = cfg["mode"] == "sft"
    if cfg["mode"] not in ("rl", "sft"):
        raise store.StageError(f"learn@{iteration}: unknown learn.mode {cfg['mode']!r}; choose rl or sft")
    temperature = 1.0 if sft else sample_cfg["temperature"]
    with_kl = reference.needed(params, iteration)
    src = layout.stage_dir("reference" if with_kl else "filter", iteration)
    prev = layout.policy(iteration - 1)
    prev_opt = layout.optimizer(iteration - 1)  # None before the first iteration
    label = f"learn@{iteration}"
    aggregate = algorithms.get(algorithms.LOSS_AGGREGATIONS, cfg["loss_agg"], "loss aggregation")
    kl_fn = algorithms.get(algorithms.KL_ESTIMATORS, cfg["kl_estimator"], "KL estimator")

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        tokenizer = policy_mod.load_tokenizer(prev)
        if sft:
            batch = sft_batch(params, iteration, tokenizer)
        else:
            batch = rl_batch(store.read_stage(src, schema.REFERENCED if with_kl else schema.KEPT, stage=label))
        if len(batch) == 0:
            print(f"{label}: no rows kept after filtering -- no update; the policy is passed on unchanged")
            (tmp / "optimizer").mkdir()
            for src_dir, dst_dir in ((prev, tmp), (prev_opt, tmp / "optimizer")):
                for f in src_dir.iterdir() if src_dir else ():
                    if f.is_file() and f.name != store.MANIFEST:
                        store.link_or_copy(f, dst_dir / f.name)
            return {"stats": {"updated": False, "reason": "no rows kept", "rows": 0}, "timing": {"work_s": 0.0}}

        device = policy_mod.pick_device(params["run"]["device"])
        model = policy_mod.load_model(prev, device, params["model"]["dtype"])
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                      weight_decay=cfg["weight_decay"])
        if prev_opt is not None and (prev_opt / OPTIMIZER_FILE).exists():
            optimizer.load_state_dict(torch.load(prev_opt / OPTIMIZER_FILE, map_location=device))
        plan = algorithms.plan_steps(batch.groups, cfg["update"], int(cfg["steps"]))
        t1 = time.perf_counter()

        tally = Tally()
        old = None
        if len(plan) > 1 and not sft:
            # the sampling policy's log-probs, once, before the first step changes the weights
            model.eval()
            old = policy_mod.completion_logprobs(
                model, batch.prompts, batch.completions, pad_id=tokenizer.pad_token_id, temperature=temperature,
                token_budget=cfg["micro_batch_tokens"], desc=f"{label} old log-probs")
            model.train()
            _tally_mismatch(tally, old, batch.sampler_logprobs)
        seen: set[int] = set()
        tokens_seen = 0
        bar = tqdm(total=sum(len(s) for s in plan), desc=label, unit="seq", leave=False)
        for rows in plan:
            consts = {"num_sequences": len(rows), "num_tokens": sum(len(batch.completions[i]) for i in rows),
                      "max_new_tokens": sample_cfg["max_new_tokens"]}
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            lengths = [len(batch.prompts[i]) + len(batch.completions[i]) for i in rows]
            for micro in algorithms.pack_by_tokens(lengths, cfg["micro_batch_tokens"]):
                idx = [rows[j] for j in micro]
                ps = [batch.prompts[i] for i in idx]
                input_ids, attention, targets, mask = policy_mod.collate(
                    ps, [batch.completions[i] for i in idx], tokenizer.pad_token_id)
                width = mask.shape[1]
                values = lambda lists: policy_mod.place([lists[i] for i in idx], ps, width).to(device)  # noqa: E731
                mask = mask.to(device)
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, :-1]
                # entropy is a metric, over the completion tokens of rows not yet counted
                first = torch.tensor([i not in seen for i in idx], dtype=mask.dtype, device=device)
                fm = mask * first[:, None]
                logp, ent = algorithms.token_logprobs_and_entropy(logits, targets.to(device), temperature, fm.bool())
                if ent.numel():
                    tally.add("entropy", ent.sum(), fm.sum())
                if sft:
                    per_token = -logp
                else:
                    old_lp = logp.detach() if old is None else values(old)
                    per_token, clipped = algorithms.clipped_surrogate(
                        logp, old_lp, batch.advantages[idx].to(device), cfg["clip_eps"], cfg["clip_eps_high"])
                    with torch.no_grad():
                        tally.add("clip_fraction", (clipped.float() * mask).sum(), mask.sum())
                        tally.add("approx_kl_to_sampling", (algorithms.kl_k3(logp, old_lp) * mask).sum(), mask.sum())
                    if old is None:
                        _tally_mismatch(tally, policy_mod.take(logp.detach().cpu(), mask.cpu(), ps),
                                        [batch.sampler_logprobs[i] for i in idx])
                    if cfg["tis_cap"]:
                        weights = algorithms.tis_weights(old_lp, values(batch.sampler_logprobs), float(cfg["tis_cap"]))
                        per_token = per_token * weights
                        with torch.no_grad():
                            tally.add("tis_weight", (weights * mask).sum(), mask.sum())
                    if with_kl:
                        kl = kl_fn(logp, values(batch.ref_logprobs))
                        per_token = per_token + float(cfg["kl_coef"]) * kl
                        with torch.no_grad():
                            tally.add("kl_to_reference", (kl * mask).sum(), mask.sum())
                loss = aggregate(per_token, mask, **consts)
                loss.backward()
                step_loss += loss.item()
                tokens_seen += int(attention.sum())
                seen.update(idx)
                bar.update(len(idx))
            max_norm = cfg["max_grad_norm"] or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                raise store.StageError(f"{label}: non-finite loss ({step_loss}) or gradient norm ({grad_norm}); "
                                       f"the previous checkpoint {prev} is kept and nothing is written")
            optimizer.step()
            tally.add("loss", step_loss, 1)
            tally.add("grad_norm", grad_norm, 1)
        bar.close()
        t2 = time.perf_counter()

        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "optimizer").mkdir()
        torch.save(optimizer.state_dict(), tmp / "optimizer" / OPTIMIZER_FILE)
        names = ("loss", "grad_norm", "entropy", "clip_fraction", "approx_kl_to_sampling",
                 "sampler_mismatch", "tis_weight", "kl_to_reference")
        return {
            "stats": {"updated": True, "mode": cfg["mode"], "rows": len(batch), "optimizer_steps": len(plan),
                      "completion_tokens": sum(len(c) for c in batch.completions),
                      **{n: tally.mean(n) for n in names},
                      "tokens_per_s": tokens_seen / max(t2 - t1, 1e-9)},
            "timing": {"load_s": t1 - t0, "work_s": t2 - t1, "save_s": time.perf_counter() - t2},
        }

    inputs = {"policy": prev, **({"optimizer": prev_opt} if prev_opt else {}),
              **({"prompts": layout.base / "prompts"} if sft else {"kept": src})}
    slice_ = {"learn": cfg, "temperature": temperature, "dtype": params["model"]["dtype"],
              "max_new_tokens": sample_cfg["max_new_tokens"]}
    if sft:
        slice_.update(prompts_per_iteration=sample_cfg["prompts_per_iteration"], seed=params["run"]["seed"])
    return store.run_stage(
        "learn", iteration, layout.stage_dir("learn", iteration), inputs=inputs, params=slice_,
        code=store.code_digest(sys.modules[__name__], algorithms, policy_mod, problems, schema),
        build=build, force=force, side={"optimizer": layout.optimizer(iteration)},
    )


def _tally_mismatch(tally: Tally, learner: list[list[float]], sampler: list[list[float]] | None) -> None:
    """Sampler/learner mismatch: mean |logp_learner - logp_sampler| over the sampled tokens."""
    for lr, sp in zip(learner, sampler or []):
        n = min(len(lr), len(sp))
        if n:
            tally.add("sampler_mismatch", sum(abs(a - b) for a, b in zip(lr[:n], sp[:n])), n)


# No retries: a learner step must not apply twice (its output only lands when complete,
# so a rerun after a failure starts again from the previous checkpoint, never on top of a half step).
learn_task = stage_task(run, "learn")
