"""Stage `learn`: the policy update from one sampled batch, in small accumulated micro-batches.

The update itself (the step plan, micro-batches, the loss, AdamW) is dashflow/core/update.py;
the optimizer state between iterations, on disk and held in memory by a flow, is
dashflow/core/optimizer_state.py; `learn.launcher: torchrun` runs the update as
`learn.nproc` ranks (dashflow/core/torchrun.py). This module is the stage: what it reads,
what it writes, its key, and rebuilding a missing optimizer state (`replay_state`).

Inputs : iter-i/kept with kept/sampled.json (and iter-i/reference when the KL penalty is
         on; the prompts in SFT mode), the policy and optimizer state written by iteration
         i-1 (none before the first; a missing state is rebuilt first, see replay_state)
Output : iter-i/policy/ (safetensors shards in the samplers' dtype, config, tokenizer)
         and iter-i/optimizer/ (the side output: AdamW's state and, with bfloat16
         checkpoints, the master weights' low bits; a local cache DVC does not version, the
         last one kept by default: retention.optimizers)
Key    : the previous policy, the kept rows (or prompts; the reference log-probs), STAGE's
         parameters, and where the learning-rate schedule stands when it is not constant.
"""

from __future__ import annotations

import os
import shutil

from dashflow.core import algorithms, batches, problems, schema, store, torchrun, update
from dashflow.core import optimizer_state as state_mod
from dashflow.core import policy as policy_mod
from dashflow.core import prompts as prompts_mod
from dashflow.core import sampled_batch as sampled_mod
from dashflow.core.config import Params
from dashflow.core.optimizer_state import HeldState
from dashflow.core.stage import Stage

# What the update depends on. How the learner runs is not (learn.launcher, nproc,
# gradient_checkpointing, state_every: the same update up to float rounding).
STAGE = Stage("learn", __name__, code=(algorithms, batches, update, state_mod, policy_mod, problems, prompts_mod,
                                       sampled_mod, schema), params=(
    "run.seed", "learn.lr", "learn.betas", "learn.weight_decay", "learn.max_grad_norm", "learn.micro_batch_tokens",
    "learn.mode", "learn.update", "learn.steps", "learn.clip_eps", "learn.clip_eps_high", "learn.loss_agg",
    "learn.kl_coef", "learn.kl_estimator", "learn.tis_cap", "learn.tis_mode", "learn.tis_min",
    "learn.objective", "learn.cispo_cap", "learn.precision", "learn.lr_schedule",
    "learn.warmup_steps", "model.dtype", "model.checkpoint_dtype", "sample.temperature", "sample.top_k",
    "sample.top_p", "sample.max_new_tokens", "sample.prompts_per_iteration"))


def _update(params: Params, iteration: int, tmp, *, held: HeldState | None = None,
            write_state_now: bool = True) -> update.Trained:
    """learn@i's update into tmp, in this process or as torchrun's ranks (learn.launcher)."""
    cfg = params.stage("learn", iteration)
    if cfg.launcher == "torchrun":
        return update.Trained(torchrun.launch(params, iteration, tmp, cfg.nproc or 1))
    return update.train(params, iteration, tmp, write_state_now=write_state_now, held=held)


def run(params: Params, iteration: int, force: bool = False, held: HeldState | None = None) -> store.Manifest:
    """learn@i. `held`: the flow's HeldState, through which learn@i-1 hands its model and
    optimizer over in memory and learn@i leaves its own (outside a flow: None, and the
    optimizer state is written with the policy)."""
    inp = update.LearnInputs.of(params, iteration)
    layout, cfg = params.layout, inp.cfg
    # torchrun's rank 0 writes the optimizer state with the policy; in a flow it is held for
    # the next learn and written in a thread every `state_every` iterations and at the last
    hold = held is not None and cfg.launcher != "torchrun"
    every = cfg.state_every or 1
    due = (iteration + 1) % every == 0 or iteration >= params.iterations - 1
    trained: list[update.Trained] = []

    def build(tmp) -> dict:
        if held is not None:
            held.wait()  # a replay may need the state being written, and a held model must not move
        if not (hold and held.key_for(inp.prev)):
            replay_state(params, iteration)
        trained.append(_update(params, iteration, tmp, held=held if hold else None, write_state_now=not hold))
        return trained[-1].result

    # the previous optimizer state is not a key input: it lands with the previous policy under
    # the same key, so the policy's digest stands for both (and a run whose states are gone --
    # retention, or a `dvc pull` elsewhere -- still finds its finished stages cached)
    inputs = {"policy": inp.prev, **({"prompts": layout.base / "prompts"} if inp.sft else {"kept": inp.kept}),
              **({"reference": inp.src} if inp.with_kl and not inp.sft else {})}
    # where the learning-rate schedule stands depends on the whole schedule, not only on this slice
    position = update.schedule_position(params, iteration)
    manifest = STAGE.run(params, iteration, inputs=inputs, build=build, force=force,
                         derived={"schedule_steps": position} if position else None,
                         side={"optimizer": layout.optimizer(iteration)})
    if hold and trained and trained[-1].model is not None:
        model, optimizer = trained[-1].model, trained[-1].optimizer
        held.hold(manifest.key, model, optimizer, iteration, due=due)
        if policy_mod.stored_dtype(params["model"]) == params["model"]["dtype"]:
            # evaluate@i and sample@i+1 sample these weights without reading them back
            policy_mod.offer_inference_model(layout.stage_dir("learn", iteration), model, params["model"]["dtype"])
    return manifest


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
    why = state_mod.state_problem(prev_opt)
    if why is None:
        return
    j = iteration - 1
    recorded = store.require_output(params.layout.policy(j), needed_by=STAGE.label(iteration))
    if recorded.pruned:
        raise store.StageError(f"learn@{iteration}: the optimizer state of iteration {j} is {why}, and rebuilding it "
                               f"needs policy {params.layout.policy(j)}, which was removed ({recorded.pruned}); "
                               "restore it (`dvc pull`) or rerun from there")
    print(f"learn@{iteration}: the optimizer state of iteration {j} is {why}; replaying learn@{j} from its kept rows")
    replay_state(params, j)
    scratch = params.layout.policy(j).parent / f".replay-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        _update(params, j, scratch)
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


# No retries: a learner step must not apply twice (its output only lands when complete,
# so a rerun after a failure starts again from the previous checkpoint, never on top of a half step).
learn_task = STAGE.task(run)
