"""Typed stage configs: one frozen dataclass per params.yaml section, generated from the declarations.

`Params.stage("learn", i)` returns a `LearnConfig`: one field per declared `learn.*`
parameter (dashflow/core/parameters.py holds the declarations, their defaults and what each
allows), with `learn@i` overrides applied, so a stage reads `cfg.lr` -- a float even where
the YAML wrote `1` -- instead of `float(cfg["lr"])`. A field's type follows from its
declaration: the default's type, widened to `float` where the check allows 1.5, and
`| None` where it allows null. The classes are made from the declarations when this module
is imported, so they cannot drift from them.

A config is also a read-only Mapping of the same names (`cfg["lr"]`, `cfg.get(...)`,
`dict(cfg)`), which the modules not yet moved to attributes still use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from dashflow.core import parameters


class StageConfig(Mapping):
    """Base of the generated configs: attribute access, plus the read-only Mapping protocol."""

    section: str = ""

    def __getitem__(self, name: str) -> Any:
        if name not in self.__dataclass_fields__:
            raise KeyError(f"{self.section}.{name}")
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)

    def replace(self, **changes: Any) -> StageConfig:
        """A copy with some fields changed (a resolved default: `cfg.replace(sets=...)`)."""
        return dataclasses.replace(self, **changes)


def _accepts(param: parameters.Param, value: Any) -> bool:
    try:
        return bool(param.allowed[0](value))
    except Exception:  # noqa: BLE001 -- a check that cannot take this value does not allow it
        return False


def field_type(param: parameters.Param) -> Any:
    """The Python type of the parameter's values, from its default and its check."""
    default = param.default
    if _accepts(param, object()):  # checked where it is read (a mapping of its own, `all` or N): untyped here
        return Any
    if isinstance(default, bool):
        kind: Any = bool
    elif isinstance(default, (int, float)):
        kind = float if isinstance(default, float) or _accepts(param, 1.5) else int
    elif isinstance(default, str):
        kind = str | bool if _accepts(param, True) else str
    elif isinstance(default, Mapping):
        kind = dict
    elif isinstance(default, list):
        kind = list
    elif _accepts(param, "x") and not _accepts(param, 1):
        kind = str
    elif _accepts(param, 1) and not _accepts(param, "x"):
        kind = float if _accepts(param, 1.5) else int
    else:
        return Any
    return kind | None if _accepts(param, None) and default is not None or default is None else kind


def _coerce(kind: Any, value: Any) -> Any:
    """An int where the field is a float (YAML reads `1` as an int) becomes a float."""
    if kind in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_class(section: str) -> type[StageConfig]:
    """The frozen dataclass of one section's declared parameters."""
    params = [p for p in parameters.PARAMS if p.section == section]
    cls = dataclasses.make_dataclass(
        f"{section.capitalize()}Config",
        [(p.name, field_type(p), dataclasses.field(default=None)) for p in params],
        bases=(StageConfig,), frozen=True, eq=True, namespace={"section": section, "__hash__": None},
    )
    cls.__doc__ = f"The `{section}:` section of params.yaml (dashflow/core/parameters.py declares its fields)."
    cls.__module__ = __name__  # picklable (Ray workers) under its module-level name
    return cls


CONFIGS: dict[str, type[StageConfig]] = {section: config_class(section) for section in parameters.SECTIONS}
globals().update({cls.__name__: cls for cls in CONFIGS.values()})  # every one importable by its name
RunConfig = CONFIGS["run"]
ModelConfig = CONFIGS["model"]
TaskConfig = CONFIGS["task"]
SampleConfig = CONFIGS["sample"]
RewardConfig = CONFIGS["reward"]
SandboxConfig = CONFIGS["sandbox"]
AdvantageConfig = CONFIGS["advantage"]
FilterConfig = CONFIGS["filter"]
LearnConfig = CONFIGS["learn"]
EvaluateConfig = CONFIGS["evaluate"]


def make(section: str, values: Mapping[str, Any]) -> StageConfig | dict:
    """`values` (one section of a params tree, overrides applied) as its typed config; a key
    missing from the tree is None, as `.get` gave before (not its declared default, which can
    differ from what null means: `evaluate.sets: null` is the task's own sets). A section with
    no declarations, or values holding a key none declares, stay a plain dict."""
    cls = CONFIGS.get(section)
    if cls is None or any(f"{section}.{name}" not in parameters.BY_KEY for name in values):
        return dict(values)
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    return cls(**{name: _coerce(kinds[name], values.get(name)) for name in kinds})
