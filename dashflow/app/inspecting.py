"""Offline inspection of stage outputs: `dashflow inspect` and `dashflow diff`.

Reading goes through pyarrow datasets with column projection: the summary reads the
scalar columns (ids, rewards, advantages, finish reasons, token counts), never the
prompt/completion text or the per-token log-probs; only the few example rows shown
are read whole. `--rev` reads a stage output as it was at a git revision, through DVC.
"""

from __future__ import annotations

import ast
import functools
import io
import operator
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from dashflow.core import store

SCALARS = ("prompt_id", "sample_index", "iteration", "mode", "reward", "correct", "parsed_answer", "answer",
           "strict_correct", "flexible_correct", "strict_answer", "flexible_answer", "reward_error", "finish_reason", "advantage", "group_mean", "group_std", "completion_tokens")
EXAMPLE_COLUMNS = ("prompt_id", "sample_index", "mode", "prompt", "prompt_text", "answer", "completion", "parsed_answer", "reward",
                   "correct", "strict_answer", "strict_correct", "flexible_answer", "flexible_correct", "advantage",
                   "finish_reason", "reward_error")
# what counts as a row's correctness: the reward's check (rollouts), else the strict checker (evaluations)
CORRECT = ("correct", "strict_correct")


class InspectError(ValueError):
    pass


# ---------------------------------------------------------------- reading


def _files(path: Path, rev: str | None) -> tuple[list[str], object | None]:
    """Parquet files of a stage output (or one file), and the filesystem to read them from."""
    if rev is None:
        if not path.exists():
            raise InspectError(f"{path}: no such file or directory")
        files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
        return [str(f) for f in files], None
    from dvc.api import DVCFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    try:
        fs = DVCFileSystem(repo=".", rev=rev)
        rel = path.resolve().relative_to(Path.cwd().resolve()).as_posix() if path.is_absolute() else path.as_posix()
        if not fs.exists(rel):
            raise InspectError(f"{path}: not in revision {rev!r} (neither in git nor tracked by DVC there)")
        files = [rel] if fs.isfile(rel) else sorted(f for f in fs.find(rel) if f.endswith(".parquet"))
    except InspectError:
        raise
    except Exception as exc:
        raise InspectError(f"{path}@{rev}: cannot read through DVC ({type(exc).__name__}: {exc})") from exc
    return files, PyFileSystem(FSSpecHandler(fs))


def open_dataset(path: Path | str, rev: str | None = None) -> ds.Dataset:
    path = Path(path)
    files, fs = _files(path, rev)
    if not files:
        raise InspectError(f"{path}: not a stage output (no .parquet files)")
    try:
        return ds.dataset(files, format="parquet", filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InspectError(f"{path}: unreadable Parquet ({exc})") from exc


def _scalar_table(dataset: ds.Dataset) -> pa.Table:
    names = dataset.schema.names
    columns = {c: ds.field(c) for c in SCALARS if c in names}
    try:
        table = dataset.to_table(columns=columns)
        if "completion_token_ids" in names and "completion_tokens" not in names:
            lengths = dataset.to_table(columns=["completion_token_ids"]).column(0)
            table = table.append_column("completion_tokens", pc.list_value_length(lengths))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InspectError(f"unreadable Parquet ({exc})") from exc
    return table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))


_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
WHERE_GRAMMAR = ("columns, literals (numbers, 'strings', True, False, None), comparisons "
                 "(== != < <= > >=, `in [..]`), and / or / not, parentheses")


