"""Benchmark: learner efficiency -- tokens/s of the `learn` stage against a bare
forward+backward loop at the same micro-batch, over micro-batch sizes; and the learner's
time against the number of kept rows (it must scale with kept rows, not sampled rows).

    python bench/learner.py                 # 32 rows x (prompt + 64 tokens), micro-batch 1..16 rows
    python bench/learner.py --precisions fp32,bf16-mixed   # learn.precision side by side
    python bench/learner.py --tiny          # seconds; what CI runs

The stage number is `learn.run` on a kept table of identical-length rows (real prompt
tokens, random completion tokens, advantages +-1), with `learn.micro_batch_tokens` set so
that each micro-batch holds exactly `b` rows; its tokens/s counts the learner's work only
(forward, loss, backward, the step) -- not model loading or checkpoint writing. The bare
loop runs the same micro-batches through forward, plain policy-gradient loss and
backward, then one AdamW step.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import typer
from _common import ROOT, TINY, arithmetic_prompts, emit, gpu_overrides, scratch


def kept_table(prompt: list[int], rows: int, completion_len: int, vocab: int, seed: int = 0):
    import pyarrow as pa

    from dashflow.core import schema

    rng = random.Random(seed)
    out = []
    for n in range(rows):
        comp = [rng.randrange(100, vocab) for _ in range(completion_len)]
        out.append({"run": "bench", "iteration": 0, "prompt_id": f"p{n // 4:04d}", "sample_index": n % 4,
                    "prompt": "", "answer": "0", "prompt_token_ids": prompt, "completion_token_ids": comp,
                    "completion": "", "sampler_logprobs": [-2.0] * completion_len, "finish_reason": "length",
                    "policy_version": "bench", "reward": float(n % 2), "correct": bool(n % 2), "parsed_answer": None,
                    "reward_error": None, "advantage": 1.0 if n % 2 else -1.0, "group_mean": 0.5, "group_std": 0.5})
    return pa.Table.from_pylist(out, schema=schema.KEPT)


def write_kept(params, table) -> None:
    from dashflow.core import sampled_batch, schema, store

    def build(tmp):
        store.write_shard(tmp, 0, table, schema.KEPT, stage="bench")
        sampled_batch.write_sampled(tmp, sampled_batch.sampled_groups(table))
        return {"stats": {"rows_kept": table.num_rows}}

    store.run_stage("filter", 0, params.layout.stage_dir("filter", 0), inputs={}, params={"rows": table.num_rows},
                    code="bench", build=build, force=True)


def bare_step(path, table, rows_per_micro: int, device, precision: str = "fp32",
              temperature: float = 0.9) -> tuple[float, int]:
    import torch

    from dashflow.core import algorithms, batches, policy

    model = policy.load_model(path, device, "float32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    prompts = table.column("prompt_token_ids").to_pylist()
    comps = table.column("completion_token_ids").to_pylist()
    adv = torch.tensor(table.column("advantage").to_pylist())
    n_tokens = sum(len(c) for c in comps)
    t0, seen = time.perf_counter(), 0
    for s in range(0, len(prompts), rows_per_micro):
        idx = list(range(s, min(s + rows_per_micro, len(prompts))))
        ids, att, tgt, mask = batches.collate([prompts[i] for i in idx], [comps[i] for i in idx], 0)
        with autocast:
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits[:, :-1]
        logp = algorithms.token_logprobs(logits, tgt.to(device), temperature)
        algorithms.policy_gradient_loss(logp, adv[idx].to(device), mask.to(device), n_tokens).backward()
        seen += int(att.sum())
    opt.step()
    return time.perf_counter() - t0, seen


def main(
    rows: int = typer.Option(32, help="kept rows per learner call"),
    completion_len: int = typer.Option(64),
    micro: str = typer.Option("1,2,4,8,16", help="rows per micro-batch"),
    kept: str = typer.Option("8,16,32,64", help="kept-row counts for the scaling table"),
    sampled: int = typer.Option(64, help="rows the sampler produced (constant in the scaling table)"),
    precisions: str = typer.Option("fp32", help="comma-separated learn.precision values to compare"),
    tiny: bool = typer.Option(False),
    gpu: bool = typer.Option(False, help="Qwen2.5-0.5B in bfloat16 on CUDA (DASHFLOW_GPU_MODEL)"),
    out: Path = typer.Option(Path("bench/results/learner.json")),
):
    from dashflow.core import policy
    from dashflow.core.config import Params
    from dashflow.tasks import learn, prepare

    if tiny:
        rows, completion_len, micro, kept, sampled = 4, 8, "1,2", "2,4", 4
    sizes, kept_sizes = [int(x) for x in micro.split(",")], [int(x) for x in kept.split(",")]
    with scratch("learner") as root:
        overrides = {**TINY, "run.root": str(root), "run.name": "bench", "learn.lr": 1e-6}
        if gpu:
            overrides.update({k: v for k, v in gpu_overrides().items() if k.startswith(("model.", "run."))})
        params = Params.load(ROOT / "params.yaml", overrides)
        prepare.run(params)
        path = params.layout.policy(-1)
        tokenizer = policy.load_tokenizer(path)
        prompt = arithmetic_prompts(tokenizer, 1)[0]
        seq = len(prompt) + completion_len
        device = policy.pick_device(params["run"]["device"])

        table_rows = []
        table = kept_table(prompt, rows, completion_len, tokenizer.vocab_size)
        write_kept(params, table)
        for precision in [x.strip() for x in precisions.split(",")]:
            for b in sizes:
                p = params.with_overrides({"learn.micro_batch_tokens": b * seq, "learn.precision": precision})
                stats = learn.run(p, 0, force=True).stats
                bare_s, bare_tokens = bare_step(path, table, b, device, precision)
                bare = bare_tokens / bare_s
                table_rows.append([precision, b, b * seq, round(stats["tokens_per_s"], 1), round(bare, 1),
                                   f"{100 * stats['tokens_per_s'] / bare:.0f}%"])
                print(f"{precision} micro-batch {b} rows: stage {stats['tokens_per_s']:.1f} tok/s, "
                      f"bare {bare:.1f} tok/s", flush=True)
        emit(f"Learner throughput: {rows} rows x {seq} tokens ({device})",
             ["precision", "rows / micro-batch", "tokens / micro-batch", "learn stage tok/s", "bare fwd+bwd tok/s",
              "stage / bare"], table_rows, out)

        scaling = []
        for k in kept_sizes:
            write_kept(params, kept_table(prompt, k, completion_len, tokenizer.vocab_size))
            m = learn.run(params.with_overrides({"learn.micro_batch_tokens": 4 * seq}), 0, force=True)
            scaling.append([sampled, k, round(m.timing["work_s"], 2), round(m.timing["work_s"] / k, 3),
                            round(m.timing["load_s"] + m.timing["save_s"], 2)])
        emit(f"Learner time against kept rows (of {sampled} sampled; 4 rows per micro-batch)",
             ["sampled rows", "kept rows", "learner work s", "s per kept row", "load + save s"], scaling,
             out.with_name(out.stem + "_kept.json"))


if __name__ == "__main__":
    typer.run(main)
