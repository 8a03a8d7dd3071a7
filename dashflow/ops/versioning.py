"""Recording a flow run in DVC: each finished stage is committed to dvc.lock.

dvc.yaml defines the same stages the flow runs (`prepare`, `sample@i` ... `metrics@i`,
`evaluate@NAME`, built with `foreach` from params.yaml's `schedule`), with the same
commands (`dashflow stage ...`). The flow passes every stage it finishes (or finds up to
date) to `Recorder`, and commits them after each iteration (`dvc commit` of those stages),
so after any flow run -- CLI, Python or a Prefect deployment -- `dvc status` is clean and
`dvc.lock` pins every output.

This is the one place dashflow talks to DVC. Commits are serialized by a file lock next
to DVC's own, and a DVC lock held by another command (a `dvc status` in a terminal) is
waited for, so concurrent DVC commands never collide.

A run is recorded only when dvc.lock can tell the truth about it: the working directory
is a DVC repository whose dvc.yaml has the stages, the params file is its params.yaml
and no override changes a parameter a stage depends on (`dvc exp run -S` is the DVC way
to vary one). `dvc.track` in params.yaml: auto (record when possible, else say why), on
(a run that cannot be recorded is an error), off.
"""

from __future__ import annotations

import copy
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from dashflow.core import store
from dashflow.core.config import ParamsError

# overrides that no DVC stage depends on: they change how a run executes, not what it computes
NEUTRAL = ("run.iterations", "run.device", "prefect.", "dvc.", "retention.", "sample.workers", "sample.ray_address",
           "sample.worker_gpus", "sample.worker_retries", "sample.tensor_parallel", "learn.launcher", "learn.nproc")


_PATCH_LOCK = threading.Lock()  # one commit at a time replaces DVC's params reader (_params_read_once)


class DvcError(RuntimeError):
    pass


def dvc_stage_name(stage: str, iteration: int | None) -> str:
    """Flow stage -> dvc.yaml stage: prepare, sample@3, evaluate@base, evaluate@7."""
    if stage in ("prepare", "prepare_policy") or iteration is None:
        return "prepare"
    return f"{stage}@{'base' if iteration < 0 else iteration}"


def _why_not(root: Path, params_path: Path, overrides: dict) -> str | None:
    if not (root / ".dvc").is_dir():
        return (f"{root} is not a DVC repository; run `dvc init` there (inside a git repository: "
                "`git init && dvc init`), or set dvc.track: off")
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file() or "schedule.iterations" not in dvc_yaml.read_text():
        return f"{dvc_yaml} does not define dashflow's stages (copy dashflow's dvc.yaml there)"
    if params_path.resolve() != (root / "params.yaml").resolve():
        return f"the run reads {params_path}, but dvc.yaml's stages read {root / 'params.yaml'}"
    changed = sorted(k for k in overrides if not k.startswith(NEUTRAL))
    if "run.iterations" in overrides:
        import yaml

        scheduled = len(((yaml.safe_load(params_path.read_text()) or {}).get("schedule") or {}).get("iterations") or [])
        if int(overrides["run.iterations"]) != scheduled:
            return (f"--iterations {overrides['run.iterations']} is not the {scheduled} iterations of params.yaml's "
                    "schedule, which dvc.yaml's stages follow (and what is evaluated depends on it); run "
                    f"`dashflow schedule {overrides['run.iterations']}` to record it, or `--until I` to stop early")
    if changed:
        return (f"overrides {', '.join(changed)} are not in params.yaml, so dvc.lock would record other "
                "values; put them in params.yaml, or run `dvc exp run -S key=value`")
    return None


def _stale_dynamic(root: Path, params) -> str | None:
    """With dynamic sampling on, dvc.yaml's sample stage must depend on the reward settings
    (its cache key does); a dvc.yaml written with it off does not."""
    import yaml

    if not params.stage("sample").get("dynamic_rounds"):
        return None
    stage = ((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}).get("sample") or {}
    if "reward.functions" not in ((stage.get("do") or stage).get("params") or []):
        return ("sample.dynamic_rounds is on, but dvc.yaml's sample stage does not depend on the reward settings "
                "that decide its rounds; run `dashflow dvc-yaml` with this params.yaml to rewrite it")
    return None


