"""Generation backends behind one interface: token-id prompts in, completions out.

- `hf`: transformers `generate`, left-padded batches sized by a token budget
  (sequences x (longest prompt + max_new_tokens) <= token_budget); CPU and GPU.
- `vllm`: the GPU production path (`pip install .[vllm]`). vLLM cannot be installed or
  run on CPU-only machines, so this backend is a thin adapter that is not exercised
  there (its test skips where vLLM is absent).

Every request samples from its own random stream, seeded by (seed, request id): the hf
backend draws the next token by the Gumbel-max trick with that stream's noise, vLLM by its
per-request `SamplingParams.seed`. A completion therefore does not depend on which other
requests share its generation batch, on the token budget, or on how the requests are split
across workers (`sample.workers`): the same seed gives the same rows (up to floating-point
differences between batch shapes).

Both backends sample from exactly the distribution params.yaml names -- logits / temperature,
then top-k, then top-p (tasks/algorithms.processed_logprobs) -- and nothing else: a
checkpoint's own generation_config (Qwen2.5-Instruct sets repetition_penalty, top_k, ...)
is not applied, because the learner cannot apply it and the recorded log-probs would then
describe a distribution the learner never scores. The sampler log-prob of each completion
token is under that processed (truncated, renormalised) distribution, on both backends
(vLLM's `logprobs_mode="processed_logprobs"`); the learner compares it with its own
log-prob under the same processing (TIS, sampler_mismatch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm

from dashflow.core.algorithms import pack_by_tokens, processed_logprobs


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
        top_k: int = 0,
        greedy: bool = False,
        desc: str = "sample",
        request_ids: Sequence[int] | None = None,
    ) -> list[Completion]: ...


def request_seed(seed: int, request_id: int) -> int:
    """The seed of one request's random stream (63 bits, distinct per request)."""
    return (seed * 1_000_003 + request_id * 7_919 + 1) % (1 << 63)


