"""params.yaml loading, `--set` overrides and the on-disk layout of a run.

Overrides are `dotted.key=value` strings (value parsed as YAML) or a dict of the same.
A key whose first part is `stage@i` (e.g. `filter@2.threshold`) applies to iteration i
of that stage only; `Params.stage(name, i)` returns the stage's slice with it applied.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from dashflow.core import parameters, precision

STAGES = ("prepare", "sample", "reward", "advantage", "filter", "reference", "learn", "evaluate")

# The DASH paper's arms, selectable with `run.preset` (or `--preset`). A preset sets every
# knob its arm is about, on top of params.yaml; `--set` overrides still win over it.
# Every arm is what the authors' code (shuoli90/efficient_reasoning, a fork of TRL 0.16's
# GRPOTrainer; scripts/run_grpo.sh) runs: G completions per prompt with a std-normalised
# group advantage (epsilon 1e-4), ONE on-policy optimizer step per sampled batch (ratio 1:
# their 256 completions per step = 4 per device x 2 GPUs x 32 accumulation steps), the
# Dr.GRPO constant normaliser (`loss_type dr_grpo`: completion tokens / (sequences x max new
# tokens)), the k3 KL at beta 0.04, bf16 autocast over float32 master weights, temperature
# 0.9 and top_k 50. The arms differ in exactly what the paper varies: how many groups one
# generation call samples (grpo: one; the others: the whole batch), the gradient filter
# (dash: |A| > 0.1), the KL term (dash-nokl) and the number of updates per batch (multi,
# mini). The batch size itself (`sample.prompts_per_iteration` x G) is the scale of a run,
# not an arm: the default config is sized for a CPU, params/paper.yaml for the paper.
_ARM = {"sample.batching": "packed", "sample.temperature": 0.9, "sample.top_k": 50, "sample.top_p": 1.0,
        "advantage.estimator": "grpo", "advantage.epsilon": 1.0e-4,
        "filter.enabled": True, "filter.threshold": 0.1,
        "learn.mode": "rl", "learn.update": "multi", "learn.steps": 1, "learn.loss_agg": "constant",
        "learn.kl_coef": 0.04, "learn.kl_estimator": "k3", "learn.tis_cap": 0, "learn.precision": "bf16-mixed",
        # the paper's code (TRL 0.16 GRPO): PPO's token ratio, no length shaping, truncated rows trained on
        "learn.objective": "ppo", "reward.overlong_buffer": 0, "filter.drop_truncated": False,
        "sample.dynamic_rounds": 0}
PRESETS: dict[str, dict] = {
    # standard GRPO: one prompt group per generation call, one on-policy step over the whole batch, KL, no filter
    "grpo": {**_ARM, "sample.batching": "per_group", "filter.enabled": False},
    # preemptive sampling alone: the whole batch in large generation calls, otherwise GRPO
    "preemptive": {**_ARM, "filter.enabled": False},
    # DASH: preemptive sampling + gradient filtering (|A| > 0.1), with the paper's KL term
    "dash": dict(_ARM),
    # DASH without KL (the paper's best arm)
    "dash-nokl": {**_ARM, "learn.kl_coef": 0.0},
    # PPO-style off-policy updates on each sampled batch: K = 3 passes / K = 3 mini-batches
    "multi": {**_ARM, "learn.update": "multi", "learn.steps": 3},
    "mini": {**_ARM, "learn.update": "mini", "learn.steps": 3},
    # DASH on code (the paper's code experiments filter with |A| > 0.01; math: 0.1): the
    # built-in synthetic code task, rewarded by its tests in the sandbox (docs/tasks.md)
    "dash-code": {**_ARM, "filter.threshold": 0.01, "task.kind": "pyfunc", "task.num_train": 192, "task.num_eval": 64,
                  "sample.max_new_tokens": 96, "evaluate.max_new_tokens": 96},
    # SFT on the dataset's reference solutions (the paper's SFT-H), same prompts and micro-batching
    "sft": {**_ARM, "learn.mode": "sft", "learn.kl_coef": 0.0},
}


# The tiny configuration: every stage on the real model in seconds (tests, `bench/ --tiny`).
TINY = {
    "run.iterations": 2,     # (rewrites the schedule: 2 iterations, evaluated: base and the last)
    "sample.backend": "hf",  # the hf sampler in-process; tests/test_vllm.py runs the vLLM engine
    "task.num_train": 24,
    "task.num_eval": 4,
    "sample.prompts_per_iteration": 4,
    "sample.samples_per_prompt": 3,
    "sample.max_new_tokens": 12,
    "sample.groups_per_shard": 2,
    "sample.temperature": 1.0,
    "filter.threshold": 0.1,
    "learn.micro_batch_tokens": 256,
    "evaluate.num_prompts": 4,
    "evaluate.max_new_tokens": 12,
    "evaluate.samples": 2,
}


class ParamsError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers: `2e-5` and `1E3` are floats (YAML 1.1, which PyYAML
    follows, needs a dot -- `2.0e-5` -- and reads `2e-5` as the string "2e-5")."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse params YAML (a file or a `--set` value) with `_Loader`."""
    return yaml.load(text, Loader=_Loader)


