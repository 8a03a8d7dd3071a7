"""Stage `learn`: the policy update from one sampled batch, in small accumulated micro-batches.

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
earlier iterations. The previous iteration's AdamW moments are loaded, then this
iteration's lr, betas and weight decay are applied (the saved state would otherwise
override them).

SFT mode (`learn.mode: sft`, the paper's SFT-H): the iteration's prompts with the
dataset's reference solutions as completions, cross-entropy with the same micro-batching,
aggregation and checkpoint format; RL vs SFT is one parameter apart.

`learn.launcher: torchrun` runs the same update as `learn.nproc` torch.distributed ranks
(DDP; see `train` and `launch_torchrun`), each computing the gradients of its own kept
shards; the result equals the single-process update up to float rounding.

A non-finite loss or gradient stops the stage before anything is written, so a good
checkpoint is never replaced by a bad one.

Inputs : iter-i/kept with kept/sampled.json (and iter-i/reference when the KL penalty is
         on; the prompts in SFT mode), the policy and optimizer state written by iteration
         i-1 (none before the first; a missing state is rebuilt first, see replay_state)
Output : iter-i/policy/ (safetensors shards in the samplers' dtype, config, tokenizer)
         and iter-i/optimizer/ (optimizer.pt, AdamW's state, and with bfloat16 checkpoints
         master_low16.safetensors, the low 16 bits of every float32 master weight: policy +
         low bits = the learner's weights bit for bit). The optimizer state is needed only
         by the next learn: a local cache, not versioned by DVC, the last one kept by
         default (retention.optimizers).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from dashflow.core import algorithms, problems, schema, store
from dashflow.core import policy as policy_mod
from dashflow.core import prompts as prompts_mod
from dashflow.core import sampled as sampled_mod
from dashflow.core.config import Params
from dashflow.core.prefecting import stage_task
from dashflow.core.stage import Stage

# What the update depends on. How the learner runs is not (learn.launcher, nproc,
# gradient_checkpointing, state_every: the same update up to float rounding).
STAGE = Stage("learn", __name__, code=(algorithms, policy_mod, problems, prompts_mod, sampled_mod, schema), params=(
    "run.seed", "learn.lr", "learn.betas", "learn.weight_decay", "learn.max_grad_norm", "learn.micro_batch_tokens",
    "learn.mode", "learn.update", "learn.steps", "learn.clip_eps", "learn.clip_eps_high", "learn.loss_agg",
    "learn.kl_coef", "learn.kl_estimator", "learn.tis_cap", "learn.tis_mode", "learn.tis_min",
    "learn.objective", "learn.cispo_cap", "learn.precision", "learn.lr_schedule",
    "learn.warmup_steps", "model.dtype", "model.checkpoint_dtype", "sample.temperature", "sample.top_k",
    "sample.top_p", "sample.max_new_tokens", "sample.prompts_per_iteration"))

OPTIMIZER_FILE = "optimizer.pt"


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
    col = lambda name: table.column(name).to_pylist()  # noqa: E731
    return Batch(col("prompt_token_ids"), col("completion_token_ids"), col("prompt_id"), sampled,
                 torch.tensor(col("advantage"), dtype=torch.float32), col("sampler_logprobs"),
                 col("ref_logprobs") if "ref_logprobs" in table.column_names else None)


def sft_batch(params: Params, iteration: int, tokenizer) -> Batch:
    """The iteration's prompts (the same ones `sample` drew) with reference solutions as completions."""
    cfg = params.stage("sample", iteration)
    rows = prompts_mod.iteration_prompts(prompts_mod.read_prompts(params, "train"), iteration, cfg["prompts_per_iteration"],
                             params["run"]["seed"])
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


class Context(NamedTuple):
    """What one learn@i reads and how, derived from the parameters."""

    layout: object
    cfg: dict
    sample_cfg: dict
    sft: bool
    temperature: float
    with_kl: bool
    kept: Path
    src: Path
    prev: Path
    prev_opt: Path | None
    label: str


