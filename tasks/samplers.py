"""Generation backends behind one interface: token-id prompts in, completions out.

- `hf`: transformers `generate`, left-padded batches sized by a token budget
  (sequences x (longest prompt + max_new_tokens) <= token_budget); CPU and GPU.
- `vllm`: the GPU production path (`pip install .[vllm]`). vLLM cannot be installed or
  run on CPU-only machines, so this backend is a thin adapter that is not exercised
  there (its test skips where vLLM is absent).

Sampler log-probs are those of the distribution actually sampled from (logits divided
by the temperature, after top-p), one per completion token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm

from tasks.algorithms import pack_by_tokens


@dataclass
class Completion:
    token_ids: list[int]        # generated tokens, up to and including the first stop token
    logprobs: list[float]       # sampler log-prob of each token (empty for greedy decoding)
    finish_reason: str          # stop | length


class Sampler(Protocol):
    def generate(
        self,
        prompts: Sequence[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        greedy: bool = False,
        desc: str = "sample",
    ) -> list[Completion]: ...


def sampled_logprobs(scores: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Log-prob of each sampled token under the processed distribution it was drawn from.

    scores: one [B, V] tensor of processed logits per generation step (`output_scores`);
    tokens: [B, steps]. Step by step, as score[token] - logsumexp(score): the same number
    as log_softmax(...)[token] without stacking a [B, steps, V] tensor (1.6 GB at B=128,
    64 steps and SmolLM2's 49k vocabulary) and normalising all of it."""
    out = torch.empty(tokens.shape, dtype=torch.float32)
    for t, step in enumerate(scores):
        step = step.float()
        picked = step.gather(-1, tokens[:, t : t + 1].to(step.device)).squeeze(-1)
        out[:, t] = (picked - torch.logsumexp(step, dim=-1)).cpu()
    return out


def _cut(tokens: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            return tokens[: i + 1], "stop"
    return tokens, "length"


class HFSampler:
    def __init__(self, model, tokenizer, stop_ids: list[int], *, token_budget: int, max_batch_size: int,
                 group_size: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.pad_id = tokenizer.pad_token_id
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.group_size = group_size  # set: one prompt group per generation call (standard GRPO)

    def batches(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Indices of prompts per generation batch: similar lengths together, token-budgeted;
        or consecutive groups of `group_size` requests when sampling one group per call."""
        if self.group_size:
            return [list(range(s, min(s + self.group_size, len(prompts)))) for s in range(0, len(prompts), self.group_size)]
        lengths = [len(p) + max_new_tokens for p in prompts]
        return pack_by_tokens(lengths, self.token_budget, self.max_batch_size)

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, greedy=False, desc="sample"):
        device = next(self.model.parameters()).device
        results: list[Completion | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc=desc, unit="seq", leave=False)
        for b, idx in enumerate(self.batches(prompts, max_new_tokens)):
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention[row, width - len(prompts[i]) :] = 1
            torch.manual_seed(seed * 100_003 + b)  # reproducible per batch, whatever ran before
            kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.stop_ids),
                output_scores=not greedy,
                return_dict_in_generate=True,
                **kwargs,
            )
            generated = out.sequences[:, width:].cpu()
            if not greedy:
                logprobs = sampled_logprobs(out.scores, generated)
            for row, i in enumerate(idx):
                tokens, reason = _cut(generated[row].tolist(), self.stop_ids)
                lp = logprobs[row, : len(tokens)].tolist() if not greedy else []
                results[i] = Completion(tokens, lp, reason)
            bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]


class VLLMSampler:
    """vLLM backend (GPU only). Loads the policy checkpoint directory given each iteration."""

    def __init__(self, model_path: str, stop_ids: list[int], **engine_kwargs):
        from vllm import LLM  # noqa: PLC0415 - optional dependency

        self.llm = LLM(model=model_path, **engine_kwargs)
        self.stop_ids = stop_ids

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, greedy=False, desc="sample"):
        from vllm import SamplingParams, TokensPrompt  # noqa: PLC0415

        params = SamplingParams(
            temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
            max_tokens=max_new_tokens, seed=seed, logprobs=0, stop_token_ids=self.stop_ids,
        )
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        results = []
        for o in outs:
            c = o.outputs[0]
            lps = [] if greedy else [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
            results.append(Completion(list(c.token_ids), lps, "stop" if c.finish_reason == "stop" else "length"))
        return results


def make_sampler(backend: str, model_path: str, *, device: torch.device, dtype: str, token_budget: int,
                 max_batch_size: int, group_size: int | None = None) -> tuple[Sampler, object]:
    """(sampler, tokenizer) for the policy checkpoint at model_path."""
    from tasks.policy import load_model, load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(model_path)
    if backend == "hf":
        model = load_model(model_path, device, dtype)
        return HFSampler(model, tokenizer, stop_token_ids(tokenizer, model),
                         token_budget=token_budget, max_batch_size=max_batch_size,
                         group_size=group_size), tokenizer
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("sample.backend=vllm needs vLLM on a CUDA machine: pip install '.[vllm]'") from exc
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return VLLMSampler(model_path, ids, dtype=dtype, seed=0), tokenizer
    raise ValueError(f"unknown sample.backend {backend!r}; choose hf or vllm")