class Recorder:
    """`recorder(result)` queues the stage a stage task just finished (`result` is the
    summary a stage task returns) and `recorder.flush()` commits the queue; both are
    no-ops when the run is not recorded (`reason` says why)."""

    def __init__(self, params, params_path: str | Path, overrides: dict | None = None, root: Path | None = None):
        self.root = Path(root or Path.cwd()).resolve()
        mode = str((params.tree.get("dvc") or {}).get("track", "auto")).lower()
        if mode not in ("auto", "on", "off", "true", "false"):
            raise ParamsError(f"dvc.track must be auto, on or off, not {mode!r}")
        self.reason = "dvc.track is off" if mode in ("off", "false") else (
            _why_not(self.root, Path(params_path), overrides or {}) or _stale_dynamic(self.root, params))
        if self.reason and mode in ("on", "true"):
            raise ParamsError(f"dvc.track is on, but this run cannot be recorded in DVC: {self.reason}")
        self.enabled = self.reason is None
        self.pending: list[str] = []

    def describe(self) -> str:
        return f"DVC: recording stages in {self.root / 'dvc.lock'}" if self.enabled else f"DVC: not recorded ({self.reason})"

    def __call__(self, result: dict, stage: str | None = None) -> dict:
        """Queue the stage a stage task just finished (`flush` commits the queue)."""
        if self.enabled:
            name = dvc_stage_name(stage or result["stage"], result["iteration"])
            if name not in self.pending:
                self.pending.append(name)
        return result

    def flush(self) -> None:
        """Commit the queued stages to dvc.lock in one locked DVC operation (one lock-file
        write: rewriting dvc.lock costs ~0.5 s per write once a run has many stages).
        The flow flushes every dvc.commit_every iterations and when it ends, stops or fails;
        stages a kill left uncommitted are committed by the next run, which passes every
        stage (cached ones too) through here again."""
        if not self.enabled or not self.pending:
            return
        targets, self.pending = self.pending, []
        self._with_repo(lambda repo: _commit(repo, targets), f"dvc commit {' '.join(targets)}")

    def check_remote(self) -> None:
        """Fail early when the retention setting will need a default DVC remote and there is none."""
        if self.enabled and not self._with_repo(lambda repo: repo.config["core"].get("remote"), "dvc config"):
            raise DvcError("retention.dvc is `remote`, but this DVC repository has no default remote to keep "
                           "removed checkpoints in: `dvc remote add -d NAME URL` (a local directory works), "
                           "or set retention.dvc: drop to delete them for good")

    def evict(self, paths: list[Path], push: bool) -> None:
        """Remove committed outputs from the workspace and the local DVC cache (dvc.lock keeps
        their hashes), pushing them to the default remote first when `push`."""
        self._with_repo(lambda repo: _evict(repo, [Path(p).resolve() for p in paths], push),
                        f"removing {', '.join(str(p) for p in paths)}")

    def _with_repo(self, action, what: str, attempts: int = 20):
        """`action(repo)` under dashflow's file lock, waiting while another DVC command holds DVC's."""
        import logging

        from dvc.exceptions import DvcException
        from dvc.lock import LockError
        from dvc.repo import Repo

        logging.getLogger("dvc").setLevel(logging.WARNING)  # not "Updating lock file" after every stage
        (self.root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / ".dvc" / "tmp" / "dashflow-commit.lock"):
            for attempt in range(attempts):
                try:
                    with Repo(str(self.root)) as repo:
                        return action(repo)
                except LockError:
                    time.sleep(min(0.5 * (attempt + 1), 5))  # another DVC command holds the repo lock
                except DvcException as exc:
                    raise DvcError(f"{what} failed: {exc}") from exc
        raise DvcError(f"{what}: the DVC repository {self.root} stayed locked by another command")


def _commit(repo, targets: list[str]) -> None:
    """`dvc commit --force T1 T2 ...` with one write of dvc.lock. Uses the steps of DVC's
    own `Repo.commit` (dvc/repo/commit.py), which writes the lock once per target."""
    from dvc.dvcfile import PROJECT_FILE, load_file
    from dvc.repo import lock_repo

    with lock_repo(repo), _params_read_once():
        # one parse of dvc.yaml and dvc.lock for all targets (collect_granular parses both
        # again for each one: 28 targets, 56 parses, most of a 4-iteration commit's time)
        loader = load_file(repo, repo.fs.join(repo.root_dir, PROJECT_FILE)).stages
        stages = [loader[t] for t in targets]
        _hand_digests(repo, stages)
        for stage in stages:
            # allow_missing: an output the retention setting removed keeps its recorded hash.
            # DVC's run cache records complete stages only, and none whose outputs persist
            # (dvc/stage/cache.py `_can_hash`, which reads every dependency again to find that out)
            stage.save(allow_missing=True, run_cache=all(x.exists for x in stage.deps + stage.outs)
                       and not any(out.persist for out in stage.outs))
            stage.commit(allow_missing=True)
        for target in targets:  # the cache holds the outputs, dvc.lock does not yet
            store.fault_point("mid-dvc-commit", target)
        if stages:
            _write_lock(repo, stages)