# rows one iteration may sample: prompts_per_iteration x samples_per_prompt (a typo of a few
# zeros otherwise ends with the kernel killing the process, with no message)
MAX_ROWS_PER_ITERATION = 1_000_000


def read_params_file(path: Path) -> dict:
    """A params file's tree; what is not one is refused naming the file and the place."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ParamsError(f"{path}: not UTF-8 text (line {line}, byte {exc.start} of the file)") from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise ParamsError(f"{path}: a NUL byte on line {line}; a params file is YAML text")
    try:
        tree = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{path}: not valid YAML{where}: {problem}") from None
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise ParamsError(f"{path}: the top level must be a mapping of sections (run:, sample:, learn:, ...), "
                          f"not a {type(tree).__name__}")
    return dict(tree)


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


# ---------------------------------------------------------------- the schedule
# `schedule:` in params.yaml is the one source of truth for how many iterations a run has
# and which policies are evaluated; the flow and dvc.yaml (`foreach`) both read it.

def iteration_dir(i: int) -> str:
    return "base" if i < 0 else f"iter-{i:04d}"


def make_schedule(iterations: int, every: int = 0, keep: Iterable[int] = ()) -> dict:
    """The `schedule` section for `iterations` iterations. Evaluated: the base policy, every
    `every`-th iteration, the last, and the iterations in `keep` that still exist."""
    if iterations < 1:
        raise ParamsError(f"a run needs at least 1 iteration, not {iterations}")
    items = [{"i": i, "dir": iteration_dir(i), "policy": f"{iteration_dir(i - 1)}/policy"} for i in range(iterations)]
    due = {-1, iterations - 1} | {i for i in keep if -1 <= i < iterations}
    if every > 0:
        due |= {i for i in range(iterations) if (i + 1) % every == 0}
    evaluate = {("base" if i < 0 else str(i)): {"i": i, "dir": iteration_dir(i)} for i in sorted(due)}
    return {"iterations": items, "evaluate": evaluate}


def check_schedule(tree: dict, source: str = "params.yaml") -> None:
    """Every schedule item must be the one `make_schedule` writes: dvc.yaml builds its stage
    paths from these strings, so a hand edit that disagrees would split DVC from the flow."""
    fix = "rewrite it with `dashflow schedule N --every K`"
    sched = tree.get("schedule")
    if not isinstance(sched, Mapping) or not isinstance(sched.get("iterations"), list) or not sched["iterations"]:
        raise ParamsError(f"{source}: `schedule.iterations` must list the run's iterations; {fix}")
    n = len(sched["iterations"])
    expected = make_schedule(n)["iterations"]
    for k, (item, want) in enumerate(zip(sched["iterations"], expected)):
        if item != want:
            raise ParamsError(f"{source}: schedule.iterations[{k}] is {item}, expected {want}; {fix}")
    for name, item in (sched.get("evaluate") or {}).items():
        i = item.get("i") if isinstance(item, Mapping) else None
        want_name = "base" if i == -1 else str(i)
        if not isinstance(i, int) or not -1 <= i < n or str(name) != want_name or item != {"i": i, "dir": iteration_dir(i)}:
            raise ParamsError(f"{source}: schedule.evaluate.{name} is {item}; entries look like "
                              f"'3': {{i: 3, dir: iter-0003}} for an iteration below {n}; {fix}")


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


@dataclass
class Params:
    """All parameters of a run: the YAML tree plus per-iteration stage overrides."""

    tree: dict
    scoped: dict  # {"filter@2": {"threshold": 0.2}}

    @classmethod
    def load(cls, path: str | Path = "params.yaml", overrides: Iterable[str] | Mapping | None = None) -> "Params":
        path = Path(path)
        if not path.exists():
            raise ParamsError(f"parameter file {path} not found (run from the project directory or pass --params)")
        tree = read_params_file(path)
        unknown = parameters.unknown_keys(tree) if isinstance(tree, Mapping) and "extends" not in tree else []
        if unknown:
            raise ParamsError(f"{path}: unknown parameter {unknown[0]!r}; the parameters are listed in "
                              "docs/parameters.md (dashflow/core/parameters.py)")
        if "extends" in tree:
            tree, overlay = _extended(path, tree)
            overrides = overlay + _items(overrides)
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

    def with_overrides(self, overrides: Iterable[str] | Mapping | None) -> "Params":
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

    def stage(self, name: str, iteration: int | None = None) -> dict:
        """The stage's parameter slice, with `name@iteration` overrides applied."""
        out = copy.deepcopy(self.tree.get(name, {}))
        if iteration is not None:
            for key, value in self.scoped.get(f"{name}@{iteration}", {}).items():
                out[key] = value
        return out

    @property
    def layout(self) -> "RunLayout":
        return RunLayout(Path(self.tree["run"]["root"]) / self.tree["run"]["name"])

    def to_json(self) -> str:
        return json.dumps({"tree": self.tree, "scoped": self.scoped}, sort_keys=True)


