"""Benchmark: dashflow against its peer, TRL's GRPOTrainer, on one CPU configuration.

The same model (the embedded SmolLM2-135M-Instruct, float32), the same prompts (the
arithmetic task's level 1: single-digit a + b and a - b, 96 train prompts from the run's
seed), the same reward (params.yaml's reward.functions, through dashflow.core.rewards.score_row), and the same
algorithm: 8 prompts x 4 samples, 64 new tokens, temperature 0.8 (top_k off), one on-policy
optimizer step per 32 completions, std-normalised advantages (epsilon 1e-4), token-mean
loss (TRL's `dapo`), PPO clip 0.2, AdamW lr 2e-5 constant, gradient clipping 1.0, no KL.
Three systems, each once per seed:

  trl        TRL's GRPOTrainer (bench-only: `pip install '.[bench]'`; never a runtime dependency)
  dashflow   dashflow's flow, gradient filter off (the same algorithm as TRL)
  dash       dashflow's flow with DASH's gradient filter |A| > 0.1
  dash-fast  dash, with its fastest settings on the machine: the vLLM sampler (one engine for
             the run, `make vllm`) and `auto` precision (bfloat16 sampler and bf16-mixed learner
             where the machine's probe finds them faster)

Per step it prints the mean reward of the step's 32 completions (mean over seeds, with the
min..max across seeds), and per system the wall time per step and the time to the first
step whose reward reaches --target. TRL's time per step is the trainer step's wall time
(generation, reward, backward, optimizer); dashflow's is the iteration's wall time without
evaluation (every stage, checkpoint writes and Prefect included).

    python bench/trl_peer.py --seeds 0,1,2 --steps 12
    python bench/trl_peer.py --seeds 0 --steps 2 --systems trl,dash   # minutes: a smoke run
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import typer
from _common import ROOT, base_policy_path, machine

PROMPTS_PER_STEP, G, MAX_NEW, TEMPERATURE, LR, THRESHOLD = 8, 4, 64, 0.8, 2.0e-5, 0.1
# task.fewshot 0: TRL gets the bare question, so dashflow does too (the default prompt format
# puts one worked example before it, which changes rewards and lengths)
TASK = {"task.kind": "arithmetic", "task.level_weights": [1, 0, 0, 0], "task.num_eval": 8, "task.fewshot": 0}
INSTRUCTION = "Put the final answer in \\boxed{}."


FAST = {"sample.backend": "vllm", "model.dtype": "auto", "learn.precision": "auto"}


def dashflow_overrides(seed: int, steps: int, filtered: bool, root: Path, name: str, fast: bool = False) -> dict:
    """The flow's parameters that make it the algorithm above."""
    return {**_overrides(seed, steps, filtered, root, name), **(FAST if fast else {})}


def _overrides(seed: int, steps: int, filtered: bool, root: Path, name: str) -> dict:
    return {
        **TASK, "task.num_train": PROMPTS_PER_STEP * steps, "run.seed": seed, "run.root": str(root), "run.name": name,
        "model.dtype": "float32", "learn.precision": "fp32",
        "sample.prompts_per_iteration": PROMPTS_PER_STEP, "sample.samples_per_prompt": G,
        "sample.max_new_tokens": MAX_NEW, "sample.temperature": TEMPERATURE, "sample.top_k": 0, "sample.top_p": 1.0,
        "sample.batching": "packed", "advantage.estimator": "grpo", "advantage.epsilon": 1.0e-4,
        "filter.enabled": filtered, "filter.threshold": THRESHOLD,
        "learn.lr": LR, "learn.lr_schedule": "constant", "learn.warmup_steps": 0, "learn.max_grad_norm": 1.0,
        "learn.weight_decay": 0.0, "learn.update": "multi", "learn.steps": 1, "learn.loss_agg": "token_mean",
        "learn.clip_eps": 0.2, "learn.clip_eps_high": 0.2, "learn.kl_coef": 0.0, "learn.tis_cap": 0,
        "evaluate.num_prompts": 8, "evaluate.samples": 0, "evaluate.max_new_tokens": MAX_NEW,
        "retention.policies": 1, "retention.optimizers": 1, "retention.dvc": "drop", "dvc.track": "off",
    }


def run_dashflow(seed: int, steps: int, filtered: bool, root: Path, fast: bool = False) -> list[dict]:
    from dashflow.core.config import RunLayout
    from dashflow.flows.dash_rl import dash_rl

    name = f"{'dash' if filtered else 'dashflow'}{'-fast' if fast else ''}-seed{seed}"
    dash_rl(params_path=str(ROOT / "params.yaml"), overrides=dashflow_overrides(seed, steps, filtered, root, name, fast),
            iterations=steps)
    layout = RunLayout(root / name)
    out = []
    for i in range(steps):
        m = json.loads(layout.metrics(i).read_text())
        out.append({"reward": m["reward_mean"], "time_s": m["time"]["total"], "len": m["mean_completion_tokens"],
                    "kept": m["kept_fraction"]})
    return out


