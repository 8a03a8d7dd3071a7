"""Token sequences to padded tensors and back: what the learner and the reference scorer batch.

`collate` lays prompt + completion rows out right-padded with a completion mask, `place`
puts per-completion-token values (log-probs) into that layout, `take` reads them back, and
`completion_logprobs` scores completions under a model in token-budgeted batches.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dashflow.core.algorithms import pack_by_tokens, processed_target_logprobs, token_logprobs


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Right-padded input_ids [B, L], attention [B, L], targets [B, L-1], completion mask [B, L-1].

    Position t of targets/mask is the token predicted from position t, so a completion's
    tokens sit at [len(prompt) - 1, len(prompt) + len(completion) - 1).
    """
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        attention[b, : len(p) + len(c)] = 1
        mask[b, len(p) - 1 : len(p) + len(c) - 1] = 1.0
    return input_ids, attention, input_ids[:, 1:], mask


def place(values: list[list[float]], prompts: list[list[int]], width: int) -> torch.Tensor:
    """Per-completion-token values (e.g. log-probs) laid out like `collate`'s mask. -> [B, width]."""
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for b, (v, p) in enumerate(zip(values, prompts)):
        if v:
            out[b, len(p) - 1 : len(p) - 1 + len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def take(values: torch.Tensor, mask: torch.Tensor, prompts: list[list[int]]) -> list[list[float]]:
    """Inverse of `place`: the completion-token values of each row of a [B, width] tensor."""
    return [row[len(p) - 1 : len(p) - 1 + int(m.sum())].tolist() for row, m, p in zip(values, mask, prompts)]


@torch.no_grad()
def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], *, pad_id: int,
                        temperature: float, token_budget: int, desc: str, top_k: int = 0,
                        top_p: float = 1.0) -> tuple[list[list[float]], list[list[float]]]:
    """Log-prob of every completion token under `model` (no gradient), batched by a token
    budget: (under logits / temperature, under the sampler's processed distribution with
    top_k / top_p). The two are the same lists when neither truncates."""
    device = next(model.parameters()).device
    truncated = bool(top_k) or top_p < 1.0
    plain: list[list[float]] = [[] for _ in prompts]
    processed: list[list[float]] = [[] for _ in prompts] if truncated else plain
    batches = pack_by_tokens([len(p) + len(c) for p, c in zip(prompts, completions)], token_budget)
    for idx in tqdm(batches, desc=desc, unit="batch", leave=False):
        ps = [prompts[i] for i in idx]
        input_ids, attention, targets, mask = collate(ps, [completions[i] for i in idx], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, :-1]
        targets, mask_d = targets.to(device), mask.to(device)
        for i, row in zip(idx, take(token_logprobs(logits, targets, temperature).cpu(), mask, ps)):
            plain[i] = row
        if truncated:
            lp = processed_target_logprobs(logits, targets, mask_d, temperature, top_k, top_p)
            for i, row in zip(idx, take(lp.cpu(), mask, ps)):
                processed[i] = row
    return plain, processed