@dataclass(frozen=True)
class RunLayout:
    """Where every stage of a run writes. One run = one directory."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def prompts_train(self) -> Path:
        return self.base / "prompts_train"

    @property
    def prompts_eval(self) -> Path:
        return self.base / "prompts_eval"

    def iteration(self, i: int) -> Path:
        return self.root / iteration_dir(i)

    def policy(self, i: int) -> Path:
        """The policy after iteration i; i = -1 is the starting checkpoint."""
        return self.base / "policy" if i < 0 else self.iteration(i) / "policy"

    def optimizer(self, i: int) -> Path | None:
        """The optimizer state after iteration i (learn@i's second output); None before the first."""
        return None if i < 0 else self.iteration(i) / "optimizer"

    def eval(self, i: int) -> Path:
        return self.base / "eval" if i < 0 else self.iteration(i) / "eval"

    def stage_dir(self, stage: str, i: int) -> Path:
        names = {"sample": "rollouts", "reward": "rewarded", "advantage": "advantaged", "filter": "kept",
                 "reference": "reference"}
        if stage in names:
            return self.iteration(i) / names[stage]
        if stage == "learn":
            return self.policy(i)
        if stage == "evaluate":
            return self.eval(i)
        raise ParamsError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")

    def metrics(self, i: int) -> Path:
        return self.iteration(i) / "metrics.json"

    def eval_json(self, i: int) -> Path:
        """The accuracies of evaluation i (-1 = base), beside its eval/ directory (a DVC metric)."""
        return self.eval(i).parent / "eval.json"


def parse_stage_ref(ref: str) -> tuple[str, int | None]:
    """`filter@2` -> ("filter", 2); `prepare` -> ("prepare", None); `evaluate@base` -> ("evaluate", -1)."""
    if ref == "prepare":
        return "prepare", None
    stage, sep, it = ref.partition("@")
    it = "-1" if it == "base" else it
    if not sep or not it.lstrip("-").isdigit() or stage not in STAGES:
        raise ParamsError(f"stage reference {ref!r} must look like STAGE@ITERATION with STAGE in {STAGES}")
    return stage, int(it)


def stage_sequence(iterations: int) -> list[tuple[str, int | None]]:
    """Every stage of a run in execution order (reference and evaluate listed even where
    they do not run; forcing a stage that does not run does nothing)."""
    seq: list[tuple[str, int | None]] = [("prepare", None), ("evaluate", -1)]
    for i in range(iterations):
        seq += [(s, i) for s in STAGES if s != "prepare"]
    return seq


def stages_from(ref: str, iterations: int) -> set[tuple[str, int | None]]:
    """`from_stage`: the named stage and every stage after it (`reward@2` -> reward@2,
    advantage@2, ..., learn@2, evaluate@2, sample@3, ...)."""
    start = parse_stage_ref(ref)
    seq = stage_sequence(iterations)
    if start not in seq:
        raise ParamsError(f"from_stage {ref!r} is not a stage of this run ({iterations} iterations)")
    return set(seq[seq.index(start):])



SCHEDULE_HEADER = """\
# The schedule: the one source of truth for how many iterations a run has. The flow runs
# exactly these iterations and dvc.yaml makes its stages from them (`foreach`), so the two
# never disagree. Iteration i samples with `policy` (the policy written by iteration i-1).
# `evaluate` lists the policies evaluated on the held-out prompts (stage evaluate@NAME).
# Rewrite this section with `dashflow schedule N --every K`; `dvc repro` then runs only
# the new stages. `--iterations N` / `--set run.iterations=N` change it for one run.
"""


def render_schedule(schedule: dict) -> str:
    lines = [SCHEDULE_HEADER.rstrip("\n"), "schedule:", "  iterations:"]
    lines += [f"    - {{i: {it['i']}, dir: {it['dir']}, policy: {it['policy']}}}" for it in schedule["iterations"]]
    lines.append("  evaluate:")
    lines += [f"    {name if name == 'base' else repr(str(name))}: {{i: {e['i']}, dir: {e['dir']}}}"
              for name, e in schedule["evaluate"].items()]
    return "\n".join(lines) + "\n"


def write_schedule(path: str | Path, schedule: dict) -> None:
    """Replace the `schedule:` section of a params file (and its comment header), keeping
    every other line and comment as it is; append it where the file has none."""
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True)
    start = next((k for k, line in enumerate(lines) if line.startswith("schedule:")), None)
    if start is None:
        text = "".join(lines).rstrip("\n") + "\n\n" + render_schedule(schedule)
    else:
        end = next((k for k in range(start + 1, len(lines)) if lines[k].strip() and not lines[k][0].isspace()
                    and not lines[k].startswith("#")), len(lines))
        header = start
        while header > 0 and lines[header - 1].startswith("#"):
            header -= 1
        text = "".join(lines[:header]) + render_schedule(schedule) + "\n" + "".join(lines[end:]).lstrip("\n")
    tree = yaml.safe_load(text)
    check_schedule(tree, str(path))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(path)
