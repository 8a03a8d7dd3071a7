"""Benchmark: how the prompt format moves the base model's strict and flexible accuracy.

    python bench/prompt_format.py                    # the default task's held-out prompts, 64 new tokens
    python bench/prompt_format.py --samples 0        # greedy only (faster)
    python bench/prompt_format.py --tiny             # seconds; what CI runs

Each format is `prepare` + `evaluate@base` of a fresh run on `params.yaml` with the format's
overrides (`task.system`, `task.fewshot`, `task.demonstrations`): greedy and `--samples`
completions per prompt at sample.temperature, each checked strict (the DASH paper's: a
\\boxed{} in the last 4 lines) and flexible. "boxed" = a box in the last 4 lines at all.
"""

from __future__ import annotations

from pathlib import Path

import typer
from _common import ROOT, TINY, emit, scratch

SYSTEM = "Put the final answer in \\boxed{}."
EXAMPLE = [{"question": "What is 2 + 3? Put the final answer in \\boxed{}.",
            "answer": "2 + 3 = 5.\nThe final answer is \\boxed{5}."}]
FORMATS = {
    "instruction only": {"task.fewshot": 0},
    "+ a system prompt asking for \\boxed{}": {"task.fewshot": 0, "task.system": SYSTEM},
    "one drawn train example as a prior turn (default)": {"task.fewshot": 1},
    "system prompt + one drawn example": {"task.fewshot": 1, "task.system": SYSTEM},
    "the fixed example 2 + 3 as a prior turn": {"task.demonstrations": EXAMPLE},
}


def main(
    samples: int = typer.Option(4, help="sampled completions per prompt (0: greedy only)"),
    formats: str | None = typer.Option(None, help="comma-separated indices into the format list (default: all)"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="extra override key=value"),
    tiny: bool = typer.Option(False),
    out: Path = typer.Option(Path("bench/results/prompt_format.json")),
):
    from dashflow.core.config import Params, _parse_override
    from dashflow.tasks import evaluate, prepare

    base = dict(TINY) if tiny else {}
    base.update({"evaluate.samples": samples, **dict(_parse_override(s) for s in set_ or [])})
    chosen = list(FORMATS.items())
    if formats:
        chosen = [chosen[int(k)] for k in formats.split(",")]
    rows = []
    with scratch("prompt-format") as root:
        for k, (name, overrides) in enumerate(chosen):
            params = Params.load(ROOT / "params.yaml", dict(base, **overrides, **{"run.root": str(root),
                                                                               "run.name": f"f{k}"}))
            prepare.run(params)
            s = evaluate.run(params, -1).stats
            n = s["samples"]
            pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"
            rows.append([name, pct(1 - s["greedy_strict_none"]), pct(s["greedy_strict"]), pct(s["greedy_flexible"]),
                         pct(1 - s["sampled_strict_none"]) if n else "-", pct(s.get(f"mean@{n}_strict")) if n else "-",
                         pct(s.get(f"mean@{n}_flexible")) if n else "-", round(s["greedy_mean_tokens"], 1)])
    emit(f"Base model accuracy by prompt format ({rows and s['prompts']} held-out prompts, {samples} samples)",
         ["prompt", "greedy: boxed in last 4 lines", "greedy strict", "greedy flexible", f"T x{samples}: boxed",
          f"mean@{samples} strict", f"mean@{samples} flexible", "greedy tokens"], rows, out, overrides=base)


if __name__ == "__main__":
    typer.run(main)
