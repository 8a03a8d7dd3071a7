"""Params: a run's parameters, loaded from params.yaml with presets and `--set` overrides,
then checked.

Overrides are `dotted.key=value` strings (value parsed as YAML) or a dict of the same.
A key whose first part is `stage@i` (e.g. `filter@2.threshold`) applies to iteration i
of that stage only; `Params.stage(name, i)` returns the stage's slice with it applied.

Beside it, each in a module of its own (and importable from here, as they always were):
the presets (dashflow/core/presets.py), reading a params file and ParamsError
(params_file.py), the schedule and stage references (schedule.py) and the run's on-disk
layout (layout.py).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from dashflow.core import parameters, precision, stage_configs
from dashflow.core.layout import RunLayout
from dashflow.core.params_file import ParamsError, load_yaml, read_params_file
from dashflow.core.presets import PRESETS
from dashflow.core.schedule import (
    STAGES,
    check_schedule,
    iteration_dir,
    make_schedule,
    parse_stage_ref,
    render_schedule,
    stage_sequence,
    stages_from,
    write_schedule,
)

__all__ = [  # the names call sites import from dashflow.core.config
    "MAX_ROWS_PER_ITERATION", "PRESETS", "STAGES", "Params", "ParamsError", "RunLayout", "check_schedule",
    "check_sizes", "iteration_dir", "load_yaml", "make_schedule", "overlay", "parse_stage_ref",
    "read_params_file", "render_schedule", "stage_sequence", "stages_from", "validate", "write_schedule",
]

# rows one iteration may sample: prompts_per_iteration x samples_per_prompt (a typo of a few
# zeros otherwise ends with the kernel killing the process, with no message)
MAX_ROWS_PER_ITERATION = 1_000_000


def check_sizes(tree: dict, source: str) -> None:
    """Sizes that each pass their own check but not together."""
    sample = tree.get("sample") or {}
    rows = int(sample.get("prompts_per_iteration", 1)) * int(sample.get("samples_per_prompt", 1))
    if rows > MAX_ROWS_PER_ITERATION:
        raise ParamsError(f"{source}: sample.prompts_per_iteration x sample.samples_per_prompt = {rows:,} rows per "
                          f"iteration; at most {MAX_ROWS_PER_ITERATION:,} are allowed")
    learn = tree.get("learn") or {}
    cap, low = learn.get("tis_cap", 0), learn.get("tis_min", 0)
    if cap and low > cap:
        raise ParamsError(f"{source}: learn.tis_min = {low} is above learn.tis_cap = {cap}; the correction's bounds "
                          "must satisfy tis_min <= tis_cap")
    if sample.get("dynamic_rounds") and (learn.get("update", "multi") != "multi" or learn.get("mode", "rl") != "rl"):
        raise ParamsError(f"{source}: sample.dynamic_rounds = {sample['dynamic_rounds']} needs learn.update: multi and "
                          f"learn.mode: rl (not {learn.get('update')} / {learn.get('mode')}): the steps of mini and "
                          "per_group depend on how many groups dynamic sampling finds")
    reward = tree.get("reward") or {}
    buffer, new = reward.get("overlong_buffer", 0), sample.get("max_new_tokens", 1)
    if buffer and buffer >= new:
        raise ParamsError(f"{source}: reward.overlong_buffer = {buffer} must be below sample.max_new_tokens = {new} "
                          "(the penalty starts at max_new_tokens - overlong_buffer)")


# ---------------------------------------------------------------- validation
# Every parameter is declared once, in dashflow/core/parameters.py, and checked when params
# are loaded (after presets and overrides, for every `stage@i` slice too): one message
# naming the key, the value and what is allowed, before any stage runs.

def validate(tree: dict, scoped: dict, source: str = "params.yaml") -> None:
    """Check every declared key present in the tree and in each `stage@i` slice."""
    slices = [("", tree)] + [(name, {name.split("@")[0]: values}) for name, values in scoped.items()]
    for prefix, node in slices:
        for key, param in parameters.BY_KEY.items():
            ok, allowed = param.allowed
            section, _, name = key.partition(".")
            values = node.get(section)
            if not isinstance(values, Mapping) or name not in values:
                continue
            value = values[name]
            if not ok(value):
                shown = f"{prefix}.{name}" if prefix else key
                hint = (" (a quoted number is a string; write numbers unquoted)" if isinstance(value, str)
                        and _looks_numeric(value) else "")
                raise ParamsError(f"{source}: {shown} = {value!r} is not allowed: expected {allowed}{hint}")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _reschedule(tree: dict, key: str, value: Any) -> dict:
    """`run.iterations=N` keeps the evaluations that still exist and adds the last;
    `evaluate.every=K` evaluates the base, every K-th and the last iteration."""
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ParamsError(f"override {key}={value!r}: expected an integer") from None
    current = tree.get("schedule") or {}
    n = len(current.get("iterations") or [])
    if key == "run.iterations":
        keep = [e["i"] for e in (current.get("evaluate") or {}).values() if e["i"] < n - 1]
        return make_schedule(value, keep=keep)
    return make_schedule(n, every=value)


# ---------------------------------------------------------------- overrides and overlay files

def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ParamsError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    return key.strip(), load_yaml(raw)


def _set_dotted(tree: dict, key: str, value: Any, known: Mapping | None) -> None:
    parts = key.split(".")
    node = tree
    ref = known
    for i, part in enumerate(parts[:-1]):
        if ref is not None:
            if not isinstance(ref, Mapping) or part not in ref:
                raise ParamsError(f"unknown parameter {'.'.join(parts[: i + 1])!r} in override {key!r}")
            ref = ref[part]
        node = node.setdefault(part, {})
    if ref is not None and (not isinstance(ref, Mapping) or parts[-1] not in ref):
        raise ParamsError(f"unknown parameter {key!r}; see params.yaml for the names")
    node[parts[-1]] = value


def _extended(path: Path, tree: dict) -> tuple[dict, list[tuple[str, Any]]]:
    """A parameter file that starts `extends: params.yaml` is that file with this one's
    values as overrides (section.key = value, so `run.iterations` and `evaluate.every`
    rewrite the schedule as on the command line); unknown keys are refused by name."""
    parent = (path.parent / str(tree["extends"])).resolve()
    if not parent.is_file():
        raise ParamsError(f"{path}: extends {tree['extends']!r}, which is not a file ({parent})")
    base = load_yaml(parent.read_text()) or {}
    if "extends" in base:
        raise ParamsError(f"{path}: extends {parent}, which extends another file: one level only")
    items = []
    for section, values in tree.items():
        if section == "extends":
            continue
        if section not in base or not isinstance(values, Mapping):
            raise ParamsError(f"{path}: unknown section {section!r} (or not a mapping); the sections are those of {parent}")
        items += [(f"{section}.{key}", value) for key, value in values.items()]
    return base, items


def _items(overrides: Iterable[str] | Mapping | None) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    return [o if isinstance(o, tuple) else _parse_override(o) for o in overrides]


def overlay(path: str | Path) -> dict[str, Any]:
    """The dotted overrides an overlay file (one that starts `extends: ...`) sets, in its order:
    `Params.load(its parent, overlay(path))` is `Params.load(path)`. The tests and the
    benchmarks' `--tiny` read their tiny configuration, params/tiny.yaml, with it."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"parameter file {path} not found")
    tree = read_params_file(path)
    if "extends" not in tree:
        raise ParamsError(f"{path}: not an overlay (it does not start `extends: params.yaml`)")
    return dict(_extended(path, tree)[1])


