"""Stage `prepare`: the run's prompts (train/eval split) and its starting policy.

Outputs
- base/prompts/{train,eval}.parquet   (schema.PROMPTS)
- base/policy/                        safetensors HF checkpoint + tokenizer
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dashflow.core import models, problems, schema, store
from dashflow.core import policy as policy_mod
from dashflow.core import prompts as prompts_mod
from dashflow.core.config import Params
from dashflow.core.stage import Stage

# prepare writes two outputs, each with its own key: the prompts and the base policy
PROMPTS = Stage("prepare", __name__, code=(problems, prompts_mod, schema), params=(
    "run.seed", "task.kind", "task.options", "task.path", "task.hub_name", "task.hub_config", "task.hub_split",
    "task.question_field", "task.answer_field", "task.hub_format", "task.num_train", "task.num_eval",
    "task.level_weights", "task.instruction", "task.system", "task.fewshot", "task.demonstrations"))
POLICY = Stage("prepare_policy", __name__, code=(models, policy_mod),
               params=("model.name", "model.dtype", "model.checkpoint_dtype"))


def _file_digest(path: str | None, name: str = "task_file") -> dict[str, str]:
    return {name: store.file_sha256(Path(path))} if path and Path(path).is_file() else {}


def prepare_prompts(params: Params, force: bool = False) -> store.Manifest:
    layout = params.layout
    task_cfg = params.stage("task")
    seed = params["run"]["seed"]

    def build(tmp: Path) -> dict:
        try:
            train, evals = problems.load_task(task_cfg, seed)
            demos = prompts_mod.demonstrations(task_cfg, train, seed)
        except problems.ProblemError as exc:
            raise store.StageError(f"prepare: {exc}") from exc
        context = prompts_mod.context(task_cfg, demos)  # the same turns before every question
        for name, rows in (("train", train), ("eval", evals)):
            table = pa.Table.from_pylist([dict(r, context=context) for r in rows], schema=schema.PROMPTS)
            pq.write_table(table, tmp / f"{name}.parquet")
        return {"stats": {"train_prompts": len(train), "eval_prompts": len(evals), "demonstrations": len(demos),
                          "system": bool(task_cfg.get("system"))}}

    given = task_cfg.get("demonstrations")
    demo_file = given if isinstance(given, str) else None  # a JSONL of demonstrations: its bytes are in the key
    kind = task_cfg["kind"]
    try:  # a task of your own: its module's source is part of the key (edit it and prepare reruns)
        user = [problems.user_task(kind)[0]] if isinstance(kind, str) and ":" in kind else []
    except problems.ProblemError as exc:
        raise store.StageError(f"prepare: {exc}") from exc
    return PROMPTS.run(
        params, None, inputs={}, build=build, force=force, out=layout.base / "prompts", extra_code=tuple(user),
        extra_inputs={**_file_digest(task_cfg.get("path")), **_file_digest(demo_file, "demonstrations_file")},
    )


def _model_identity(name: str, record: Path) -> dict[str, str]:
    """What identifies a local model directory's content: each file's sha256. A file whose
    size, mtime and inode are those recorded (in `record`, under the run) is not read again;
    one rewritten in place is, so an edited model is a new base policy."""
    path = Path(name)
    if not path.is_dir():
        return {}
    known = json.loads(record.read_text()) if record.is_file() else {}
    digests, seen = {}, {}
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        stat = store.stat_key(f.stat())
        entry = known.get(str(f.resolve()))
        digest = entry["sha256"] if entry and entry["stat"] == stat else store.file_sha256(f)
        seen[str(f.resolve())] = {"stat": stat, "sha256": digest}
        digests[f.name] = digest
    if seen != known:
        record.parent.mkdir(parents=True, exist_ok=True)
        store.write_json(record, seen)
    return {"model_files": ",".join(f"{n}:{d}" for n, d in digests.items())}


def prepare_policy(params: Params, force: bool = False) -> store.Manifest:
    layout = params.layout
    model_cfg = params.stage("model")

    def build(tmp: Path) -> dict:
        source = models.resolve_model(model_cfg["name"])
        src = Path(source)
        dtype = policy_mod.stored_dtype(model_cfg)
        if src.is_dir() and policy_mod.checkpoint_dtype(src) == dtype:
            # already a safetensors checkpoint in the checkpoint dtype: the embedded
            # model's cache (never rewritten in place: a new conversion is a new directory) is
            # hard-linked; a model directory of yours is copied, so editing it later cannot
            # change this run's base
            embedded = model_cfg["name"] in models.EMBEDDED
            for f in src.iterdir():
                if f.is_file():
                    (store.link_or_copy if embedded else shutil.copy2)(f, tmp / f.name)
        else:  # hub id, another format or dtype: load, cast (to nearest) and save as safetensors
            model = policy_mod.load_model(source, policy_mod.pick_device("cpu"), dtype)
            policy_mod.write_weights(model, tmp)
            policy_mod.load_tokenizer(source).save_pretrained(tmp)
        return {"stats": {"source": source}}

    return POLICY.run(
        params, None, inputs={}, build=build, force=force, out=layout.policy(-1),
        extra_inputs=_model_identity(model_cfg["name"], layout.base / ".model_identity.json"),
    )


def run(params: Params, iteration: int | None = None, force: bool = False) -> store.Manifest:
    prepare_policy(params, force=force)
    return prepare_prompts(params, force=force)


prepare_task = PROMPTS.task(run)
