"""Algorithm math as small pure tensor functions, registered by name.

Stages pick these from params by name (`advantage.estimator: grpo`); nothing here
knows about files, Prefect or models. Shapes are in the docstrings: G = group size
(samples per prompt), B = sequences in a micro-batch, T = completion tokens.

Deliberate simplifications (as in DASH's reference code, with K=1 and no KL):
- on-policy, one optimizer step per sampled batch, so the policy-gradient loss uses
  log-probs directly (the PPO ratio is identically 1 and its clipping never triggers);
- no KL penalty (DASH: dropping it gives shorter answers and higher accuracy);
- token-level normalisation: every kept completion token in the iteration weighs the same.
"""

from __future__ import annotations

from typing import Callable

import torch

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}


def register_advantage(name: str):
    def wrap(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def register_loss(name: str):
    def wrap(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


def get(registry: dict[str, Callable], name: str, what: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


# ---------------------------------------------------------------- advantages
# Each takes rewards [num_groups, G] (float) and returns (advantage, group_mean, group_std),
# shapes [num_groups, G], [num_groups], [num_groups]. A group whose rewards are all equal
# carries no signal and gets advantage 0 under every estimator.


def _group_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = rewards.mean(dim=1)
    # sample std (Bessel-corrected), as torch.std and the GRPO/DASH reference code; 0 for G = 1
    std = rewards.std(dim=1) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return mean, std


@register_advantage("grpo")
def grpo_advantage(rewards: torch.Tensor, epsilon: float = 1e-6):
    """GRPO / DASH: A = (r - mean_group) / (std_group + epsilon)."""
    mean, std = _group_stats(rewards)
    adv = (rewards - mean[:, None]) / (std[:, None] + epsilon)
    return adv, mean, std


@register_advantage("drgrpo")
def drgrpo_advantage(rewards: torch.Tensor, epsilon: float = 1e-6):
    """Dr.GRPO: A = r - mean_group (no std scaling, which biases towards easy/hard groups)."""
    mean, std = _group_stats(rewards)
    return rewards - mean[:, None], mean, std


@register_advantage("rloo")
def rloo_advantage(rewards: torch.Tensor, epsilon: float = 1e-6):
    """RLOO: A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_group); 0 for G = 1."""
    mean, std = _group_stats(rewards)
    g = rewards.shape[1]
    if g < 2:
        return torch.zeros_like(rewards), mean, std
    return (rewards - mean[:, None]) * (g / (g - 1)), mean, std


# ---------------------------------------------------------------- batching


def pack_by_tokens(lengths: list[int], token_budget: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices per batch: rows sorted by length (then index), each batch's rows x longest row
    <= token_budget (a longer single row still gets a batch of its own). Padding cost is
    what a batch pays, so similar lengths go together."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        full = max_rows is not None and len(current) >= max_rows
        if current and (full or (len(current) + 1) * lengths[i] > token_budget):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


# ---------------------------------------------------------------- gradient filter


def filter_mask(advantages: torch.Tensor, threshold: float) -> torch.Tensor:
    """DASH gradient filtering: keep rows with |A| > threshold. [N] -> bool [N]."""
    return advantages.abs() > threshold


# ---------------------------------------------------------------- policy loss


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each target token. logits [B, T, V], targets [B, T] -> [B, T].

    Logits are divided by the sampling temperature so the learner scores tokens under
    the same distribution the sampler drew them from.
    """
    logits = logits.float() / temperature
    return torch.gather(torch.log_softmax(logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


@register_loss("token_mean")
def policy_gradient_loss(
    logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, normalizer: float
) -> torch.Tensor:
    """Token-level REINFORCE loss: -sum_{b,t} A_b * logp_{b,t} * mask_{b,t} / normalizer.

    logprobs [B, T], advantages [B], mask [B, T] (1 on completion tokens), normalizer =
    completion tokens in the whole optimizer batch, so that summing the micro-batch
    losses (gradient accumulation) gives the token mean over the batch.
    """
    return -(advantages[:, None] * logprobs * mask).sum() / normalizer
