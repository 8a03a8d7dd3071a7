"""Reading a params file, and the error every parameter check raises.

Params YAML (a file or a `--set` value) is read with `_Loader`: numbers as people write
them. A file that is not a mapping of sections is refused naming the file and the place.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import yaml


class ParamsError(ValueError):
    """A parameter that is wrong (in a file, an override, a preset or the schedule); the message
    names the file or override, the key and what is allowed."""


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
