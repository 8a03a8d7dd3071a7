"""The README stays true to the tree: its code map lists every module once (and nothing else),
and machine timings and commit hashes stay in bench/RESULTS.md, not in the README."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# the package's modules, by layer (tasks/ and flows/ install as dashflow.tasks, dashflow.flows)
GLOBS = (
    "dashflow/core/*.py",
    "dashflow/core/store/*.py",
    "dashflow/ops/*.py",
    "dashflow/app/*.py",
    "tasks/*.py",
    "flows/*.py",
)
# a line of the map: `path — what it holds`
MAP_LINE = re.compile(r"^(?P<path>\S+\.py)\s+— +(?P<what>\S.*)$")
# a commit hash: 7 to 40 hex digits, at least one digit and one letter (so no word or number)
HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
# a wall time or a rate measured on some machine: "9 min 51 s", "13.8s", "0.3 s", "224 tok/s"
TIMING = re.compile(r"\b\d+(?:\.\d+)?\s?(?:min|s|ms)\b|\btok/s\b")


def _code_map() -> list[str]:
    """The lines of the fenced block(s) in the README's "Code map" section."""
    text = README.read_text()
    start = text.index("\n## Code map\n")
    end = text.find("\n## ", start + 1)
    fenced, inside = [], False
    for line in text[start : end if end >= 0 else len(text)].splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            fenced.append(line)
    assert fenced, "README.md's Code map section has no fenced map of files"
    return fenced


def modules_on_disk() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for g in GLOBS for p in ROOT.glob(g) if p.name != "__init__.py"}


def test_the_code_map_lists_every_module_once():
    lines = _code_map()
    malformed = [line for line in lines if re.match(r"(dashflow|tasks|flows)/", line) and not MAP_LINE.match(line)]
    assert malformed == [], f"code map lines not of the form `path — what it holds`: {malformed}"
    listed = [MAP_LINE.match(line)["path"] for line in lines if MAP_LINE.match(line)]
    twice = sorted({p for p in listed if listed.count(p) > 1})
    on_disk = modules_on_disk()
    missing = sorted(on_disk - set(listed))
    extra = sorted(set(listed) - on_disk)
    assert (missing, extra, twice) == ([], [], []), (
        f"README.md's code map is out of date: missing {missing} (add `path — what it holds`), "
        f"no such module {extra}, listed twice {twice}"
    )


def test_the_map_finds_the_learners_pieces_by_name():
    # what a newcomer looks for, by file name alone
    listed = {
        MAP_LINE.match(line)["path"]: MAP_LINE.match(line)["what"] for line in _code_map() if MAP_LINE.match(line)
    }
    assert "loss" in listed["dashflow/core/algorithms.py"]
    assert "update" in listed["dashflow/core/update.py"]
    assert "optimizer state" in listed["dashflow/core/optimizer_state.py"]
    assert "key" in listed["dashflow/core/stage.py"]
    assert "Parquet" in listed["dashflow/core/store/shards.py"]


def test_no_timings_or_commit_hashes_in_the_readme():
    found = [
        f"README.md:{n}: {m.group(0)!r}"
        for n, line in enumerate(README.read_text().splitlines(), 1)
        for pattern in (HASH, TIMING)
        for m in pattern.finditer(line)
    ]
    assert found == [], (
        "machine timings and commit hashes belong in bench/RESULTS.md (with where and when "
        f"they were measured); the README links there: {found}"
    )


def test_the_checks_catch_what_they_are_for():
    assert HASH.findall("measured at commit bb98d7e, again at 5492340") == ["bb98d7e"]
    assert HASH.findall("decade 2026-12-05 0.0253 part-00000.parquet iter-0003 5e-5 cafe") == []
    assert TIMING.findall("9 min 51 s; sample   13.8s; 0.3 s; 224 tok/s") == [
        "9 min",
        "51 s",
        "13.8s",
        "0.3 s",
        "tok/s",
    ]
    assert TIMING.findall("8 iterations, 3 seeds, ~93 MB, 5.95 GB, T 0.9, 2.8-2.9x, iter-0003/") == []