def context(params: Params, iteration: int) -> Context:
    layout = params.layout
    cfg = params.stage("learn", iteration)
    sample_cfg = params.stage("sample", iteration)
    sft = cfg["mode"] == "sft"
    with_kl = params.needs_reference(iteration)
    kept = layout.stage_dir("filter", iteration)
    return Context(layout, cfg, sample_cfg, sft, 1.0 if sft else sample_cfg["temperature"], with_kl, kept,
                   layout.stage_dir("reference", iteration) if with_kl else kept,
                   layout.policy(iteration - 1), layout.optimizer(iteration - 1), f"learn@{iteration}")


# The learner's state handed from one learn to the next within one flow process (`holding`):
# learn stage key -> (model, optimizer, iteration). Process-local; a new process starts empty.
_held: dict[str, tuple] = {}
_holding = False
_trained: tuple | None = None  # what the last train() in this process left: (model, optimizer)
# the held optimizer state due to be written (the flow's params), the thread writing it
# while the next stages compute, and what that raised (`holding`)
_due: Params | None = None
_writer: threading.Thread | None = None
_writer_failed: list[BaseException] = []


@contextmanager
def holding(params: Params):
    """Within a flow run: learn@i hands its float32 model and AdamW state to learn@i+1 in
    memory (no write, no read) and writes its optimizer state only every
    `learn.state_every` iterations and at the schedule's last; on leaving (the flow ends,
    stops at `until`, or fails) the state held is written. The every-`state_every` write
    is left due (`_due`): the flow starts it in a thread once the iteration's bookkeeping
    is done (`write_due_state`), so it waits for the disk while the next stages compute;
    learn@i+1 waits for it before it steps the optimizer the thread reads, and writes it
    itself if it was never started (`wait_for_state`). The state lands atomically either
    way (store.land_side). A process killed in between loses only the held state: the next
    learn replays from the last one written (replay_state), with the same bytes."""
    global _holding
    _holding = True
    try:
        yield
    finally:
        _holding = False
        try:
            try:
                wait_for_state()
            except store.StageError as exc:
                print(f"{exc}; writing it again")
            flush(params)  # what is held and not on disk yet, the background write's included if it failed
        finally:
            _held.clear()


def write_due_state() -> None:
    """Start writing the optimizer state a learn of this flow left due (if any) in a thread."""
    global _writer, _due
    if _due is None:
        return
    params, _due = _due, None

    def write() -> None:
        try:
            flush(params)
        except BaseException as exc:  # noqa: BLE001 -- raised by wait_for_state, in the flow's thread
            _writer_failed.append(exc)

    _writer = threading.Thread(target=write, name="dashflow-optimizer-state")
    _writer.start()


def wait_for_state() -> float:
    """Make sure the optimizer state due to be written is on disk: wait for its thread, or
    write it now if it was not started. Returns the seconds that took (the caller's time
    spent on the write). Raises a StageError if the thread failed (the state stays held, so
    leaving `holding` writes it)."""
    global _writer, _due
    started = time.perf_counter()
    if _due is not None:
        params, _due = _due, None
        flush(params)
    if _writer is not None:
        _writer.join()
        _writer = None
    blocked = time.perf_counter() - started
    if _writer_failed:
        exc = _writer_failed.pop()
        raise store.StageError(f"writing the optimizer state in the background failed ({type(exc).__name__}: "
                               f"{exc})") from exc
    return blocked


def flush(params: Params) -> None:
    """Write the optimizer state held in memory, if it is not on disk yet."""
    for key, (model, optimizer, iteration) in list(_held.items()):
        main = store.read_manifest(params.layout.policy(iteration))
        if main is None or main.key != key:
            continue  # the policy it belongs to was replaced since
        directory = params.layout.optimizer(iteration)
        if _state_problem(directory) is None and store.read_manifest(directory).key == key:
            continue
        dtype = policy_mod.stored_dtype(params["model"])

        def write(tmp: Path) -> None:
            write_state(model, optimizer, tmp, dtype)
            store.fault_point("mid-state", f"learn@{iteration}")

        store.land_side(directory, main, write)


def write_state(model, optimizer, directory: Path, checkpoint_dtype: str, low: dict | None = None) -> None:
    """The optimizer state files: AdamW's state and, with bfloat16 checkpoints, the master
    weights' low 16 bits (`low`, when the caller already split them)."""
    directory.mkdir(parents=True, exist_ok=True)
    with store.HashedFile(directory / OPTIMIZER_FILE, store.SIDE_DIGEST) as f:  # digested on the way
        torch.save(optimizer.state_dict(), f)
    if checkpoint_dtype == "bfloat16":
        if low is None:
            low = {name: policy_mod.split_master(param.detach())[1] for name, param in model.named_parameters()}
        policy_mod.write_safetensors(low, directory / policy_mod.LOW_BITS_FILE, algo=store.SIDE_DIGEST)


