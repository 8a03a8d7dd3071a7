"""Stage `learn`: one policy update from the kept rows, in small accumulated micro-batches.

The kept rows (after gradient filtering) are packed into micro-batches of at most
`learn.micro_batch_tokens` padded tokens; each micro-batch's token-level policy-gradient
loss is normalised by the completion tokens of the whole batch, so accumulating the
gradients gives exactly the token-mean loss of the iteration's batch. Then one AdamW
step (DASH: K = 1, on-policy). The AdamW state is saved beside the weights and loaded by
the next iteration, so the run follows one optimizer trajectory across stages.

If no row was kept, the policy is passed on unchanged and the manifest says so. A
non-finite loss or gradient stops the stage before anything is written, so a good
checkpoint is never replaced by a bad one.

Inputs : iter-i/kept, the policy written by iteration i-1 (with optimizer.pt after the first)
Output : iter-i/policy/ (model.safetensors, config, tokenizer, optimizer.pt)
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dashflow.config import Params
from tasks import algorithms, schema, store
from tasks import policy as policy_mod
from tasks.prefecting import stage_task

OPTIMIZER_FILE = "optimizer.pt"


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Right-padded input_ids [B, L], attention [B, L], targets [B, L-1], completion mask [B, L-1]."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        attention[b, : len(p) + len(c)] = 1
        mask[b, len(p) - 1 : len(p) + len(c) - 1] = 1.0  # position t predicts token t+1
    return input_ids, attention, input_ids[:, 1:], mask


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout = params.layout
    cfg = params.stage("learn", iteration)
    temperature = params.stage("sample", iteration)["temperature"]
    src = layout.stage_dir("filter", iteration)
    prev = layout.policy(iteration - 1)
    label = f"learn@{iteration}"

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        table = store.read_stage(src, schema.KEPT, stage=label)
        if table.num_rows == 0:
            print(f"{label}: no rows kept after filtering -- no update; the policy is passed on unchanged")
            for f in prev.iterdir():
                if f.is_file() and f.name != store.MANIFEST:
                    store.link_or_copy(f, tmp / f.name)
            return {"stats": {"updated": False, "reason": "no rows kept", "rows": 0}, "timing": {"work_s": 0.0}}

        device = policy_mod.pick_device(params["run"]["device"])
        model = policy_mod.load_model(prev, device, params["model"]["dtype"])
        tokenizer = policy_mod.load_tokenizer(prev)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                      weight_decay=cfg["weight_decay"])
        if (prev / OPTIMIZER_FILE).exists():
            optimizer.load_state_dict(torch.load(prev / OPTIMIZER_FILE, map_location=device))
        loss_fn = algorithms.get(algorithms.POLICY_LOSSES, cfg["loss_agg"], "loss aggregation")

        prompts = table.column("prompt_token_ids").to_pylist()
        completions = table.column("completion_token_ids").to_pylist()
        advantages = torch.tensor(table.column("advantage").to_pylist(), dtype=torch.float32)
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        normalizer = float(sum(len(c) for c in completions))
        batches = algorithms.pack_by_tokens(lengths, cfg["micro_batch_tokens"])
        t1 = time.perf_counter()

        total_loss, tokens_seen = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        for idx in tqdm(batches, desc=label, unit="micro-batch", leave=False):
            input_ids, attention, targets, mask = collate([prompts[i] for i in idx], [completions[i] for i in idx],
                                                          tokenizer.pad_token_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, :-1]
            logprobs = algorithms.token_logprobs(logits, targets.to(device), temperature)
            loss = loss_fn(logprobs, advantages[idx].to(device), mask.to(device), normalizer)
            loss.backward()
            total_loss += loss.item()
            tokens_seen += int(attention.sum())
        max_norm = cfg["max_grad_norm"] or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
            raise store.StageError(f"{label}: non-finite loss ({total_loss}) or gradient norm ({grad_norm}); "
                                   f"the previous checkpoint {prev} is kept and nothing is written")
        optimizer.step()
        t2 = time.perf_counter()

        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        return {
            "stats": {"updated": True, "rows": table.num_rows, "completion_tokens": int(normalizer),
                      "micro_batches": len(batches), "loss": total_loss, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_seen / max(t2 - t1, 1e-9)},
            "timing": {"load_s": t1 - t0, "work_s": t2 - t1, "save_s": time.perf_counter() - t2},
        }

    return store.run_stage(
        "learn", iteration, layout.stage_dir("learn", iteration), inputs={"kept": src, "policy": prev},
        params={"learn": cfg, "temperature": temperature, "dtype": params["model"]["dtype"]},
        code=store.code_digest(sys.modules[__name__], algorithms, policy_mod, schema), build=build, force=force,
    )


# No retries: a learner step must not apply twice (its output only lands when complete,
# so a rerun after a failure starts again from the previous checkpoint, never on top of a half step).
learn_task = stage_task(run, "learn")
