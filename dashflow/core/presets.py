"""The DASH paper's arms, selectable with `run.preset` (or `--preset`): declared once, here.

Each preset is a name, one line saying what it is and the dotted overrides it sets. Every
other description follows this one: params.yaml's `run.preset` comment and
docs/parameters.md (dashflow/core/parameters.py lists the names and lines from here), the
`--preset` help of the command line, and the tables in README.md ("Presets") and
docs/presets.md (`summary_table()` / `markdown()`, the latter from the values themselves;
tests/test_parameters.py checks both are current).

A preset sets every knob its arm is about, on top of params.yaml; `--set` overrides still
win over it. Every arm is what the authors' code (shuoli90/efficient_reasoning, a fork of
TRL 0.16's GRPOTrainer; scripts/run_grpo.sh) runs: G completions per prompt with a
std-normalised group advantage (epsilon 1e-4), ONE on-policy optimizer step per sampled
batch (ratio 1: their 256 completions per step = 4 per device x 2 GPUs x 32 accumulation
steps), the Dr.GRPO constant normaliser (`loss_type dr_grpo`: completion tokens /
(sequences x max new tokens)), the k3 KL at beta 0.04, bf16 autocast over float32 master
weights, temperature 0.9 and top_k 50. The arms differ in exactly what the paper varies: how
many groups one generation call samples (grpo: one; the others: the whole batch), the
gradient filter (dash: |A| > 0.1), the KL term (dash-nokl) and the number of updates per
batch (multi, mini). The batch size itself (`sample.prompts_per_iteration` x G) is the scale
of a run, not an arm: the default config is sized for a CPU, params/paper.yaml for the paper.
"""

from __future__ import annotations

from typing import Any

_ARM = {"sample.batching": "packed", "sample.temperature": 0.9, "sample.top_k": 50, "sample.top_p": 1.0,
        "advantage.estimator": "grpo", "advantage.epsilon": 1.0e-4,
        "filter.enabled": True, "filter.threshold": 0.1,
        "learn.mode": "rl", "learn.update": "multi", "learn.steps": 1, "learn.loss_agg": "constant",
        "learn.kl_coef": 0.04, "learn.kl_estimator": "k3", "learn.tis_cap": 0, "learn.precision": "bf16-mixed",
        # the paper's code (TRL 0.16 GRPO): PPO's token ratio, no length shaping, truncated rows trained on
        "learn.objective": "ppo", "reward.overlong_buffer": 0, "filter.drop_truncated": False,
        "sample.dynamic_rounds": 0}

# (name, what it is in one line, its overrides), in the order they are listed everywhere
_DECLARED: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("grpo", "standard GRPO: one prompt group per generation call, no filter",
     {**_ARM, "sample.batching": "per_group", "filter.enabled": False}),
    ("preemptive", "preemptive sampling alone: the whole batch in large generation calls, no filter",
     {**_ARM, "filter.enabled": False}),
    ("dash", "DASH: preemptive sampling + gradient filter |A| > 0.1",
     dict(_ARM)),
    ("dash-nokl", "DASH without the KL term (the paper's best arm)",
     {**_ARM, "learn.kl_coef": 0.0}),
    ("multi", "DASH with K = 3 PPO-style updates per sampled batch, each a pass over the whole batch",
     {**_ARM, "learn.update": "multi", "learn.steps": 3}),
    ("mini", "DASH with K = 3 PPO-style updates per sampled batch, each on a mini-batch of whole groups",
     {**_ARM, "learn.update": "mini", "learn.steps": 3}),
    # the paper's code experiments filter with |A| > 0.01 (math: 0.1); the task: docs/tasks.md
    ("dash-code", "DASH on the built-in code task (pyfunc, tests run in the sandbox), filter |A| > 0.01",
     {**_ARM, "filter.threshold": 0.01, "task.kind": "pyfunc", "task.num_train": 192, "task.num_eval": 64,
      "sample.max_new_tokens": 96, "evaluate.max_new_tokens": 96}),
    ("sft", "supervised fine-tuning on the dataset's reference solutions (the paper's SFT-H)",
     {**_ARM, "learn.mode": "sft", "learn.kl_coef": 0.0}),
)

PRESETS: dict[str, dict[str, Any]] = {name: values for name, _, values in _DECLARED}
SUMMARIES: dict[str, str] = {name: summary for name, summary, _ in _DECLARED}


def listing(indent: str = "  ") -> list[str]:
    """One line per preset, `name  what it is`, names aligned (params.yaml's comment)."""
    width = max(map(len, PRESETS)) + 2
    return [f"{indent}{name.ljust(width)}{SUMMARIES[name]}" for name in PRESETS]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def summary_table() -> str:
    """README.md's table: each preset and what it is."""
    rows = [f"| `{name}` | {_cell(SUMMARIES[name])} |" for name in PRESETS]
    return "\n".join(["| preset | what it is |", "|---|---|", *rows]) + "\n"


def _steps(values: dict) -> str:
    if values["learn.mode"] == "sft":
        return "1, cross-entropy on reference solutions"
    k = values["learn.steps"]
    if k == 1:
        return "1, on-policy"
    return {"multi": f"K = {k} passes over the batch (PPO-clipped)",
            "mini": f"K = {k} mini-batches of whole groups",
            "per_group": "one per prompt group"}[values["learn.update"]]


def markdown() -> str:
    """docs/presets.md's table: what each preset sets of the knobs the arms differ in."""
    rows = []
    for name, values in PRESETS.items():
        call = ("one prompt group (G sequences) per call" if values["sample.batching"] == "per_group"
                else "the whole batch, token-budgeted calls")
        if values.get("task.kind"):
            call += f", on the task `{values['task.kind']}` ({values['sample.max_new_tokens']} new tokens)"
        kept = ("–" if values["learn.mode"] == "sft" else f"|A| > {values['filter.threshold']}"
                if values["filter.enabled"] else "off (every row)")
        kl = values["learn.kl_coef"] if values["learn.mode"] == "rl" else 0
        cells = [f"`{name}`", call, kept, _steps(values), f"{kl:g}"]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    head = ["| preset | generation call (`sample.batching`) | filter | optimizer steps per sampled batch | KL β |",
            "|---|---|---|---|---|"]
    return "\n".join(head + rows) + "\n"
