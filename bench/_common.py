"""Shared bits of the benchmark scripts: where the project is, markdown tables, JSON results."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from dashflow.core.config import overlay  # noqa: E402 (dashflow from this checkout: the path above)

# The tiny configuration (`--tiny`): params/tiny.yaml's overrides, the ones the tests run on.
TINY = overlay(ROOT / "params" / "tiny.yaml")


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.node()}: {device}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def markdown(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(title: str, headers: list[str], rows: list[list], out: Path, **extra) -> None:
    """Print the table (markdown) and write it with `extra` as JSON."""
    print(f"\n{title}\n({machine()})\n")
    print(markdown(headers, rows))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"title": title, "machine": machine(), "headers": headers, "rows": rows, **extra},
                              indent=2, default=str))
    print(f"\nwrote {out}")


def base_policy_path(model: str = "embedded:smollm2-135m-instruct") -> str:
    from dashflow.core.models import resolve_model

    return resolve_model(model)


def arithmetic_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """n chat-formatted prompts of the default task (the lengths the stages see)."""
    from dashflow.core.policy import chat_prompt
    from dashflow.core.problems import arithmetic

    train, _ = arithmetic(max(n, 8), 0, seed=seed, level_weights=[0.4, 0.25, 0.15, 0.2],
                          instruction="Put the final answer in \\boxed{}.")
    return [chat_prompt(tokenizer, row["prompt"]) for row in train[:n]]


def gpu_overrides() -> dict:
    """The GPU configuration of the benchmarks (`--gpu`): Qwen2.5-0.5B-Instruct on GSM8K or
    MATH, as in the DASH paper's setup scaled to one GPU. Point DASHFLOW_GPU_MODEL at the
    local weights and DASHFLOW_GPU_TASK at a GSM8K- or MATH-format JSONL/Parquet file."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (torch.cuda.is_available() is False)")
    model = os.environ.get("DASHFLOW_GPU_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
    task = os.environ.get("DASHFLOW_GPU_TASK")
    if task is None or not Path(task).exists():
        raise SystemExit("--gpu needs DASHFLOW_GPU_TASK=<GSM8K/MATH-format .jsonl or .parquet file>")
    return {"model.name": model, "model.dtype": "bfloat16", "run.device": "cuda",
            "task.kind": "math" if "math" in Path(task).name.lower() else "gsm8k", "task.path": task,
            "task.num_train": 4096, "task.num_eval": 500, "evaluate.num_prompts": 500,
            "sample.prompts_per_iteration": 64, "sample.max_new_tokens": 1024, "evaluate.max_new_tokens": 1024,
            "sample.token_budget": 1_000_000, "sample.max_batch_size": 256, "learn.micro_batch_tokens": 16384,
            "learn.lr": 3.0e-6}


@contextmanager
def scratch(prefix: str):
    """A temporary run root, removed afterwards (checkpoints are GBs); DASHFLOW_BENCH_KEEP=1 keeps it."""
    root = Path(tempfile.mkdtemp(prefix=f"dashflow-bench-{prefix}-"))
    try:
        yield root
    finally:
        if os.environ.get("DASHFLOW_BENCH_KEEP") == "1":
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
