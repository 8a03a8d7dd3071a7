"""What a stage declares once: its name, the parameters its cache key hashes and the code it runs.

Each stage module (tasks/*.py) holds one `Stage` (two for prepare: its prompts and its
base policy). The stage key is built from exactly these parameters (`key_params`) and the
source of exactly these modules (`code_digest`), and dvc.yaml's `params` and `deps` are
written from the same declarations (`dashflow dvc-yaml`), so DVC and the flow cannot
disagree about what makes a stage stale. Running the stage is one call, `run` (its output
directory, key and manifest through dashflow/core/store), and its Prefect task is `task`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from dashflow.core import parameters, store
from dashflow.core.config import Params, ParamsError
from dashflow.core.prefect_task import stage_task


@dataclass(frozen=True)
class Stage:
    name: str                       # the stage's name in manifests and dvc.yaml
    module: str                     # the stage module (its own source is part of the code version)
    params: tuple[str, ...]         # dotted parameter keys: the stage key hashes these, dvc.yaml lists them
    code: tuple[ModuleType, ...]    # library modules the stage runs (dvc.yaml deps, the code version)

    def __post_init__(self) -> None:
        unknown = [k for k in self.params if k not in parameters.BY_KEY]
        if unknown:
            raise ParamsError(f"stage {self.name} declares unknown parameters {unknown}")

    def key_params(self, params: Params, iteration: int | None = None, **derived: Any) -> dict[str, Any]:
        """{key: value} of the declared parameters for `iteration` (its `stage@i` overrides
        applied), plus values derived from them (named `derived.<name>`: a resolved default)."""
        out: dict[str, Any] = {}
        for key in self.params:
            section, _, name = key.partition(".")
            out[key] = params.stage(section, iteration).get(name)
        out.update({f"derived.{k}": v for k, v in derived.items()})
        return out

    def modules(self, *extra: ModuleType) -> list[ModuleType]:
        return [sys.modules[self.module], *self.code, *extra]

    def code_digest(self, *extra: ModuleType) -> str:
        """The code version: the package version and the source of the stage and its modules
        (`extra`: a user's own task or reward modules)."""
        return store.code_digest(*self.modules(*extra))

    def code_paths(self, root: Path) -> list[str]:
        """The declared modules' files relative to `root` (dvc.yaml's code deps)."""
        return [Path(m.__file__).resolve().relative_to(Path(root).resolve()).as_posix() for m in self.modules()]

    def label(self, iteration: int | None) -> str:
        """How messages name this stage of `iteration`: `sample@3`, `evaluate@base` (-1), `prepare` (None)."""
        if iteration is None:
            return self.name
        return f"{self.name}@{iteration}" if iteration >= 0 else f"{self.name}@base"

    def config(self, params: Params, iteration: int | None = None) -> dict:
        """This stage's section of the parameters for `iteration` (its `stage@i` overrides applied)."""
        return params.stage(self.name, iteration)

    def run(self, params: Params, iteration: int | None, *, inputs: dict[str, Path], build: Callable[[Path], dict],
            force: bool = False, out: Path | None = None, derived: dict[str, Any] | None = None,
            extra_code: tuple[ModuleType, ...] = (), **landing: Any) -> store.Manifest:
        """Run the stage through the store (store.run_stage): skipped when the output's manifest
        records this key and its files verify, else `build(tmp)` writes it and it lands
        atomically. The key hashes `inputs`' digests, the declared parameters (plus `derived`
        values) and the declared code (plus `extra_code`: a user's own modules). `out`: the
        output directory where it is not the layout's for this stage; `landing`: run_stage's
        other options (side, extra_inputs)."""
        out = params.layout.stage_dir(self.name, iteration) if out is None else out
        return store.run_stage(self.name, iteration, out, inputs=inputs,
                               params=self.key_params(params, iteration, **(derived or {})),
                               code=self.code_digest(*extra_code), build=build, force=force, **landing)

    def task(self, run: Callable[..., store.Manifest]):
        """The stage's Prefect task `name[iter=I]` around `run(params, iteration, force=...)`."""
        return stage_task(run, self.name)