class SeededSampling:
    """A transformers logits processor that samples each row from its own random stream.

    Gumbel-max: argmax(logp + G) with G = -log(E), E ~ Exp(1) drawn from the row's
    generator, is a sample from softmax(logp). The processor returns scores that make the
    (greedy) generation loop pick exactly that token, and records its log-prob."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.logprobs: list[torch.Tensor] = []   # one [B] tensor per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = processed_logprobs(scores, self.temperature, self.top_k, self.top_p)
        noise = torch.stack([torch.empty(logp.shape[-1], device=logp.device).exponential_(generator=g)
                             for g in self.generators])
        choice = (logp - noise.log()).argmax(dim=-1, keepdim=True)
        self.logprobs.append(logp.gather(-1, choice).squeeze(-1).cpu())
        return torch.full_like(scores, float("-inf")).scatter_(-1, choice, 0.0)


def _cut(tokens: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            return tokens[: i + 1], "stop"
    return tokens, "length"


class HFSampler:
    def __init__(self, model, tokenizer, stop_ids: list[int], *, token_budget: int, max_batch_size: int,
                 group_size: int | None = None):
        from transformers import GenerationConfig

        # only our own processor: none of the checkpoint's generation_config (repetition
        # penalty, top_k, ...) may reach the distribution we sample from; transformers fills
        # what a passed config leaves unset from model.generation_config, so ours stands in
        # for it during generate (and the model, possibly the learner's, is left as it was)
        self.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id,
                                                  eos_token_id=sorted(set(stop_ids)), pad_token_id=tokenizer.pad_token_id)
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
    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, top_k=0, greedy=False, desc="sample",
                 request_ids=None):
        own, self.model.generation_config = self.model.generation_config, self.generation_config
        try:
            return self._generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed, top_k=top_k, greedy=greedy, desc=desc, request_ids=request_ids)
        finally:
            self.model.generation_config = own

    def _generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, top_k, greedy, desc, request_ids):
        from transformers import LogitsProcessorList

        device = next(self.model.parameters()).device
        ids = list(request_ids) if request_ids is not None else list(range(len(prompts)))
        results: list[Completion | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc=desc, unit="seq", leave=False)
        for idx in self.batches(prompts, max_new_tokens):
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention[row, width - len(prompts[i]) :] = 1
            sampling = None if greedy else SeededSampling(
                [request_seed(seed, ids[i]) for i in idx], temperature, top_k, top_p, device)
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.stop_ids),
                do_sample=False,  # greedy, or greedy over SeededSampling's choice
                logits_processor=LogitsProcessorList([sampling] if sampling else []),
                return_dict_in_generate=True,
            )
            generated = out.sequences[:, width:].cpu()
            logprobs = torch.stack(sampling.logprobs, dim=1) if sampling else None
            for row, i in enumerate(idx):
                tokens, reason = _cut(generated[row].tolist(), self.stop_ids)
                lp = logprobs[row, : len(tokens)].tolist() if sampling else []
                results[i] = Completion(tokens, lp, reason)
            bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]


def completions_from_vllm(outputs, greedy: bool) -> list[Completion]:
    """vLLM `RequestOutput`s (one completion each, `logprobs=0`) -> rollout completions.

    `CompletionOutput.logprobs` holds, per generated token, a dict token id -> `Logprob`
    that contains the sampled token; with the engine's `logprobs_mode="processed_logprobs"`
    that is its log-prob after temperature, top-k and top-p, the same quantity the hf
    backend records. vLLM keeps the stop token in `token_ids` when it stops on `stop_token_ids`."""
    results = []
    for request in outputs:
        c = request.outputs[0]
        tokens = list(c.token_ids)
        if greedy:
            lps = []
        else:
            if c.logprobs is None or len(c.logprobs) != len(tokens):
                raise ValueError(f"vLLM request {request.request_id}: expected one log-prob entry per token "
                                 f"({len(tokens)}), got {None if c.logprobs is None else len(c.logprobs)}")
            lps = [float(step[t].logprob) for t, step in zip(tokens, c.logprobs)]
        results.append(Completion(tokens, lps, "stop" if c.finish_reason == "stop" else "length"))
    return results


class VLLMSampler:
    """vLLM backend (GPU only): one engine per sampling worker, loading the policy
    checkpoint directory of the iteration. Written against vLLM >= 0.10.2 (the engine's
    `logprobs_mode`); not run on the CPU machines this project is tested on."""

    def __init__(self, model_path: str, stop_ids: list[int], *, dtype: str, tensor_parallel: int = 1,
                 gpu_memory_utilization: float = 0.85):
        from vllm import LLM  # noqa: PLC0415 - optional dependency

        self.llm = LLM(model=model_path, dtype=dtype, tensor_parallel_size=tensor_parallel,
                       gpu_memory_utilization=gpu_memory_utilization, logprobs_mode="processed_logprobs",
                       generation_config="vllm",    # not the checkpoint's sampling defaults (see module doc)
                       enable_prefix_caching=True)  # a group's G requests share their prompt
        self.stop_ids = stop_ids

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, top_k=0, greedy=False, desc="sample",
                 request_ids=None):
        from vllm import SamplingParams, TokensPrompt  # noqa: PLC0415

        ids = list(request_ids) if request_ids is not None else list(range(len(prompts)))
        params = [SamplingParams(temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                 top_k=-1 if greedy or not top_k else top_k, repetition_penalty=1.0,
                                 max_tokens=max_new_tokens, logprobs=None if greedy else 0,
                                 seed=None if greedy else request_seed(seed, i), stop_token_ids=self.stop_ids)
                  for i in ids]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=True)
        return completions_from_vllm(outs, greedy)


def make_sampler(backend: str, model_path: str, *, device: torch.device, dtype: str, token_budget: int,
                 max_batch_size: int, group_size: int | None = None, tensor_parallel: int = 1) -> tuple[Sampler, object]:
    """(sampler, tokenizer) for the policy checkpoint at model_path."""
    from dashflow.core.policy import inference_model, load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(model_path)
    if backend == "hf":
        model = inference_model(model_path, device, dtype)
        return HFSampler(model, tokenizer, stop_token_ids(tokenizer, model.generation_config),
                         token_budget=token_budget, max_batch_size=max_batch_size,
                         group_size=group_size), tokenizer
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("sample.backend=vllm needs vLLM on a CUDA machine: pip install '.[vllm]'") from exc
        from transformers import AutoConfig, GenerationConfig

        stops = stop_token_ids(tokenizer, GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_path)))
        return VLLMSampler(model_path, stops, dtype=dtype, tensor_parallel=tensor_parallel), tokenizer
    raise ValueError(f"unknown sample.backend {backend!r}; choose hf or vllm")
