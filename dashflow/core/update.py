"""The policy update of one learn stage: `train`, one micro-batch's loss, the optimizer step.

RL mode (default): the kept rows (after gradient filtering) are planned into optimizer
steps over the prompt groups as they were sampled (`learn.update`, `learn.steps`: the
paper's GRPO, preemptive sampling and DASH all take one on-policy step per sampled batch;
"Multi" takes K passes, "Mini" K mini-batches of whole groups; `per_group`, one step per
group, is an option that is none of the paper's arms). Each step's rows are packed into
micro-batches of at most `learn.micro_batch_tokens` padded tokens; the per-token loss
(clipped surrogate x optional TIS weight + optional beta x KL to the reference, see
dashflow/core/algorithms.py) is aggregated with constants of the whole step *as sampled* -- rows
and completion tokens counted before the filter (kept/sampled.json) -- so accumulating the
micro-batch gradients gives exactly the step's loss, and the filter saves compute without
rescaling the gradient of the rows it keeps. A step whose groups were all filtered still
steps AdamW with zero gradient, as the unfiltered update would.

With more than one step, the log-probs of the sampling policy ("old") are computed once,
before the first step, by a no-grad pass; with one step they are the step's own
log-probs, detached (identical values, no extra pass).

Precision (`learn.precision`): the weights and AdamW's state are float32 (master
weights) in both modes; `bf16-mixed` runs forward and backward under bfloat16 autocast
(CUDA and CPU), as every trainer does. Pure bf16 weights would round updates below half a
bf16 unit away (at lr 3e-6, nearly all of them). `model.dtype` is the samplers' dtype only.

The learning rate follows `learn.lr_schedule` (warm-up, then constant, linear or cosine)
over the optimizer steps of the whole run; the position is derived from the plan of the
earlier iterations (`schedule_position`).

SFT mode (`learn.mode: sft`, the paper's SFT-H): the iteration's prompts with the
dataset's reference solutions as completions, cross-entropy with the same micro-batching,
aggregation and checkpoint format; RL vs SFT is one parameter apart.

With world > 1, `train` is one rank of a torch.distributed job (DDP; dashflow/core/torchrun.py):
each rank computes the gradients of its own kept shards; the result equals the
single-process update up to float rounding.

A non-finite loss or gradient stops the stage before anything is written, so a good
checkpoint is never replaced by a bad one.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dashflow.core import algorithms, batches, problems, schema, store
from dashflow.core import optimizer_state as state_mod
from dashflow.core import policy as policy_mod
from dashflow.core import prompts as prompts_mod
from dashflow.core import sampled_batch as sampled_mod
from dashflow.core.config import Params
from dashflow.core.optimizer_state import HeldState
from dashflow.core.stage_configs import LearnConfig, SampleConfig

# the learner's metrics, as the stage's stats report them (means over tokens or steps)
METRICS = ("loss", "grad_norm", "lr", "entropy", "clip_fraction", "approx_kl_to_sampling",
           "sampler_mismatch", "tis_weight", "mismatch_masked", "kl_to_reference")


@dataclass(frozen=True)
class LearnInputs:
    """What one learn@i reads and how, derived from the parameters."""

    cfg: LearnConfig           # learn@i's parameters
    sample_cfg: SampleConfig   # sample@i's parameters (temperature, top-k/p, the batch as sampled)
    sft: bool
    temperature: float         # of the sampler (1 in SFT mode)
    with_kl: bool              # the KL penalty is on: the rows come from iter-i/reference
    kept: Path                 # iter-i/kept (and kept/sampled.json)
    src: Path                  # the rows' directory: kept, or reference with the KL penalty
    prev: Path                 # the policy learn@i starts from
    prev_opt: Path | None      # its optimizer state (None before the first iteration)
    label: str                 # "learn@i"

    @classmethod
    def of(cls, params: Params, iteration: int) -> LearnInputs:
        layout = params.layout
        cfg, sample_cfg = params.stage("learn", iteration), params.stage("sample", iteration)
        sft, with_kl = cfg.mode == "sft", params.needs_reference(iteration)
        kept = layout.stage_dir("filter", iteration)
        return cls(cfg, sample_cfg, sft, 1.0 if sft else sample_cfg.temperature, with_kl, kept,
                   layout.stage_dir("reference", iteration) if with_kl else kept,
                   layout.policy(iteration - 1), layout.optimizer(iteration - 1), f"learn@{iteration}")


@dataclass
class Batch:
    """The rows one sampled batch gives the learner, in group order, and the batch as it was
    sampled (every group with its rows and completion tokens, before the gradient filter)."""

    prompts: list[list[int]]
    completions: list[list[int]]
    groups: list[str]                               # each row's prompt group
    sampled: list[dict]                             # [{prompt_id, rows, completion_tokens}] in sampled order
    advantages: torch.Tensor | None = None          # [N]; None in SFT mode
    sampler_logprobs: list[list[float]] | None = None
    ref_logprobs: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def rl_batch(table, sampled: list[dict]) -> Batch:
    def col(name: str) -> list:
        return table.column(name).to_pylist()

    return Batch(col("prompt_token_ids"), col("completion_token_ids"), col("prompt_id"), sampled,
                 torch.tensor(col("advantage"), dtype=torch.float32), col("sampler_logprobs"),
                 col("ref_logprobs") if "ref_logprobs" in table.column_names else None)


def sft_batch(params: Params, iteration: int, tokenizer) -> Batch:
    """The iteration's prompts (the same ones `sample` drew) with reference solutions as completions."""
    cfg = params.stage("sample", iteration)
    rows = prompts_mod.iteration_prompts(prompts_mod.read_prompts(params, "train"), iteration,
                                         cfg.prompts_per_iteration, params["run"]["seed"])
    prompts, completions = [], []
    for row in rows:
        target = problems.sft_target(row["solution"], row["answer"])
        prompts.append(policy_mod.chat_prompt(tokenizer, row["prompt"], prompts_mod.turns(row)))
        completions.append(tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    groups = [r["prompt_id"] for r in rows]
    sampled = [{"prompt_id": g, "rows": 1, "completion_tokens": len(c)} for g, c in zip(groups, completions)]
    return Batch(prompts, completions, groups, sampled)


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


@dataclass
class Trained:
    """What `train` leaves: the stage's stats and timing, and (one process) the model and optimizer."""

    result: dict
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None


def schedule_position(params: Params, iteration: int) -> tuple[int, int] | None:
    """(optimizer steps taken before learn@i, optimizer steps of the whole run): where the
    learning-rate schedule stands; None for a constant rate without warm-up (nothing to
    place). Derived from the plan of every iteration (the steps one sampled batch gives do
    not depend on what the filter kept), so it needs no state."""
    cfg = params.stage("learn", iteration)
    if cfg.lr_schedule == "constant" and not cfg.warmup_steps:
        return None
    groups_available = prompts_mod.read_prompts(params, "train").num_rows
    counts = []
    for i in range(params.iterations):
        learn_cfg, sample_cfg = params.stage("learn", i), params.stage("sample", i)
        groups = min(sample_cfg.prompts_per_iteration, groups_available)
        counts.append(algorithms.planned_steps(learn_cfg.update, learn_cfg.steps, groups))
    return sum(counts[:iteration]), sum(counts)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (transformers' own switch)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def acquire(inp: LearnInputs, iteration: int, device: torch.device, held: HeldState | None,
            ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The float32 master weights and the AdamW state this learn continues from, in train mode:
    held in memory by learn@i-1 of this flow, or read from its checkpoint and optimizer state."""
    taken = held.take(inp.prev) if held is not None else None
    if taken is not None:  # learn@i-1 of this flow left its model and AdamW state in memory
        policy_mod.release_inference_model()  # which may be serving as one; from here on it trains
        model, optimizer, _ = taken
        state_mod.apply_hyperparameters(optimizer, inp.cfg)
    else:
        prev_opt = state_mod.previous_state(inp.prev_opt, iteration, inp.label)
        low_bits = prev_opt / policy_mod.LOW_BITS_FILE if prev_opt is not None else None
        low_bits = low_bits if low_bits is not None and low_bits.is_file() else None
        # float32 master weights, whatever the precision: the previous policy plus the low bits
        # its learn kept (bit-exact); the base policy's own weights at the first iteration --
        # the float32 model sample@i served them with, where this process holds it
        model = policy_mod.take_inference_model(inp.prev, device) if low_bits is None else None
        if model is None:
            policy_mod.release_inference_model()
            model = policy_mod.load_master(inp.prev, low_bits, device)
        optimizer = None
    if inp.cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    if optimizer is None:
        optimizer = state_mod.make_optimizer(model, inp.cfg, prev_opt, device)
    return model, optimizer


def micro_batch_loss(inp: LearnInputs, batch: Batch, idx: list[int], logp: torch.Tensor, logits: torch.Tensor,
                     targets: torch.Tensor, mask: torch.Tensor, old, consts: dict, tally: Tally) -> torch.Tensor:
    """The loss of the rows `idx` of one optimizer step (logp [B, T] their completion-token
    log-probs with gradient; old: the sampling policy's log-probs when computed by a pass of
    their own, else None), its metrics added to `tally`."""
    cfg, ps = inp.cfg, [batch.prompts[i] for i in idx]
    if inp.sft:  # cross-entropy on the reference solution's tokens
        return algorithms.get(algorithms.LOSS_AGGREGATIONS, cfg.loss_agg, "loss aggregation")(-logp, mask, **consts)
    device, width = logp.device, mask.shape[1]

    def values(lists: list[list[float]]) -> torch.Tensor:
        return batches.place([lists[i] for i in idx], ps, width).to(device)

    top_k, top_p = inp.sample_cfg.top_k or 0, inp.sample_cfg.top_p
    old_lp = logp.detach() if old is None else values(old[0])
    # the sampler's distribution (temperature, top-k, top-p) under the learner's weights before
    # the step: what the recorded sampler log-probs are to be compared with
    if old is not None:
        sampling_lp = values(old[1])
    elif top_k or top_p < 1.0:
        sampling_lp = algorithms.processed_target_logprobs(logits, targets, mask, inp.temperature, top_k, top_p)
    else:
        sampling_lp = old_lp
    if old is None:
        tally_mismatch(tally, batches.take(sampling_lp.cpu(), mask.cpu(), ps), [batch.sampler_logprobs[i] for i in idx])
    correct = algorithms.get(algorithms.MISMATCH_CORRECTIONS, cfg.tis_mode, "learn.tis_mode")
    tis = correct(sampling_lp, values(batch.sampler_logprobs), mask, lo=cfg.tis_min, hi=cfg.tis_cap) if cfg.tis_cap else None
    loss, metrics = algorithms.policy_loss(
        algorithms.LossInputs(logp, old_lp, batch.advantages[idx].to(device), mask, tis_weights=tis,
                              ref_logprobs=values(batch.ref_logprobs) if inp.with_kl else None),
        algorithms.LossSettings.from_config(cfg), consts)
    for name, (total, count) in metrics.items():
        tally.add(name, total, count)
    return loss


def train(params: Params, iteration: int, tmp: Path, rank: int = 0, world: int = 1,
          write_state_now: bool = True, held: HeldState | None = None) -> Trained:
    """The update, written into tmp (policy files) and tmp/optimizer (unless `write_state_now`
    is false: a flow holds it). `held`: where learn@i-1 of this flow may have left its model
    and optimizer. With world > 1 this is one rank of a torch.distributed job: the rank
    computes the gradients of the rows of its own kept shards (shard k belongs to rank
    k % world), DDP sums them across ranks at each optimizer step, and rank 0 writes."""
    inp = LearnInputs.of(params, iteration)
    cfg, sample_cfg, label = inp.cfg, inp.sample_cfg, inp.label
    algorithms.get(algorithms.LOSS_AGGREGATIONS, cfg.loss_agg, "loss aggregation")  # an unknown name fails here
    algorithms.get(algorithms.MISMATCH_CORRECTIONS, cfg.tis_mode, "learn.tis_mode")
    algorithms.get(algorithms.KL_ESTIMATORS, cfg.kl_estimator, "KL estimator")
    top_k, top_p = (0, 1.0) if inp.sft else (sample_cfg.top_k or 0, sample_cfg.top_p)
    t0 = time.perf_counter()
    tokenizer = policy_mod.load_tokenizer(inp.prev)
    if inp.sft:
        batch = sft_batch(params, iteration, tokenizer)
    else:
        batch = rl_batch(store.read_stage(inp.src, schema.REFERENCED if inp.with_kl else schema.KEPT, stage=label),
                         sampled_mod.read_sampled(inp.kept, needed_by=label))

    device = policy_mod.pick_device(params["run"]["device"])
    model, optimizer = acquire(inp, iteration, device, held if world == 1 else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed")
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    owner = row_owners(batch, inp.src, world, inp.sft)
    offset, total_steps = schedule_position(params, iteration) or (0, 0)
    plan = algorithms.plan_steps([g["prompt_id"] for g in batch.sampled], cfg.update, cfg.steps)
    sampled = {g["prompt_id"]: g for g in batch.sampled}
    rows_of: dict[str, list[int]] = {}
    for i, g in enumerate(batch.groups):
        rows_of.setdefault(g, []).append(i)
    t1 = time.perf_counter()

    tally = Tally()
    old = None
    if len(plan) > 1 and not inp.sft and len(batch):
        # the sampling policy's log-probs, once, before the first step changes the weights
        model.eval()
        with autocast:
            old = batches.completion_logprobs(
                model, batch.prompts, batch.completions, pad_id=tokenizer.pad_token_id, temperature=inp.temperature,
                token_budget=cfg.micro_batch_tokens, desc=f"{label} old log-probs", top_k=top_k, top_p=top_p)
        model.train()
        tally_mismatch(tally, old[1], batch.sampler_logprobs)
    seen: set[int] = set()
    tokens_seen = 0
    bar = tqdm(total=sum(len(rows_of.get(g, ())) for step in plan for g in step), desc=label, unit="seq",
               leave=False, disable=rank > 0)
    for step_index, step_groups in enumerate(plan):
        rows = [i for g in step_groups for i in rows_of.get(g, ())]
        # The step's normaliser counts the batch as it was sampled (the filter's dropped rows
        # included), on every rank: filtering changes the update by the dropped rows' own terms only.
        consts = {"num_sequences": sum(sampled[g]["rows"] for g in step_groups),
                  "num_tokens": sum(sampled[g]["completion_tokens"] for g in step_groups),
                  "max_new_tokens": sample_cfg.max_new_tokens}
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        mine = [i for i in rows if owner[i] == rank]
        lengths = [len(batch.prompts[i]) + len(batch.completions[i]) for i in mine]
        micros = algorithms.pack_by_tokens(lengths, cfg.micro_batch_tokens)
        if world > 1 and not micros:  # no rows here this step: join the gradient sum with zeros
            _zero_backward(net, device)
        for k, micro in enumerate(micros):
            idx = [mine[j] for j in micro]
            # DDP sums (averages, hence x world) the accumulated gradients at the step's last micro-batch
            sync = nullcontext if world == 1 or k == len(micros) - 1 else net.no_sync
            input_ids, attention, targets, mask = batches.collate(
                [batch.prompts[i] for i in idx], [batch.completions[i] for i in idx], tokenizer.pad_token_id)
            mask, targets = mask.to(device), targets.to(device)
            with sync(), autocast:
                logits = net(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, :-1]
            # entropy is a metric, over the completion tokens of rows not yet counted
            first = torch.tensor([i not in seen for i in idx], dtype=mask.dtype, device=device)
            fm = mask * first[:, None]
            logp, ent = algorithms.token_logprobs_and_entropy(logits, targets, inp.temperature, fm.bool())
            if ent.numel():
                tally.add("entropy", ent.sum(), fm.sum())
            loss = micro_batch_loss(inp, batch, idx, logp, logits, targets, mask, old, consts, tally)
            with sync():
                (loss * world).backward()
            step_loss += loss.item()
            tokens_seen += int(attention.sum())
            seen.update(idx)
            bar.update(len(idx))
        if world > 1:
            step_loss = _all_sum(step_loss)
        lr = cfg.lr * algorithms.lr_factor(cfg.lr_schedule, offset + step_index, cfg.warmup_steps, total_steps)
        grad_norm = optimizer_step(model, optimizer, lr, cfg.max_grad_norm, step_loss, label, inp.prev)
        tally.add("loss", step_loss, 1)
        tally.add("grad_norm", grad_norm, 1)
        tally.add("lr", lr, 1)
    bar.close()
    t2 = time.perf_counter()
    if world > 1:
        tokens_seen = _merge_tallies(tally, tokens_seen)
        if rank > 0:
            return Trained({})

    dtype = policy_mod.stored_dtype(params["model"])
    low = policy_mod.save_policy(model, tokenizer, tmp, dtype)
    store.fault_point("mid-checkpoint", f"learn@{iteration}")
    if write_state_now:
        state_mod.write_state(model, optimizer, tmp / "optimizer", dtype, low)
    result = {
        "stats": {"updated": bool(len(batch)), "mode": cfg.mode, "precision": cfg.precision, "rows": len(batch),
                  "sampled_rows": sum(g["rows"] for g in batch.sampled), "optimizer_steps": len(plan),
                  "completion_tokens": sum(len(c) for c in batch.completions),
                  **{n: tally.mean(n) for n in METRICS},
                  "tokens_per_s": tokens_seen / max(t2 - t1, 1e-9)},
        "timing": {"load_s": t1 - t0, "work_s": t2 - t1, "save_s": time.perf_counter() - t2},
    }
    return Trained(result, *((model, optimizer) if world == 1 else ()))


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float, max_grad_norm: float,
                   step_loss: float, label: str, prev: Path) -> float:
    """One AdamW step on the accumulated gradients, clipped to max_grad_norm (0: no clipping),
    at learning rate `lr`; returns the gradient norm. A non-finite loss or norm stops the stage."""
    for p in model.parameters():
        if p.grad is None:  # a step whose rows were all filtered: AdamW still steps, as without the filter
            p.grad = torch.zeros_like(p)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf")))
    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
        raise store.StageError(f"{label}: non-finite loss ({step_loss}) or gradient norm ({grad_norm}); "
                               f"the previous checkpoint {prev} is kept and nothing is written")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return grad_norm


def tally_mismatch(tally: Tally, learner: list[list[float]], sampler: list[list[float]] | None) -> None:
    """Sampler/learner mismatch: mean |logp_learner - logp_sampler| over the sampled tokens."""
    for lr, sp in zip(learner, sampler or []):
        pairs = [(a, b) for a, b in zip(lr, sp) if math.isfinite(a)]  # -inf: left the learner's top-k/top-p
        if pairs:
            tally.add("sampler_mismatch", sum(abs(a - b) for a, b in pairs), len(pairs))


# ---------------------------------------------------------------- ranks (world > 1)


def row_owners(batch: Batch, src: Path, world: int, sft: bool) -> list[int]:
    """The rank that computes each row's gradient: shard k of the kept rows belongs to rank
    k % world (SFT rows, which come from no shard, round-robin)."""
    if world == 1:
        return [0] * len(batch)
    if sft:
        return [i % world for i in range(len(batch))]
    outputs = store.read_manifest(src).outputs
    counts = [outputs[name]["rows"] for name in sorted(outputs) if name.endswith(".parquet")]
    return [k % world for k, n in enumerate(counts) for _ in range(n)]


def _zero_backward(net, device) -> None:
    out = net(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device)).logits
    (out.sum() * 0.0).backward()


def _all_sum(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def _merge_tallies(tally: Tally, tokens_seen: int) -> int:
    """Every rank's metric sums into rank 0's tally; returns the tokens all ranks processed."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (tally.sums, tally.counts, tokens_seen))
    tally.sums, tally.counts = {}, {}
    for sums, counts, _ in parts:
        for name in sums:
            tally.add(name, sums[name], counts[name])
    return sum(p[2] for p in parts)