def _held_key(prev: Path) -> str | None:
    """The key under which learn@i-1 left its model and optimizer in memory, if they are the
    ones `prev` records."""
    found = store.read_manifest(prev)
    return found.key if found is not None and not found.pruned and found.key in _held else None


def _take_held(prev: Path) -> tuple | None:
    """The model and optimizer learn@i-1 left in memory (see _held_key); nothing stays held.
    Its caller, learn's build, has waited for their background write (wait_for_state)."""
    key = _held_key(prev)
    held = _held.pop(key) if key is not None else None
    _held.clear()
    return held


def schedule_position(params: Params, iteration: int) -> tuple[int, int]:
    """(optimizer steps taken before learn@i, optimizer steps of the whole run): where the
    learning-rate schedule stands. Derived from the plan of every iteration (the steps one
    sampled batch gives do not depend on what the filter kept), so it needs no state."""

    groups_available = None
    counts = []
    for i in range(params.iterations):
        cfg, sample_cfg = params.stage("learn", i), params.stage("sample", i)
        if groups_available is None:
            groups_available = prompts_mod.read_prompts(params, "train").num_rows
        groups = min(int(sample_cfg["prompts_per_iteration"]), groups_available)
        counts.append(algorithms.planned_steps(cfg["update"], int(cfg["steps"]), groups))
    return sum(counts[:iteration]), sum(counts)


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout, cfg, sample_cfg, sft, temperature, with_kl, kept, src, prev, prev_opt, label = context(params, iteration)
    nproc = int(cfg.get("nproc") or 1)

    torchrun = cfg.get("launcher") == "torchrun"
    every = int(cfg.get("state_every") or 1)
    # the optimizer state is written with the policy outside a flow (and by torchrun's rank 0);
    # in a flow it is held for the next learn and written in a thread every `every`
    # iterations and at the schedule's last (see holding)
    write = not _holding or torchrun
    background = not write and ((iteration + 1) % every == 0 or iteration >= params.iterations - 1)

    def build(tmp: Path) -> dict:
        wait_for_state()  # a replay may need the state being written, and a held model must not move
        if not (_holding and not torchrun and _held_key(prev)):
            replay_state(params, iteration)
        if torchrun:
            return launch_torchrun(params, iteration, tmp, nproc)
        return train(params, iteration, tmp, write_state_now=write)

    # the previous optimizer state is not a key input: it lands with the previous policy under
    # the same key, so the policy's digest stands for both (and a run whose states are gone --
    # retention, or a `dvc pull` elsewhere -- still finds its finished stages cached)
    inputs = {"policy": prev, **({"prompts": layout.base / "prompts"} if sft else {"kept": kept}),
              **({"reference": src} if with_kl and not sft else {})}
    # where the learning-rate schedule stands depends on the whole schedule, not only on this slice
    scheduled = cfg["lr_schedule"] != "constant" or cfg["warmup_steps"]
    slice_ = STAGE.key_params(params, iteration, **({"schedule_steps": schedule_position(params, iteration)}
                                                    if scheduled else {}))
    global _trained, _due
    _trained = None
    manifest = store.run_stage(
        "learn", iteration, layout.stage_dir("learn", iteration), inputs=inputs, params=slice_,
        code=STAGE.code_digest(),
        build=build, force=force, side={"optimizer": layout.optimizer(iteration)},
    )
    if _holding and _trained is not None:
        _held.clear()
        _held[manifest.key] = (*_trained, iteration)
        if policy_mod.stored_dtype(params["model"]) == params["model"]["dtype"]:
            # evaluate@i and sample@i+1 sample these weights without reading them back
            policy_mod.offer_inference_model(layout.stage_dir("learn", iteration), _trained[0], params["model"]["dtype"])
        if background:
            _due = params  # the flow starts it (write_due_state); the next learn waits for it
    _trained = None
    return manifest


