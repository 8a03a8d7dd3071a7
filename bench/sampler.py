"""Benchmark: sampler efficiency -- generated tokens/s of the `sample` stage's sampler
against a bare `model.generate` loop, at the same batch, prompts and lengths, over batch
sizes. The curve that motivates preemptive sampling: throughput grows with the batch.

    python bench/sampler.py                       # batch 1..64, 64 new tokens, CPU
    python bench/sampler.py --batches 1,8,32,128  # any sizes (GPU: --device cuda)
    python bench/sampler.py --dtypes float32,bfloat16   # the policy's weights in each dtype, one table
    python bench/sampler.py --tiny                # seconds; what CI runs
    python bench/sampler.py --backends hf,vllm --dtypes float32,bfloat16   # both samplers (`make vllm`)

The stage path is `dashflow.core.samplers.HFSampler.generate` (left padding, the per-request seed,
the sampled tokens' log-probs from the processed scores) or `VLLMSampler.generate` (the run's
engine process, its requests and replies over the pipe included); the bare loop is one
`model.generate` call on the same left-padded batch with the same seed, without scores.
Both count the tokens up to and including the first stop token. Model loading and Parquet
writing are not in either number (bench/overhead.py measures those).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import typer
from _common import arithmetic_prompts, base_policy_path, emit, gpu_overrides


def bare_generate(model, tokenizer, prompts, stop_ids, *, max_new_tokens, temperature, seed) -> int:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        att[r, width - len(p):] = 1
    device = next(model.parameters()).device
    torch.manual_seed(seed * 100_003)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop_ids))
    tokens = 0
    for row in out[:, width:].tolist():
        stops = [i for i, t in enumerate(row) if t in stop_ids]
        tokens += stops[0] + 1 if stops else len(row)
    return tokens


def main(
    batches: str = typer.Option("1,2,4,8,16,32,64", help="comma-separated batch sizes"),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.9),
    reps: int = typer.Option(2, help="timed repetitions per size and path (median)"),
    device: str = typer.Option("auto"),
    dtypes: str = typer.Option("", help="comma-separated weight dtypes to compare (default: float32; --gpu: bfloat16)"),
    backends: str = typer.Option("hf", help="comma-separated: hf, vllm (the engine of .venv-vllm, `make vllm`)"),
    tiny: bool = typer.Option(False, help="batch 1,2,4 and 8 new tokens"),
    gpu: bool = typer.Option(False, help="Qwen2.5-0.5B in bfloat16 on CUDA (DASHFLOW_GPU_MODEL)"),
    out: Path = typer.Option(Path("bench/results/sampler.json")),
):
    from dashflow.core import policy, samplers

    sizes = [1, 2, 4] if tiny else [int(b) for b in batches.split(",")]
    max_new_tokens = 8 if tiny else max_new_tokens
    cfg = gpu_overrides() if gpu else {"model.name": "embedded:smollm2-135m-instruct", "model.dtype": "float32"}
    path = base_policy_path(cfg["model.name"])
    dev = policy.pick_device("cuda" if gpu else device)
    tokenizer = policy.load_tokenizer(path)
    all_prompts = arithmetic_prompts(tokenizer, max(sizes))
    kinds = [b.strip() for b in backends.split(",")]
    rows, engines = [], []
    for dtype in [d.strip() for d in (dtypes or cfg["model.dtype"]).split(",")]:
        model = policy.load_model(path, dev, dtype)
        stops = set(policy.stop_token_ids(tokenizer, model.generation_config))
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=0, top_p=1.0)
        bare: dict[int, tuple[int, float]] = {}
        for kind in kinds:
            if kind == "vllm":
                samplers.close_engine()  # a fresh engine per dtype: its start is measured
                t0 = time.perf_counter()
                sampler, _ = samplers.make_sampler({"backend": "vllm", "token_budget": 16384, "max_batch_size": max(128, max(sizes))},
                                                   path, device=dev, dtype=dtype)
                first = time.perf_counter() - t0
                loads = []
                for _ in range(3):  # the per-iteration cost: the same weights loaded in place again
                    t0 = time.perf_counter()
                    sampler.engine.call("load", path=path)
                    loads.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                sampler.engine.verify(path, samplers.sync_tolerance(None, dtype))
                verify_s = time.perf_counter() - t0
                engines.append([dtype, round(sampler.engine.start_s, 1), round(first, 1), round(statistics.median(loads), 2),
                                round(verify_s, 2), f"{sampler.sync['probe_mismatch']:.2e}"])
            for b in sizes:
                prompts = all_prompts[:b]
                if kind == "hf":
                    sampler = samplers.HFSampler(model, tokenizer, sorted(stops), token_budget=10**9, max_batch_size=b)
                sampler.generate(prompts[:1], desc="warm-up", **kw)
                stage_t, bare_t, stage_tok, need_bare = [], [], 0, b not in bare
                for _ in range(reps):  # alternate so drift hits both paths alike
                    t0 = time.perf_counter()
                    comps = sampler.generate(prompts, desc=f"batch {b}", **kw)
                    stage_t.append(time.perf_counter() - t0)
                    stage_tok = sum(len(c.token_ids) for c in comps)
                    if need_bare:
                        t0 = time.perf_counter()
                        tok = bare_generate(model, tokenizer, prompts, stops, max_new_tokens=max_new_tokens,
                                            temperature=temperature, seed=0)
                        bare_t.append(time.perf_counter() - t0)
                if bare_t:
                    bare[b] = (tok, tok / statistics.median(bare_t))
                s_rate, r = stage_tok / statistics.median(stage_t), bare[b][1]
                rows.append([kind, dtype, b, stage_tok, bare[b][0], round(s_rate, 1), round(r, 1), f"{s_rate / r:.2f}x"])
                print(f"{kind} {dtype} batch {b}: stage {s_rate:.1f} tok/s, bare {r:.1f} tok/s", flush=True)
        if "vllm" in kinds:
            samplers.close_engine()
    emit(f"Sampler throughput, {max_new_tokens} new tokens, T={temperature} ({dev})",
         ["sampler", "weights", "batch", "stage tokens", "bare tokens", "stage tok/s", "bare generate tok/s",
          "stage / bare"], rows, out, engines=engines)
    if engines:
        from _common import markdown

        print("\nvLLM engine: start once per run, then each new policy loaded in place and checked\n")
        print(markdown(["weights", "engine start s", "first sampler s (process, start, probe)", "load in place s (median of 3)",
                        "probe check s", "probe mismatch"], engines))


if __name__ == "__main__":
    typer.run(main)