def _write_lock(repo, stages) -> None:
    """The stages' entries into dvc.lock: DVC's own steps (dvc/dvcfile.py
    `Lockfile.dump_stages`: to_lockfile per stage, DVC's YAML dumper), with the file read by
    DVC's fast loader instead of its round-trip one. The round trip keeps comments and
    styles, which dvc.lock, written by DVC alone, does not have; it parsed the whole lock
    file again on every commit (a third of a 4-iteration commit's time). A test checks the
    bytes equal those `dump_stages` writes."""
    from dvc.stage.serialize import to_lockfile
    from dvc.utils import relpath
    from dvc.utils.serialize import dump_yaml, load_yaml

    path = repo.fs.join(repo.root_dir, "dvc.lock")
    data = load_yaml(path, fs=repo.fs) if repo.fs.exists(path) else {}
    data.setdefault("schema", "2.0")
    data["stages"] = data.get("stages") or {}
    for stage in stages:
        data["stages"].update(to_lockfile(stage))
    dump_yaml(path, data, fs=repo.fs)
    repo.scm_context.track_file(relpath(path))


@contextmanager
def _params_read_once():
    """Within one commit, each params file is read once per distinct list of keys, not once
    per stage that depends on it: DVC's ParamsDependency parses its file and looks every key
    up again on each save (24 reads of params.yaml in a 4-iteration commit, for 6 distinct
    key lists). A file whose size or mtime changes is read again; every caller gets its own copy."""
    from dvc.dependency import param

    read, found = param.read_param_file, {}

    def read_once(fs, path, key_paths=None, flatten=False, **kwargs):
        info = fs.info(path)
        key = (path, info.get("size"), info.get("mtime"), tuple(key_paths or ()), flatten, repr(sorted(kwargs.items())))
        if key not in found:
            found[key] = read(fs, path, key_paths, flatten, **kwargs)
        return copy.deepcopy(found[key])

    with _PATCH_LOCK:
        param.read_param_file = read_once
        try:
            yield
        finally:
            param.read_param_file = read


def _hand_digests(repo, stages) -> None:
    """Put the md5 dashflow recorded for each file of the stages' outputs and inputs as it
    landed into DVC's state database, keyed by the file's current stat as DVC keys it, so
    `stage.save` finds them there and reads no byte again (one hash per file per write).
    Only files whose stat still matches the one recorded when dashflow hashed them are
    handed over (store.trusted_digests); DVC hashes anything else itself."""
    from dvc_data.hashfile.hash_info import HashInfo

    directories = {Path(x.fs_path) for stage in stages for x in stage.outs + stage.deps}
    items = [(str(path), HashInfo("md5", digest), None)
             for directory in sorted(directories) if directory.is_dir()
             for path, digest in store.trusted_digests(directory, "md5").items()]
    if items:
        repo.state.save_many(items, repo.fs)


def _object_ids(repo, out) -> set[str]:
    """The cache objects of one output: its files' md5s (for a directory, from its .dir object)."""
    import json

    value = out.hash_info.value if out.hash_info else None
    if not value:
        return set()
    if not value.endswith(".dir"):
        return {value}
    listing = Path(repo.cache.local.oid_to_path(value))
    return {entry["md5"] for entry in json.loads(listing.read_text())} if listing.exists() else set()


def _evict(repo, paths: list[Path], push: bool) -> None:
    outs = {Path(out.fs_path): out for stage in repo.index.stages for out in stage.outs}
    missing = [str(p) for p in paths if p not in outs or not outs[p].hash_info]
    if missing:
        raise DvcError(f"{', '.join(missing)}: not recorded in dvc.lock yet; run the flow (it commits each stage) first")
    if push:
        repo.push(targets=[str(p) for p in paths])
    kept = set().union(*(_object_ids(repo, out) for path, out in outs.items() if path not in paths))
    for path in paths:
        doomed = _object_ids(repo, outs[path]) - kept  # objects a kept output shares stay (tokenizer, config)
        store.remove_output(path)
        for oid in doomed:
            Path(repo.cache.local.oid_to_path(oid)).unlink(missing_ok=True)