def compile_where(text: str, columns: list[str]) -> pc.Expression:
    """`--where` as a pyarrow.compute expression. The text is parsed (never evaluated) and
    only the grammar above is accepted: no names but columns, no calls, no attributes, so an
    expression can select rows and nothing else."""
    def refuse(why: str):
        return InspectError(f"--where {text!r}: {why}; allowed: {WHERE_GRAMMAR}; columns are {columns}")

    if len(text) > 2000:
        raise InspectError(f"--where: {len(text):,} characters; at most 2,000 are allowed")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise refuse(f"not an expression ({exc.msg})") from None
    except (RecursionError, MemoryError):
        raise refuse("nested too deeply") from None

    def literal(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, (str, int, float, bool, type(None))):
            return n.value
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant) \
                and isinstance(n.operand.value, (int, float)) and not isinstance(n.operand.value, bool):
            return -n.operand.value
        raise refuse(f"{ast.unparse(n)!r} is not a column or a literal")

    def value(n):
        if isinstance(n, ast.Name):
            if n.id not in columns:
                raise refuse(f"unknown column {n.id!r}")
            return pc.field(n.id)
        return pc.scalar(literal(n))

    def condition(n) -> pc.Expression:
        if isinstance(n, ast.BoolOp):
            parts = [condition(v) for v in n.values]
            return functools.reduce(operator.and_ if isinstance(n.op, ast.And) else operator.or_, parts)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            return ~condition(n.operand)
        if isinstance(n, ast.Name):   # a boolean column on its own: `correct`, `not correct`
            return value(n)
        if isinstance(n, ast.Compare):
            terms, out = [n.left, *n.comparators], None
            for left, op, right in zip(terms, n.ops, terms[1:]):
                if isinstance(op, (ast.In, ast.NotIn)):
                    if not isinstance(right, (ast.List, ast.Tuple, ast.Set)):
                        raise refuse("`in` takes a list of literals")
                    test = value(left).isin([literal(e) for e in right.elts])
                    test = ~test if isinstance(op, ast.NotIn) else test
                elif type(op) in _COMPARE:
                    test = _COMPARE[type(op)](value(left), value(right))
                else:
                    raise refuse(f"operator {type(op).__name__} is not allowed")
                out = test if out is None else out & test
            return out
        raise refuse(f"{ast.unparse(n)!r} is not a condition")

    try:
        return condition(tree)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError) as exc:
        raise refuse(f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    except RecursionError:
        raise refuse("nested too deeply") from None


def select(table: pa.Table, where: str | None = None, prompt_id: str | None = None) -> pa.Table:
    """Rows matching `--prompt-id` and a `--where` expression (e.g. "reward < 0.5 and not correct")."""
    if prompt_id is not None:
        if "prompt_id" not in table.column_names:
            raise InspectError("--prompt-id: this table has no prompt_id column")
        table = table.filter(pc.equal(table.column("prompt_id"), prompt_id))
    if where:
        expr = compile_where(where, [c for c in table.column_names if c != "_row"])
        try:
            table = table.filter(expr)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as exc:
            raise InspectError(f"--where {where!r}: {exc}") from exc
    return table


# ---------------------------------------------------------------- summary


def _quantiles(values: pa.Array) -> dict:
    if len(values) == 0:
        return {}
    q = pc.quantile(values.cast(pa.float64()), q=[0.1, 0.5, 0.9, 0.99], interpolation="linear").to_pylist()
    return {"p10": q[0], "p50": q[1], "p90": q[2], "p99": q[3], "max": pc.max(values).as_py(),
            "mean": pc.mean(values).as_py()}


def _distribution(values: pa.Array) -> dict:
    """Counts of each reward value (binary rewards), or of 10 equal bins (continuous ones)."""
    counts = pc.value_counts(values).to_pylist()
    if len(counts) <= 10:
        return {str(c["values"]): c["counts"] for c in sorted(counts, key=lambda c: c["values"])}
    import numpy as np

    hist, edges = np.histogram(values.to_numpy(), bins=10)
    return {f"[{edges[i]:.2f},{edges[i + 1]:.2f})": int(hist[i]) for i in range(10)}


def _groups(table: pa.Table, correct: str) -> dict:
    by = table.group_by("prompt_id").aggregate([(correct, "all"), (correct, "any")])
    all_correct = pc.sum(by.column(f"{correct}_all")).as_py() or 0
    any_correct = pc.sum(by.column(f"{correct}_any")).as_py() or 0
    return {"groups": by.num_rows, "all_correct": all_correct, "all_wrong": by.num_rows - any_correct,
            "mixed": any_correct - all_correct}


def summarize(path: Path | str, *, rev: str | None = None, where: str | None = None, prompt_id: str | None = None,
              limit: int = 3, seed: int = 0) -> dict:
    """The summary `dashflow inspect` prints, as a dict (what `--json` prints)."""
    path = Path(path)
    dataset = open_dataset(path, rev)
    table = select(_scalar_table(dataset), where, prompt_id)
    cols = set(table.column_names)
    out: dict = {"path": str(path), "rev": rev, "rows": table.num_rows,
                 "columns": [c for c in dataset.schema.names]}
    if where or prompt_id:
        out["filter"] = {"where": where, "prompt_id": prompt_id}
    if "prompt_id" in cols:
        out["prompts"] = len(pc.unique(table.column("prompt_id")))
    if "reward" in cols and table.num_rows:
        out["reward_mean"] = pc.mean(table.column("reward")).as_py()
        out["reward_distribution"] = _distribution(table.column("reward").combine_chunks())
    correct = next((c for c in CORRECT if c in cols), None)
    if correct and table.num_rows:
        if correct == "correct":
            out["accuracy"] = pc.mean(pc.cast(table.column("correct"), pa.float64())).as_py()
        for c in ("strict_correct", "flexible_correct"):
            if c in cols:
                out[c.replace("correct", "accuracy")] = pc.mean(pc.cast(table.column(c), pa.float64())).as_py()
        if "sample_index" in cols:
            out.update(_groups(table, correct))
    if "advantage" in cols and table.num_rows:
        out["advantage_abs_mean"] = pc.mean(pc.abs(table.column("advantage"))).as_py()
    if rev is None and path.is_dir():
        manifest = store.read_manifest(path)
        if manifest is not None and "kept_fraction" in manifest.stats:
            out["kept_fraction"] = manifest.stats["kept_fraction"]
    if "completion_tokens" in cols:
        out["completion_tokens"] = _quantiles(table.column("completion_tokens").combine_chunks())
    if "finish_reason" in cols:
        out["finish_reasons"] = {c["values"]: c["counts"] for c in pc.value_counts(table.column("finish_reason")).to_pylist()}
    if "reward_error" in cols:
        errors = table.filter(pc.is_valid(table.column("reward_error")))
        out["reward_errors"] = errors.num_rows
        if errors.num_rows:
            out["reward_error_examples"] = pc.unique(errors.column("reward_error")).to_pylist()[:3]
    out["examples"] = _examples(dataset, table, limit, seed)
    return out


def _examples(dataset: ds.Dataset, table: pa.Table, limit: int, seed: int) -> dict:
    """Best, worst and a random row (by reward, else correctness), read whole."""
    if table.num_rows == 0 or limit <= 0:
        return {}
    key = next((k for k in ("reward", *CORRECT) if k in table.column_names), None)
    rows = table.column("_row").to_pylist()
    picks: dict[str, int] = {}
    if key:
        scores = [float(v) for v in table.column(key).to_pylist()]
        # the first row (in file order) with the highest / lowest score
        picks["best"] = rows[min(range(len(rows)), key=lambda i: (-scores[i], i))]
        picks["worst"] = rows[min(range(len(rows)), key=lambda i: (scores[i], i))]
    picks["random"] = random.Random(seed).choice(rows)
    names = [c for c in EXAMPLE_COLUMNS if c in dataset.schema.names]
    chosen = list(picks.items())[:limit]
    taken = dataset.take(pa.array([r for _, r in chosen], pa.int64()), columns=names).to_pylist()
    return {name: row for (name, _), row in zip(chosen, taken)}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def render(s: dict, full_prompt: bool = False) -> str:
    """Terminal rendering of a summary (rich table + examples), as text; `full_prompt`: each
    example's whole rendered prompt (chat template, system message, demonstrations) instead
    of the first 200 characters of its question."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120, record=True, file=io.StringIO(), highlight=False)
    title = f"{s['path']}" + (f" @ {s['rev']}" if s.get("rev") else "")
    table = Table(title=title, show_header=False, box=None)
    for key in ("filter", "rows", "prompts", "groups", "all_correct", "all_wrong", "mixed", "reward_mean",
                "reward_distribution", "accuracy", "strict_accuracy", "flexible_accuracy", "advantage_abs_mean", "kept_fraction", "completion_tokens",
                "finish_reasons", "reward_errors", "reward_error_examples"):
        if key in s:
            table.add_row(key, _fmt(s[key]))
    console.print(table)
    for name, row in s.get("examples", {}).items():
        score = row.get("reward", row.get("correct", row.get("strict_correct")))
        parsed = (f"parsed={row.get('parsed_answer')}" if "parsed_answer" in row else
                  f"strict={row.get('strict_answer')} flexible={row.get('flexible_answer')}")
        console.print(f"[bold]── {name}[/bold]  {row.get('prompt_id')}  reward={_fmt(score)}  "
                      f"answer={row.get('answer')}  {parsed}")
        if full_prompt:
            shown = row.get("prompt_text") or "(no rendered prompt recorded in this output)"
            console.print("  prompt, as the policy saw it:\n" + shown, markup=False)
        else:
            console.print(f"  Q: {(row.get('prompt') or '')[:200]}", markup=False)
        console.print(f"  A: {(row.get('completion') or '')[:400]!r}", markup=False)
    return console.export_text()


# ---------------------------------------------------------------- diff


def _per_prompt(path: Path, mode: str | None) -> dict[str, dict]:
    table = _scalar_table(open_dataset(path))
    if mode and "mode" in table.column_names:
        table = table.filter(pc.equal(table.column("mode"), mode))
    score = next(c for c in ("reward", *CORRECT) if c in table.column_names)
    answer = "parsed_answer" if "parsed_answer" in table.column_names else "flexible_answer"
    table = table.append_column("_score", pc.cast(table.column(score), pa.float64()))
    table = table.append_column("_answer", table.column(answer))
    by = table.group_by("prompt_id").aggregate([("_score", "mean"), ("completion_tokens", "mean"),
                                                ("_answer", "list")])
    return {r["prompt_id"]: {"score": r["_score_mean"], "tokens": r["completion_tokens_mean"],
                             "answers": r["_answer_list"]} for r in by.to_pylist()}


def diff(a: Path, b: Path, *, mode: str | None = "greedy", limit: int = 10) -> dict:
    """How rewards (or correctness), lengths and answers changed for the prompts two outputs share."""
    pa_, pb = _per_prompt(a, mode), _per_prompt(b, mode)
    shared = sorted(set(pa_) & set(pb))
    if not shared:
        raise InspectError(f"{a} and {b} share no prompt_id (rollouts of different iterations sample different "
                           "prompts; compare eval outputs, which use the same held-out prompts)")
    changes = []
    for pid in shared:
        x, y = pa_[pid], pb[pid]
        changes.append({"prompt_id": pid, "score_a": x["score"], "score_b": y["score"], "tokens_a": x["tokens"],
                        "tokens_b": y["tokens"], "answers_a": x["answers"], "answers_b": y["answers"]})
    mean = lambda key: sum(c[key] for c in changes) / len(changes)
    moved = sorted((c for c in changes if c["score_a"] != c["score_b"]),
                   key=lambda c: (-abs(c["score_b"] - c["score_a"]), c["prompt_id"]))
    return {
        "a": str(a), "b": str(b), "shared_prompts": len(shared),
        "score_a": mean("score_a"), "score_b": mean("score_b"),
        "tokens_a": mean("tokens_a"), "tokens_b": mean("tokens_b"),
        "improved": sum(c["score_b"] > c["score_a"] for c in changes),
        "worsened": sum(c["score_b"] < c["score_a"] for c in changes),
        "answers_changed": sum(c["answers_a"] != c["answers_b"] for c in changes),
        "changes": moved[:limit],
    }


def render_diff(d: dict) -> str:
    lines = [f"{d['a']}  ->  {d['b']}   ({d['shared_prompts']} shared prompts)",
             f"  score   {d['score_a']:.3f} -> {d['score_b']:.3f}   improved {d['improved']}, worsened {d['worsened']}",
             f"  tokens  {d['tokens_a']:.1f} -> {d['tokens_b']:.1f}   answers changed on {d['answers_changed']} prompts"]
    for c in d["changes"]:
        lines.append(f"  {c['prompt_id']:>14}  {c['score_a']:.2f} -> {c['score_b']:.2f}  "
                     f"len {c['tokens_a']:.0f} -> {c['tokens_b']:.0f}  answers {c['answers_a']} -> {c['answers_b']}")
    return "\n".join(lines)
