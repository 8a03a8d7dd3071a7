"""`dashflow inspect`: a terminal summary of any stage's Parquet output."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds


class InspectError(ValueError):
    pass


def _load(path: Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise InspectError(f"{path}: no such file or directory")
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files:
        raise InspectError(f"{path}: not a stage output (no .parquet files)")
    try:
        return ds.dataset([str(f) for f in files], format="parquet").to_table()
    except (pa.ArrowInvalid, OSError) as exc:
        raise InspectError(f"{path}: unreadable Parquet ({exc})") from exc


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {}
    q = pc.quantile(pa.array(values, pa.float64()), q=[0.1, 0.5, 0.9], interpolation="linear").to_pylist()
    return {"p10": q[0], "p50": q[1], "p90": q[2], "max": max(values), "mean": sum(values) / len(values)}


def summarize(path: Path, limit: int = 3, seed: int = 0) -> dict:
    table = _load(path)
    cols = set(table.column_names)
    out: dict = {"path": str(path), "rows": table.num_rows, "columns": table.column_names}
    if "prompt_id" in cols:
        out["prompts"] = len(pc.unique(table.column("prompt_id")))
    if "completion_token_ids" in cols:
        out["completion_tokens"] = _quantiles(pc.list_value_length(table.column("completion_token_ids")).to_pylist())
    elif "completion_tokens" in cols:
        out["completion_tokens"] = _quantiles(table.column("completion_tokens").to_pylist())
    if "finish_reason" in cols:
        out["finish_reasons"] = {r["values"]: r["counts"] for r in pc.value_counts(table.column("finish_reason")).to_pylist()}
    if "reward" in cols and table.num_rows:
        out["reward_mean"] = pc.mean(table.column("reward")).as_py()
    if "correct" in cols and table.num_rows:
        out["accuracy"] = pc.mean(pc.cast(table.column("correct"), pa.float64())).as_py()
    if "reward_error" in cols:
        out["reward_errors"] = table.num_rows - table.column("reward_error").null_count
    if "group_std" in cols and "sample_index" in cols:
        first = table.filter(pc.equal(table.column("sample_index"), 0))
        out["groups"] = first.num_rows
        out["mixed_groups"] = pc.sum(pc.greater(first.column("group_std"), 0)).as_py() or 0
    if "completion" in cols and table.num_rows:
        rows = table.select([c for c in ("prompt_id", "prompt", "answer", "completion", "reward", "parsed_answer",
                                         "advantage", "mode", "correct") if c in cols]).to_pylist()
        key = "reward" if "reward" in cols else ("correct" if "correct" in cols else None)
        picks = {}
        if key:
            ranked = sorted(rows, key=lambda r: float(r[key]))
            picks["best"], picks["worst"] = ranked[-1], ranked[0]
        picks["random"] = random.Random(seed).choice(rows)
        out["examples"] = dict(list(picks.items())[: max(limit, 0)])
    return out


def render(s: dict) -> str:
    lines = [f"{s['path']}: {s['rows']} rows" + (f", {s['prompts']} prompts" if "prompts" in s else "")]
    for key in ("groups", "mixed_groups", "reward_mean", "accuracy", "reward_errors", "finish_reasons",
                "completion_tokens"):
        if key in s:
            value = s[key]
            if isinstance(value, float):
                value = f"{value:.4f}"
            elif isinstance(value, dict):
                value = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
            lines.append(f"  {key:18s} {value}")
    for name, row in s.get("examples", {}).items():
        lines.append(f"--- {name}: {row.get('prompt_id')}  reward={row.get('reward', row.get('correct'))} "
                     f"answer={row.get('answer')} parsed={row.get('parsed_answer')}")
        lines.append(f"  Q: {row.get('prompt', '')[:200]}")
        lines.append(f"  A: {row.get('completion', '')[:400]!r}")
    return "\n".join(lines)