def run_trl(seed: int, steps: int, root: Path) -> list[dict]:
    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        raise SystemExit(f"TRL is not installed ({exc}): pip install '.[bench]' (a bench-only extra)") from exc
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from dashflow.core.config import Params
    from dashflow.core.problems import arithmetic
    from dashflow.core.rewards import functions, score_row, settings

    train, _ = arithmetic(PROMPTS_PER_STEP * steps, TASK["task.num_eval"], seed=seed,
                          level_weights=TASK["task.level_weights"], instruction=INSTRUCTION)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                              for r in train])

    cfg = settings(Params.load(ROOT / "params.yaml"))
    fns = functions(cfg)

    def math_reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [score_row({"completion": t, "answer": a, "prompt": ""}, fns, cfg["timeout_s"], cfg["max_chars"])["reward"]
                for t, a in zip(texts, answer)]

    steps_out: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps_out.append({"time_s": time.perf_counter() - self.t0})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs and steps_out:
                steps_out[-1].update(reward=logs["reward"], len=logs.get("completions/mean_length"))

    path = base_policy_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=str(root / f"trl-seed{seed}"), seed=seed, max_steps=steps, use_cpu=True, bf16=False,
        per_device_train_batch_size=PROMPTS_PER_STEP * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=MAX_NEW, temperature=TEMPERATURE, top_k=0, top_p=1.0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group", num_iterations=1,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=config, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(path), callbacks=[Clock()])
    typer.echo(f"TRL {trl.__version__}, seed {seed}")
    trainer.train()
    return steps_out


def _spread(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" if min(values) == max(values) else \
        f"{mean:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def first_reaching(run: list[dict], target: float) -> tuple[int | None, float | None]:
    """(1-based step, cumulative seconds) of the first step whose reward reaches target."""
    elapsed = 0.0
    for k, step in enumerate(run, 1):
        elapsed += step["time_s"]
        if step.get("reward") is not None and step["reward"] >= target:
            return k, elapsed
    return None, None


def tables(results: dict[str, dict[int, list[dict]]], steps: int, target: float) -> str:
    systems = list(results)
    lines = ["| step | " + " | ".join(f"{s} reward" for s in systems) + " |", "|---" * (len(systems) + 1) + "|"]
    for k in range(steps):
        lines.append(f"| {k + 1} | " + " | ".join(
            _spread([run[k].get("reward") for run in results[s].values() if len(run) > k]) for s in systems) + " |")
    lines += ["", f"| system | s/step | total s ({steps} steps) | mean completion tokens | "
              f"steps to reward >= {target} | s to reward >= {target} | reached (seeds) |", "|---|---|---|---|---|---|---|"]
    for s in systems:
        runs = list(results[s].values())
        per_step = [statistics.fmean(st["time_s"] for st in r) for r in runs]
        total = [sum(st["time_s"] for st in r) for r in runs]
        length = [statistics.fmean(st["len"] for st in r if st.get("len") is not None) for r in runs]
        hits = [first_reaching(r, target) for r in runs]
        reached = [h for h in hits if h[0] is not None]
        lines.append(f"| {s} | {_spread(per_step, 1)} | {_spread(total, 0)} | {_spread(length, 1)} "
                     f"| {_spread([h[0] for h in reached], 1)} | {_spread([h[1] for h in reached], 0)} "
                     f"| {len(reached)}/{len(hits)} |")
    return "\n".join(lines)


def main(
    seeds: str = typer.Option("0,1,2", help="comma-separated seeds: every system runs once per seed"),
    steps: int = typer.Option(12, help="optimizer steps (dashflow: iterations)"),
    systems: str = typer.Option("trl,dashflow,dash", help="comma-separated: trl, dashflow, dash, dash-fast"),
    target: float = typer.Option(0.9, help="the reward whose first step (and time) is reported"),
    out: Path = typer.Option(Path("bench/results/trl_peer.json"), help="JSON with every step's numbers"),
):
    chosen = [s.strip() for s in systems.split(",") if s.strip()]
    unknown = set(chosen) - {"trl", "dashflow", "dash", "dash-fast"}
    if unknown:
        raise typer.BadParameter(f"unknown system(s) {sorted(unknown)}; choose from trl, dashflow, dash, dash-fast")
    seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    results: dict[str, dict[int, list[dict]]] = {s: {} for s in chosen}
    root = Path(tempfile.mkdtemp(prefix="dashflow-bench-trl-"))
    started = time.perf_counter()
    try:
        for seed in seed_list:  # seed by seed, the systems in turn: machine noise hits them alike
            for s in chosen:
                typer.echo(f"== {s} seed {seed}")
                results[s][seed] = (run_trl(seed, steps, root) if s == "trl"
                                    else run_dashflow(seed, steps, s.startswith("dash-") or s == "dash", root,
                                                      fast=s == "dash-fast"))
                out.parent.mkdir(parents=True, exist_ok=True)  # what is done so far survives an interruption
                out.write_text(json.dumps({"seeds": seed_list, "steps": steps, "partial": True, "results": results}))
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    typer.echo(f"\n{len(chosen)} systems x {len(seed_list)} seeds x {steps} steps in {time.perf_counter() - started:.0f} s "
               f"({machine()}); mean (min..max) over seeds {seed_list}\n")
    typer.echo(tables(results, steps, target))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seeds": seed_list, "steps": steps, "target": target, "machine": machine(),
                               "results": results}, indent=2))
    typer.echo(f"\nwrote {out}")


if __name__ == "__main__":
    typer.run(main)
