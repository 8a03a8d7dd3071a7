"""`learn.launcher: torchrun`: the update as `learn.nproc` torch.distributed ranks on one host.

`launch` starts `python -m torch.distributed.run ... -m dashflow.core.torchrun JOB.json`
(gloo on CPU, NCCL on CUDA); each rank runs `update.train` with its rank and world size
(DDP over the kept shards, dashflow/core/update.py) and rank 0 writes the checkpoint and the
result. No rank outlives a killed or failed learn: torchrun dies with this process
(util-linux setpriv's parent-death signal) and each rank with torchrun (`_die_with_parent`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from dashflow.core import policy as policy_mod
from dashflow.core import store, update
from dashflow.core.config import Params


def launch(params: Params, iteration: int, tmp: Path, nproc: int) -> dict:
    """Run `update.train` as `nproc` ranks into `tmp` and return rank 0's result (stats, timing).
    A failed rank fails the stage; nothing lands."""
    job = tmp / ".learn-job.json"
    job.write_text(json.dumps({"params": json.loads(params.to_json()), "iteration": iteration, "out": str(tmp)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dashflow.core.torchrun", str(job)]
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


def rank_main(job_path: str) -> None:
    """Entry point of one rank (`python -m dashflow.core.torchrun JOB.json`)."""
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
        trained = update.train(params, job["iteration"], Path(job["out"]), rank=rank, world=world)
        if rank == 0:
            store.write_json(Path(job["out"]) / ".learn-result.json", trained.result)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1])
