"""Benchmark: the sample stage on 1..N Ray workers and the learn stage on 1..N torchrun ranks,
on the default config's iteration 0 (64 rollouts), each stage forced to rerun.

    python bench/scaleout.py                       # workers 1,2 and ranks 1,2
    python bench/scaleout.py --workers 1,2,4 --ranks 1,2,4
    python bench/scaleout.py --tiny                # what CI runs

Stage wall = the stage call, end to end (for Ray: starting the local cluster and the
sub-flow included); work = the slowest worker's generate calls for sample, the
forward/backward/step loop of rank 0 for learn. The rows column checks
that every worker count sampled the same tokens as one worker.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer
from _common import ROOT, TINY, emit, scratch


def main(
    workers: str = typer.Option("1,2", help="comma-separated Ray worker counts (sample.workers)"),
    ranks: str = typer.Option("1,2", help="comma-separated torchrun process counts (learn.nproc)"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="extra override key=value"),
    tiny: bool = typer.Option(False),
    out: Path = typer.Option(Path("bench/results/scaleout.json")),
):
    from dashflow.core import schema, store
    from dashflow.core.config import Params, _parse_override
    from dashflow.tasks import advantage, learn, prepare, reference, reward, sample
    from dashflow.tasks import filter as filter_stage

    base = dict(TINY) if tiny else {}
    base.update(dict(_parse_override(s) for s in set_ or []))
    rows = []
    with scratch("scaleout") as root:
        params = Params.load(ROOT / "params.yaml", dict(base, **{"run.root": str(root), "run.name": "w1"}))
        prepare.run(params)
        first = None
        for n in [int(x) for x in workers.split(",")]:
            p = params.with_overrides({"run.name": f"w{n}", "sample.workers": n})
            if p.layout.root != params.layout.root:
                shutil.copytree(params.layout.base, p.layout.base, dirs_exist_ok=True, copy_function=_link)
            started = time.perf_counter()
            m = sample.run(p, 0, force=True)
            wall = time.perf_counter() - started
            tokens = [r["completion_token_ids"] for r in
                      store.read_stage(p.layout.stage_dir("sample", 0), schema.ROLLOUTS, stage="bench").to_pylist()]
            first = first or tokens
            rows.append(["sample", f"{n} Ray worker{'s' * (n > 1)}" if n > 1 else "1 (in process)", m.stats["rows"],
                         round(wall, 1), round(m.stats["generation_s"], 1), round(m.stats["tokens_per_s"], 1),
                         "same" if tokens == first else "DIFFERENT"])
        for stage in (reward, advantage, filter_stage, reference):
            stage.run(params, 0)
        for n in [int(x) for x in ranks.split(",")]:
            p = params.with_overrides({"learn.launcher": "torchrun" if n > 1 else "local", "learn.nproc": n})
            started = time.perf_counter()
            m = learn.run(p, 0, force=True)
            wall = time.perf_counter() - started
            rows.append(["learn", f"torchrun, {n} gloo/nccl ranks" if n > 1 else "1 (in process)", m.stats["rows"],
                         round(wall, 1), round(m.timing.get("work_s", 0.0), 1),
                         round(m.stats.get("tokens_per_s") or 0.0, 1), f"loss {m.stats.get('loss') or 0:+.6f}"])
    emit("Sample stage on Ray workers, learn stage on torchrun ranks (iteration 0, forced)",
         ["stage", "run as", "rows", "stage wall s", "work s", "tok/s", "check"], rows, out, overrides=base)


def _link(src, dst):
    from dashflow.core.store import link_or_copy

    link_or_copy(Path(src), Path(dst))


if __name__ == "__main__":
    typer.run(main)
