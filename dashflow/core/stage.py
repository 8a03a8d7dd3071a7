"""What a stage declares once: the parameters its cache key hashes and the code it runs.

Each stage module (tasks/*.py) holds one `Stage` (two for prepare: its prompts and its
base policy). The stage key is built from exactly these parameters (`key_params`) and the
source of exactly these modules (`code_digest`), and dvc.yaml's `params` and `deps` are
written from the same declarations (`dashflow dvc-yaml`), so DVC and the flow cannot
disagree about what makes a stage stale.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from dashflow.core import parameters, store
from dashflow.core.config import Params, ParamsError


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
