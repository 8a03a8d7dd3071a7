"""The learner's optimizer state between iterations: on disk, and held in memory by a flow.

On disk, `iter-i/optimizer/` holds AdamW's state (`optimizer.pt`) and, with bfloat16
checkpoints, the low 16 bits of every float32 master weight (`master_low16.safetensors`:
policy + low bits = the learner's weights bit for bit). It is learn@i's side output, under
learn@i's key, needed only by learn@i+1: a local cache that DVC does not version.

Within one flow run, `HeldState` (the flow owns one) hands learn@i's float32 model and AdamW
state to learn@i+1 in memory, with no write and no read, and writes the state only every
`learn.state_every` iterations and at the schedule's last -- in a thread, while the next
stages compute -- and whatever it still holds when the flow ends, stops or fails.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

import torch

from dashflow.core import policy as policy_mod
from dashflow.core import store
from dashflow.core.config import Params
from dashflow.core.stage_configs import LearnConfig

OPTIMIZER_FILE = "optimizer.pt"


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


def state_problem(directory: Path) -> str | None:
    """Why the optimizer state in `directory` cannot be used (None: it can)."""
    manifest = store.read_manifest(directory)
    if manifest is None:
        return ("not on disk (a local cache: a flow writes it every learn.state_every iterations and at its "
                "end, and DVC does not version it, so `dvc pull` restores the policies only)")
    if manifest.pruned:
        return f"removed ({manifest.pruned})"
    problem = store.content_problem(directory, manifest)
    return f"damaged ({problem})" if problem else None


def previous_state(prev_opt: Path | None, iteration: int, label: str) -> Path | None:
    """The optimizer state learn@i continues from (learn@i-1's; None before the first),
    checked: present, finished and holding the bytes its manifest records (the learn stage
    replays a missing one first)."""
    if prev_opt is None:
        return None
    why = state_problem(prev_opt)
    if why:
        raise store.StageError(f"{label}: the optimizer state of iteration {iteration - 1} ({prev_opt}: AdamW's "
                               f"moments and the float32 master weights' low bits) is {why}")
    return prev_opt


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: LearnConfig) -> None:
    """This iteration's lr, betas and weight decay (a loaded or held state carries its own)."""
    for group in optimizer.param_groups:
        group.update(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def make_optimizer(model, cfg: LearnConfig, prev_opt: Path | None, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the float32 master weights, continuing the previous iteration's moments
    (read from `prev_opt`), with this iteration's hyper-parameters."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if prev_opt is not None:
        optimizer.load_state_dict(torch.load(prev_opt / OPTIMIZER_FILE, map_location=device, weights_only=True))
        apply_hyperparameters(optimizer, cfg)
    return optimizer


class HeldState:
    """learn@i's model and AdamW state, handed to learn@i+1 of the same flow run in memory.

    The flow enters one (`with HeldState(params) as held:`) and passes it to every learn.
    learn@i leaves its model and optimizer here (`hold`) under its stage key; the
    every-`state_every` write is left due: the flow starts it in a thread once the
    iteration's bookkeeping is done (`write_due`), so it waits for the disk while the next
    stages compute; learn@i+1 waits for it before it steps the optimizer the thread reads, and
    writes it itself if it was never started (`wait`). The state lands atomically either way
    (store.land_side). On leaving, whatever is held and not on disk is written. A process
    killed in between loses only the held state: the next learn replays from the last one
    written, with the same bytes."""

    def __init__(self, params: Params):
        self.params = params
        self.entries: dict[str, tuple] = {}     # learn stage key -> (model, optimizer, iteration)
        self.due = False                        # a held state is due to be written (write_due)
        self.writer: threading.Thread | None = None
        self._failed: list[BaseException] = []

    def __enter__(self) -> HeldState:
        return self

    def __exit__(self, *exc) -> None:
        try:
            try:
                self.wait()
            except store.StageError as error:
                print(f"{error}; writing it again")
            self.flush()  # what is held and not on disk yet, the background write's included if it failed
        finally:
            self.entries.clear()

    def hold(self, key: str, model, optimizer, iteration: int, due: bool) -> None:
        """Keep learn@i's model and optimizer (landed under `key`) for learn@i+1; `due`: its
        state is to be written in the background (every learn.state_every and at the last)."""
        self.entries.clear()
        self.entries[key] = (model, optimizer, iteration)
        self.due = self.due or due

    def key_for(self, prev: Path) -> str | None:
        """The key under which learn@i-1 left its model and optimizer here, if they are the
        ones the policy `prev` records."""
        found = store.read_manifest(prev)
        return found.key if found is not None and not found.pruned and found.key in self.entries else None

    def take(self, prev: Path) -> tuple | None:
        """The (model, optimizer, iteration) learn@i-1 left for the policy `prev` (see key_for);
        nothing stays held. The caller has waited for their background write (`wait`)."""
        key = self.key_for(prev)
        held = self.entries.pop(key) if key is not None else None
        self.entries.clear()
        return held

    def write_due(self) -> None:
        """Start writing the optimizer state a learn left due (if any) in a thread."""
        if not self.due:
            return
        self.due = False

        def write() -> None:
            try:
                self.flush()
            except BaseException as exc:  # noqa: BLE001 -- raised by wait(), in the flow's thread
                self._failed.append(exc)

        self.writer = threading.Thread(target=write, name="dashflow-optimizer-state")
        self.writer.start()

    def wait(self) -> float:
        """Make sure the optimizer state due to be written is on disk: wait for its thread, or
        write it now if it was not started. Returns the seconds that took (the caller's time
        spent on the write). Raises a StageError if the thread failed (the state stays held, so
        leaving writes it)."""
        started = time.perf_counter()
        if self.due:
            self.due = False
            self.flush()
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        blocked = time.perf_counter() - started
        if self._failed:
            exc = self._failed.pop()
            why = str(exc) if isinstance(exc, store.StageError) else f"({type(exc).__name__}: {exc})"
            raise store.StageError(f"writing the optimizer state in the background failed: {why}") from exc
        return blocked

    def flush(self) -> None:
        """Write the optimizer state held in memory, if it is not on disk yet."""
        layout = self.params.layout
        for key, (model, optimizer, iteration) in list(self.entries.items()):
            main = store.read_manifest(layout.policy(iteration))
            if main is None or main.key != key:
                continue  # the policy it belongs to was replaced since
            directory = layout.optimizer(iteration)
            if state_problem(directory) is None and store.read_manifest(directory).key == key:
                continue
            dtype = policy_mod.stored_dtype(self.params["model"])
            with store.disk_errors(directory, f"learn@{iteration}"):
                store.land_side(directory, main, partial(_write_held, model, optimizer, dtype, iteration))


def _write_held(model, optimizer, dtype: str, iteration: int, tmp: Path) -> None:
    """A held optimizer state into the staging directory `tmp` (store.land_side lands it)."""
    write_state(model, optimizer, tmp, dtype)
    store.fault_point("mid-state", f"learn@{iteration}")
