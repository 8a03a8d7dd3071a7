"""The evaluation flow: accuracy of one checkpoint on the run's held-out prompts.

    prompts (prepare) --> evaluate(checkpoint) --> eval/ + a Prefect table artifact

`checkpoint` is an iteration of the run (`7`), `base`, or a path to any HF checkpoint
directory (its result goes to <run>/evals/<directory name>-<digest>/). Like every stage
it is cached by content: evaluating the same checkpoint twice runs once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from dashflow.core import store
from dashflow.core.config import Params, ParamsError
from dashflow.ops.console import eval_line
from dashflow.tasks.evaluate import evaluate_task
from dashflow.tasks.prepare import prepare_task


def resolve_checkpoint(params: Params, checkpoint: int | str) -> dict:
    """`7` / `base` / a directory -> evaluate_task keyword arguments."""
    text = str(checkpoint).strip()
    if text == "base" or text.lstrip("-").isdigit():
        iteration = -1 if text == "base" else int(text)
        store.require_output(params.layout.policy(iteration), needed_by=f"dash-eval of checkpoint {text!r}")
        return {"iteration": iteration}
    path = Path(text).expanduser().resolve()
    if not path.is_dir():
        raise ParamsError(f"checkpoint {text!r} is neither an iteration, 'base', nor an existing directory")
    slug = f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    return {"iteration": None, "policy": path, "out": params.layout.root / "evals" / slug}


@task(name="eval-artifact", cache_policy=NO_CACHE)
def artifact_task(params: Params, checkpoint: int | str, result: dict) -> None:
    stats = result["stats"]
    create_table_artifact(
        key=f"{params['run']['name']}-eval".lower().replace("_", "-"),
        table=[{"checkpoint": str(checkpoint), **{k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in stats.items()}}],
        description=f"evaluation of checkpoint {checkpoint} on {stats.get('prompts')} held-out prompts",
    )


@flow(name="dash-eval", log_prints=True)
def dash_eval(checkpoint: int | str = "base", params_path: str = "params.yaml", overrides: dict | None = None,
              force: bool = False) -> dict:
    params = Params.load(params_path, overrides)
    with store.run_lock(params.layout.root):  # one writer per run directory (a training run holds it too)
        prepare_task(params, None)
        target = resolve_checkpoint(params, checkpoint)
        result = evaluate_task(params, target.pop("iteration"), force=force, **target)
    artifact_task(params, checkpoint, result)
    stats = result["stats"]
    print(f"checkpoint {checkpoint}: {eval_line(stats)} on {stats.get('prompts')} prompts "
          f"({'cached' if result['cached'] else 'evaluated'})")
    return result