def _state_problem(prev_opt: Path) -> str | None:
    """Why the optimizer state in `prev_opt` cannot be used (None: it can)."""
    manifest = store.read_manifest(prev_opt)
    if manifest is None:
        return ("not on disk (a local cache: a flow writes it every learn.state_every iterations and at its "
                "end, and DVC does not version it, so `dvc pull` restores the policies only)")
    if manifest.pruned:
        return f"removed ({manifest.pruned})"
    problem = store.content_problem(prev_opt, manifest)
    return f"damaged ({problem})" if problem else None


def replay_state(params: Params, iteration: int) -> None:
    """Make sure the optimizer state learn@i continues from (learn@i-1's) is on disk: when it
    is not (never written: a flow holds it in memory between `learn.state_every` writes and a
    kill lost it; removed by retention; or a `dvc pull` on another machine, which does not
    bring it), the learner is replayed from the last state written (or the base) over the
    versioned kept shards: learn@k ... learn@i-1 again, into scratch. Each replay must give the
    policy its manifest records, byte for byte; then only its optimizer state lands, and the
    recorded policy (and everything downstream of it) is untouched. Costs one learn per
    replayed iteration. Where the learner does not reproduce its bytes (another device or
    torch), nothing lands and the stage stops, saying how to go on."""
    if iteration == 0:
        return
    prev_opt = params.layout.optimizer(iteration - 1)
    why = _state_problem(prev_opt)
    if why is None:
        return
    j = iteration - 1
    recorded = store.require_output(params.layout.policy(j), needed_by=f"learn@{iteration}")
    if recorded.pruned:
        raise store.StageError(f"learn@{iteration}: the optimizer state of iteration {j} is {why}, and rebuilding it "
                               f"needs policy {params.layout.policy(j)}, which was removed ({recorded.pruned}); "
                               "restore it (`dvc pull`) or rerun from there")
    print(f"learn@{iteration}: the optimizer state of iteration {j} is {why}; replaying learn@{j} from its kept rows")
    replay_state(params, j)
    cfg = params.stage("learn", j)
    scratch = params.layout.policy(j).parent / f".replay-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if cfg.get("launcher") == "torchrun":
            launch_torchrun(params, j, scratch, int(cfg.get("nproc") or 1))
        else:
            train(params, j, scratch)
        state = scratch.parent / f".{scratch.name}-optimizer"
        os.replace(scratch / "optimizer", state)
        try:
            digest = store.directory_digest(scratch)
            if digest != recorded.digest:
                raise store.StageError(
                    f"learn@{iteration}: replaying learn@{j} to rebuild its optimizer state gave a different policy "
                    f"than the one recorded (digest {digest[:12]} vs {recorded.digest[:12]}): the learner does not "
                    "reproduce its bytes here (another device, torch or thread count). Nothing was written. Rerun "
                    f"from there (`dashflow run --from-stage learn@{j}`), or keep every optimizer state "
                    "(retention.optimizers: all, learn.state_every: 1) on the machine that runs the learner")
            store.land_side(prev_opt, recorded, lambda tmp: [os.replace(f, tmp / f.name) for f in state.iterdir()])
        finally:
            shutil.rmtree(state, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def previous_state(prev_opt: Path | None, iteration: int, label: str) -> Path | None:
    """The optimizer state learn@i continues from (learn@i-1's; None before the first),
    checked: present, finished and holding the bytes its manifest records (replay_state
    rebuilds a missing one first)."""
    if prev_opt is None:
        return None
    why = _state_problem(prev_opt)
    if why:
        raise store.StageError(f"{label}: the optimizer state of iteration {iteration - 1} ({prev_opt}: AdamW's "
                               f"moments and the float32 master weights' low bits) is {why}")
    return prev_opt


def make_optimizer(model, cfg: dict, prev_opt: Path | None, device: torch.device, label: str) -> torch.optim.AdamW:
    """AdamW over the float32 master weights, continuing the previous iteration's moments.
    The previous state carries the hyper-parameters it was saved with; those of this
    iteration's parameters (lr, betas, weight decay) are applied after loading it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), betas=tuple(cfg["betas"]),
                                  weight_decay=float(cfg["weight_decay"]))
    if prev_opt is not None:
        path = prev_opt / OPTIMIZER_FILE
        optimizer.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        for group in optimizer.param_groups:
            group.update(lr=float(cfg["lr"]), betas=tuple(cfg["betas"]), weight_decay=float(cfg["weight_decay"]))
    return optimizer


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (transformers' own switch)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def train(params: Params, iteration: int, tmp: Path, rank: int = 0, world: int = 1,
          write_state_now: bool = True) -> dict:
    """The update, written into tmp (policy files) and tmp/optimizer. With world > 1 this is
    one rank of a torch.distributed job (see launch_torchrun): the rank computes the
    gradients of the rows of its own kept shards (shard k belongs to rank k % world), DDP
    sums them across ranks at each optimizer step, and rank 0 writes the checkpoint."""
    layout, cfg, sample_cfg, sft, temperature, with_kl, kept, src, prev, prev_opt, label = context(params, iteration)
    aggregate = algorithms.get(algorithms.LOSS_AGGREGATIONS, cfg["loss_agg"], "loss aggregation")
    correct = algorithms.get(algorithms.MISMATCH_CORRECTIONS, cfg["tis_mode"], "learn.tis_mode")
    algorithms.get(algorithms.KL_ESTIMATORS, cfg["kl_estimator"], "KL estimator")  # an unknown name fails here
    top_k, top_p = (0, 1.0) if sft else (int(sample_cfg.get("top_k") or 0), float(sample_cfg.get("top_p", 1.0)))
    truncated = bool(top_k) or top_p < 1.0
    t0 = time.perf_counter()
    tokenizer = policy_mod.load_tokenizer(prev)
    if sft:
        batch = sft_batch(params, iteration, tokenizer)
    else:
        batch = rl_batch(store.read_stage(src, schema.REFERENCED if with_kl else schema.KEPT, stage=label),
                         sampled_mod.read_sampled(kept, needed_by=label))

    device = policy_mod.pick_device(params["run"]["device"])
    model, optimizer = acquire(prev, prev_opt, cfg, iteration, label, device, world)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16-mixed")
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    owner = row_owners(batch, src, world, sft)
    offset, total_steps = (schedule_position(params, iteration) if cfg["lr_schedule"] != "constant"
                           or cfg["warmup_steps"] else (0, 0))
    plan = algorithms.plan_steps([g["prompt_id"] for g in batch.sampled], cfg["update"], int(cfg["steps"]))
    sampled = {g["prompt_id"]: g for g in batch.sampled}
    rows_of: dict[str, list[int]] = {}
    for i, g in enumerate(batch.groups):
        rows_of.setdefault(g, []).append(i)
    t1 = time.perf_counter()

    tally = Tally()
    old = None
    if len(plan) > 1 and not sft and len(batch):
        # the sampling policy's log-probs, once, before the first step changes the weights
        model.eval()
        with autocast:
            old = policy_mod.completion_logprobs(
                model, batch.prompts, batch.completions, pad_id=tokenizer.pad_token_id, temperature=temperature,
                token_budget=cfg["micro_batch_tokens"], desc=f"{label} old log-probs", top_k=top_k, top_p=top_p)
        model.train()
        _tally_mismatch(tally, old[1], batch.sampler_logprobs)
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
                  "max_new_tokens": sample_cfg["max_new_tokens"]}
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        mine = [i for i in rows if owner[i] == rank]
        lengths = [len(batch.prompts[i]) + len(batch.completions[i]) for i in mine]
        micros = algorithms.pack_by_tokens(lengths, cfg["micro_batch_tokens"])
        if world > 1 and not micros:  # no rows here this step: join the gradient sum with zeros
            _zero_backward(net, device)
        for k, micro in enumerate(micros):
            idx = [mine[j] for j in micro]
            # DDP sums (averages, hence x world) the accumulated gradients at the step's last micro-batch
            sync = nullcontext if world == 1 or k == len(micros) - 1 else net.no_sync
            ps = [batch.prompts[i] for i in idx]
            input_ids, attention, targets, mask = policy_mod.collate(
                ps, [batch.completions[i] for i in idx], tokenizer.pad_token_id)
            width = mask.shape[1]
            values = lambda lists: policy_mod.place([lists[i] for i in idx], ps, width).to(device)  # noqa: E731
            mask, targets = mask.to(device), targets.to(device)
            with sync(), autocast:
                logits = net(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, :-1]
            # entropy is a metric, over the completion tokens of rows not yet counted
            first = torch.tensor([i not in seen for i in idx], dtype=mask.dtype, device=device)
            fm = mask * first[:, None]
            logp, ent = algorithms.token_logprobs_and_entropy(logits, targets, temperature, fm.bool())
            if ent.numel():
                tally.add("entropy", ent.sum(), fm.sum())
            if sft:  # cross-entropy on the reference solution's tokens
                loss = aggregate(-logp, mask, **consts)
            else:
                old_lp = logp.detach() if old is None else values(old[0])
                # the sampler's distribution (temperature, top-k, top-p) under the learner's weights
                # before the step: what the recorded sampler log-probs are to be compared with
                if old is not None:
                    sampling_lp = values(old[1])
                elif truncated:
                    sampling_lp = algorithms.processed_target_logprobs(logits, targets, mask, temperature, top_k, top_p)
                else:
                    sampling_lp = old_lp
                if old is None:
                    _tally_mismatch(tally, policy_mod.take(sampling_lp.cpu(), mask.cpu(), ps),
                                    [batch.sampler_logprobs[i] for i in idx])
                tis = (correct(sampling_lp, values(batch.sampler_logprobs), mask, lo=float(cfg["tis_min"]),
                               hi=float(cfg["tis_cap"])) if cfg["tis_cap"] else None)
                loss, metrics = algorithms.policy_loss(
                    logp, old_lp, batch.advantages[idx].to(device), mask, agg=cfg["loss_agg"], consts=consts,
                    clip_eps=cfg["clip_eps"], clip_eps_high=cfg["clip_eps_high"], tis_weights=tis,
                    ref_logprobs=values(batch.ref_logprobs) if with_kl else None, kl_coef=float(cfg["kl_coef"]),
                    kl_estimator=cfg["kl_estimator"], objective=cfg["objective"], cispo_cap=float(cfg["cispo_cap"]))
                for name, (total, count) in metrics.items():
                    tally.add(name, total, count)
            with sync():
                (loss * world).backward()
            step_loss += loss.item()
            tokens_seen += int(attention.sum())
            seen.update(idx)
            bar.update(len(idx))
        if world > 1:
            step_loss = _all_sum(step_loss)
        lr = float(cfg["lr"]) * algorithms.lr_factor(cfg["lr_schedule"], offset + step_index,
                                                     int(cfg["warmup_steps"]), total_steps)
        grad_norm = optimizer_step(model, optimizer, lr, cfg["max_grad_norm"], step_loss, label, prev)
        tally.add("loss", step_loss, 1)
        tally.add("grad_norm", grad_norm, 1)
        tally.add("lr", lr, 1)
    bar.close()
    t2 = time.perf_counter()
    if world > 1:
        tokens_seen = _merge_tallies(tally, tokens_seen)
        if rank > 0:
            return {}

    low = policy_mod.save_policy(model, tokenizer, tmp, policy_mod.stored_dtype(params["model"]))
    store.fault_point("mid-checkpoint", f"learn@{iteration}")
    if write_state_now:
        write_state(model, optimizer, tmp / "optimizer", policy_mod.stored_dtype(params["model"]), low)
    if world == 1:
        global _trained
        _trained = (model, optimizer)
    names = ("loss", "grad_norm", "lr", "entropy", "clip_fraction", "approx_kl_to_sampling",
             "sampler_mismatch", "tis_weight", "mismatch_masked", "kl_to_reference")
    return {
        "stats": {"updated": bool(len(batch)), "mode": cfg["mode"], "precision": cfg["precision"], "rows": len(batch),
                  "sampled_rows": sum(g["rows"] for g in batch.sampled), "optimizer_steps": len(plan),
                  "completion_tokens": sum(len(c) for c in batch.completions),
                  **{n: tally.mean(n) for n in names},
                  "tokens_per_s": tokens_seen / max(t2 - t1, 1e-9)},
        "timing": {"load_s": t1 - t0, "work_s": t2 - t1, "save_s": time.perf_counter() - t2},
    }


def acquire(prev: Path, prev_opt: Path | None, cfg: dict, iteration: int, label: str, device: torch.device,
            world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The float32 master weights and the AdamW state this learn continues from, in train mode:
    held in memory by learn@i-1 of this flow, or read from its checkpoint and optimizer state."""
    held = _take_held(prev) if world == 1 else None
    if held is not None:  # learn@i-1 of this flow left its model and AdamW state in memory
        policy_mod.release_inference_model()  # which may be serving as one; from here on it trains
        model, optimizer, _ = held
        for group in optimizer.param_groups:  # this iteration's hyper-parameters, as after a load
            group.update(lr=float(cfg["lr"]), betas=tuple(cfg["betas"]), weight_decay=float(cfg["weight_decay"]))
    else:
        prev_opt = previous_state(prev_opt, iteration, label)
        low_bits = prev_opt / policy_mod.LOW_BITS_FILE if prev_opt is not None else None
        low_bits = low_bits if low_bits is not None and low_bits.is_file() else None
        # float32 master weights, whatever the precision: the previous policy plus the low bits
        # its learn kept (bit-exact); the base policy's own weights at the first iteration --
        # the float32 model sample@i served them with, where this process holds it
        model = policy_mod.take_inference_model(prev, device) if low_bits is None else None
        if model is None:
            policy_mod.release_inference_model()
            model = policy_mod.load_master(prev, low_bits, device)
        optimizer = None
    if cfg.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model)
    model.train()
    if optimizer is None:
        optimizer = make_optimizer(model, cfg, prev_opt, device, label)
    return model, optimizer


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


