"""The import rule of dashflow's layers, checked from the source (`dashflow layers`).

    app    dashflow/app/    CLI, serving, reaper, inspect,          may import everything below
                            dvc.yaml, layers
    flows  flows/           Prefect flows composing the stages      may import ops, tasks, core
    ops    dashflow/ops/    DVC commits, retention, metrics,        may import core
                            tracking, report, console lines
    tasks  tasks/           one module per stage                    may import core, never a stage
    core   dashflow/core/   the library: parameters and config,     may import core
                            stage, schema, store, algorithms,
                            update, optimizer state, models,
                            samplers, answers, rewards, sandbox,
                            task loaders

tasks/ and flows/ install as `dashflow.tasks` and `dashflow.flows` (pyproject.toml), so no
module of the project is importable under the bare names `tasks` or `flows`. Every import
is read, including those inside functions, and the modules of one layer must not import
each other in a circle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

# layer -> (folder relative to the project root, package, one line, the layers it may import)
LAYERS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "core": ("dashflow/core", "dashflow.core", "the library: parameters, schema, store, algorithms, models, "
             "samplers, rewards, sandbox, tasks", ("core",)),
    "tasks": ("tasks", "dashflow.tasks", "one module per stage: Parquet in -> Parquet out, its Prefect task",
              ("core",)),
    "ops": ("dashflow/ops", "dashflow.ops", "around the stages: DVC commits, retention, tracking, report, console", ("core",)),
    "flows": ("flows", "dashflow.flows", "the Prefect flows: compose the stages", ("core", "tasks", "ops")),
    "app": ("dashflow/app", "dashflow.app", "the command line, serving, reaper, inspect, dvc.yaml, layers",
            ("core", "tasks", "ops", "flows", "app")),
}
BARE = ("tasks", "flows")


@dataclass(frozen=True)
class Module:
    name: str    # dotted, as installed
    layer: str
    path: Path


def modules(root: Path) -> dict[str, Module]:
    """Every module of the installed package, by its dotted name (subpackages included:
    dashflow/core/store/)."""
    out = {"dashflow": Module("dashflow", "core", root / "dashflow" / "__init__.py")}
    for layer, (folder, package, _, _) in LAYERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            name = ".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])
            out[name] = Module(name, layer, path)
    return out


def _imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `tree`, resolved to a module where one exists."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in known else base))
    return found


def violations(root: Path) -> list[str]:
    """Every import that breaks the rule, as `file:line: what`; empty when the house is sound."""
    root = Path(root)
    mods = modules(root)
    known = set(mods)
    problems: list[str] = []
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for mod in mods.values():
        where = mod.path.relative_to(root)
        tree = ast.parse(mod.path.read_text(), str(mod.path))
        for line, name in _imported(tree, mod.name, mod.path.stem == "__init__", known):
            head = name.split(".")[0]
            if head in BARE:
                problems.append(f"{where}:{line}: imports {name!r} under a bare name; use dashflow.{name}")
                continue
            target = mods.get(name)
            if target is None or target.name == mod.name:
                continue
            if target.name == "dashflow" or target.name == LAYERS[target.layer][1] and target.layer == mod.layer:
                continue  # the package roots hold nothing but the version and a docstring
            allowed = LAYERS[mod.layer][3]
            if mod.layer == "tasks" and target.layer == "tasks":
                problems.append(f"{where}:{line}: a stage imports another stage ({name}); move what they share "
                                "into dashflow/core")
            elif target.layer not in allowed:
                problems.append(f"{where}:{line}: {mod.layer} imports {target.layer} ({name}); "
                                f"{mod.layer} may import {', '.join(allowed)}")
            elif target.layer == mod.layer:
                edges[mod.name].add(target.name)
    problems += [f"circular imports: {' -> '.join(cycle)}" for cycle in _cycles(edges)]
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), closed on its first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group) + [sorted(group)[0]])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def table(root: Path) -> list[tuple[str, str, int, int, str]]:
    """(layer, folder, modules, lines, what it holds) per layer, top layer first."""
    mods = modules(Path(root))
    rows = []
    for layer, (folder, _, what, _) in reversed(list(LAYERS.items())):
        own = [m for m in mods.values() if m.layer == layer and Path(root) / folder in m.path.parents
               and m.path.stem != "__init__"]
        rows.append((layer, folder + "/", len(own), sum(len(m.path.read_text().splitlines()) for m in own), what))
    return rows