@dataclass
class Params:
    """All parameters of a run: the YAML tree plus per-iteration stage overrides."""

    tree: dict
    scoped: dict  # {"filter@2": {"threshold": 0.2}}

    @classmethod
    def load(cls, path: str | Path = "params.yaml", overrides: Iterable[str] | Mapping | None = None) -> Params:
        path = Path(path)
        if not path.exists():
            raise ParamsError(f"parameter file {path} not found (run from the project directory or pass --params)")
        tree = read_params_file(path)
        unknown = parameters.unknown_keys(tree) if isinstance(tree, Mapping) and "extends" not in tree else []
        if unknown:
            raise ParamsError(f"{path}: unknown parameter {unknown[0]!r}; the parameters are listed in "
                              "docs/parameters.md (dashflow/core/parameters.py)")
        if "extends" in tree:
            tree, overlaid = _extended(path, tree)
            overrides = overlaid + _items(overrides)
        items = _items(overrides)
        preset = dict(items).get("run.preset", (tree.get("run") or {}).get("preset"))
        base = cls(tree, {})
        if preset:
            if preset not in PRESETS:
                raise ParamsError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
            base = base.with_overrides(PRESETS[preset])
        params = base.with_overrides(items)
        check_schedule(params.tree, str(path))
        validate(params.tree, params.scoped, str(path) if not items else f"{path} with overrides")
        check_sizes(params.tree, str(path) if not items else f"{path} with overrides")
        precision.resolve(params.tree, params.scoped)  # `auto` -> this machine's faster dtype
        return params

    def with_overrides(self, overrides: Iterable[str] | Mapping | None) -> Params:
        tree, scoped = copy.deepcopy(self.tree), copy.deepcopy(self.scoped)
        if overrides is None:
            return Params(tree, scoped)
        for key, value in _items(overrides):
            if key in ("run.iterations", "evaluate.every"):  # rewrite the schedule (its single source)
                tree["schedule"] = _reschedule(tree, key, value)
                continue
            head, _, rest = key.partition(".")
            if "@" in head:
                stage, _, it = head.partition("@")
                if stage not in tree or not it.isdigit() or not rest:
                    raise ParamsError(f"scoped override {key!r} must look like stage@ITERATION.key")
                _set_dotted(scoped.setdefault(f"{stage}@{int(it)}", {}), rest, value, tree[stage])
            else:
                _set_dotted(tree, key, value, self.tree)
        return Params(tree, scoped)

    @property
    def iterations(self) -> int:
        return len(self.tree["schedule"]["iterations"])

    def evaluated(self, iteration: int) -> bool:
        """Whether the schedule evaluates the policy of `iteration` (-1 = base)."""
        return any(e["i"] == iteration for e in (self.tree["schedule"].get("evaluate") or {}).values())

    def __getitem__(self, section: str) -> dict:
        return self.tree[section]

    def needs_reference(self, iteration: int) -> bool:
        """Whether learn@iteration has a KL term, i.e. reads the reference policy's log-probs."""
        cfg = self.stage("learn", iteration)
        return cfg["mode"] == "rl" and float(cfg["kl_coef"]) > 0

    def stage(self, name: str, iteration: int | None = None) -> stage_configs.StageConfig | dict:
        """The section's parameters with `name@iteration` overrides applied, as its typed config
        (`params.stage("learn", i)` is a LearnConfig: dashflow/core/stage_configs.py)."""
        out = copy.deepcopy(self.tree.get(name, {}))
        if iteration is not None:
            for key, value in self.scoped.get(f"{name}@{iteration}", {}).items():
                out[key] = value
        return stage_configs.make(name, out)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.tree["run"]["root"]) / self.tree["run"]["name"])

    def to_json(self) -> str:
        return json.dumps({"tree": self.tree, "scoped": self.scoped}, sort_keys=True)
