"""The on-disk layout of a run: where every stage of it writes (one run = one directory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dashflow.core.params_file import ParamsError
from dashflow.core.schedule import STAGES, iteration_dir


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