def _tally_mismatch(tally: Tally, learner: list[list[float]], sampler: list[list[float]] | None) -> None:
    """Sampler/learner mismatch: mean |logp_learner - logp_sampler| over the sampled tokens."""
    for lr, sp in zip(learner, sampler or []):
        pairs = [(a, b) for a, b in zip(lr, sp) if math.isfinite(a)]  # -inf: left the learner's top-k/top-p
        if pairs:
            tally.add("sampler_mismatch", sum(abs(a - b) for a, b in pairs), len(pairs))


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


def launch_torchrun(params: Params, iteration: int, tmp: Path, nproc: int) -> dict:
    """Run `train` as `nproc` torch.distributed ranks (torchrun, one host; gloo on CPU, NCCL
    on CUDA) and return rank 0's result. A failed rank fails the stage; nothing lands."""
    job = tmp / ".learn-job.json"
    job.write_text(json.dumps({"params": json.loads(params.to_json()), "iteration": iteration, "out": str(tmp)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dashflow.tasks.learn", str(job)]
    # torchrun dies with this process (util-linux setpriv: parent-death signal SIGKILL), and each
    # rank with torchrun (_rank_main), so no rank outlives a killed or failed learn to write
    # into the next attempt's scratch directory
    setpriv = shutil.which("setpriv")
    proc = subprocess.Popen(([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []) + cmd,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")),
                            start_new_session=True)
    try:
        proc.wait()
    except BaseException:  # a Prefect task timeout, Ctrl-C: stop the launcher; its ranks follow it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    result = tmp / ".learn-result.json"
    if proc.returncode != 0 or not result.exists():
        raise store.StageError(f"learn@{iteration}: torchrun with {nproc} processes failed (exit {proc.returncode}); "
                               f"the previous checkpoint is kept and nothing is written")
    return json.loads(result.read_text())


def _die_with_parent() -> None:
    """SIGKILL this rank when its torchrun agent dies (Linux parent-death signal)."""
    import ctypes

    if sys.platform != "linux":
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if parent == 1 or os.getppid() != parent:  # the agent died before the signal was set
        os._exit(1)


def _rank_main(job_path: str) -> None:
    """Entry point of one torchrun rank (`python -m dashflow.tasks.learn JOB.json`)."""
    import torch.distributed as dist

    _die_with_parent()
    job = json.loads(Path(job_path).read_text())
    params = Params(job["params"]["tree"], job["params"]["scoped"])
    device = policy_mod.pick_device(params["run"]["device"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        params = params.with_overrides({"run.device": f"cuda:{os.environ['LOCAL_RANK']}"})
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        result = train(params, job["iteration"], Path(job["out"]), rank=rank, world=world)
        if rank == 0:
            store.write_json(Path(job["out"]) / ".learn-result.json", result)
    finally:
        dist.destroy_process_group()


# No retries: a learner step must not apply twice (its output only lands when complete,
# so a rerun after a failure starts again from the previous checkpoint, never on top of a half step).
learn_task = stage_task(run, "learn")


if __name__ == "__main__":
    _rank_main(sys.argv[1])
