"""Algorithm math as small pure tensor functions, registered by name.

(Over 500 lines on purpose: every estimator, objective, correction, KL estimator and
aggregation sits beside its registry, each a few lines with its shapes; the registries are
the one place a reader looks them up, as in verl's core_algos.py.)

Stages pick these from params by name (`advantage.estimator: grpo`,
`learn.loss_agg: token_mean`, `learn.kl_estimator: k3`); nothing here knows about files,
Prefect or models. Shapes are in the docstrings: G = group size (samples per prompt),
B = sequences in a micro-batch, T = completion tokens.

The learner's per-token loss is built from these pieces:

    loss_bt = objective_bt * w_bt + beta * KL_bt
    objective_bt: one of POLICY_OBJECTIVES (`learn.objective`), r_bt = exp(logp_bt - old_logp_bt):
      ppo    max(-A_b r_bt, -A_b clip(r_bt, 1 - eps_low, 1 + eps_high))    (PPO/GRPO, DAPO clip-higher)
      gspo   the same with the sequence ratio s_b = exp(mean_t log r_bt) for every token of b
      cispo  -sg(min(r_bt, cap)) A_b logp_bt                                (no token's gradient dropped)
    w_bt = one of MISMATCH_CORRECTIONS of exp(old_logp - sampler_logp)    (sampler mismatch, optional)
    KL_bt = k1, k2 or k3 estimate on completion tokens only  (optional, off by default)

and reduced over the optimizer batch by one of the LOSS_AGGREGATIONS. With one optimizer
step per sampled batch (DASH, K = 1) old_logp = logp.detach(), so r = 1, clipping never
triggers and the gradient is exactly plain policy gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}
LOSS_AGGREGATIONS: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
POLICY_OBJECTIVES: dict[str, Callable] = {}
MISMATCH_CORRECTIONS: dict[str, Callable] = {}


def _register(registry: dict[str, Callable], name: str):
    """Register `fn` under `name`; a second function under a name already taken is refused."""
    if name in registry:
        raise ValueError(f"{name!r} is registered already (as {registry[name].__name__})")

    def wrap(fn):
        registry[name] = fn
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


@_register(ADVANTAGE_ESTIMATORS, "grpo")
def grpo_advantage(rewards: torch.Tensor, epsilon: float = 1e-6):
    """GRPO / DASH: A = (r - mean_group) / (std_group + epsilon)."""
    mean, std = _group_stats(rewards)
    adv = (rewards - mean[:, None]) / (std[:, None] + epsilon)
    return adv, mean, std


@_register(ADVANTAGE_ESTIMATORS, "drgrpo")
def drgrpo_advantage(rewards: torch.Tensor, epsilon: float = 1e-6):
    """Dr.GRPO: A = r - mean_group (no std scaling, which biases towards easy/hard groups)."""
    mean, std = _group_stats(rewards)
    return rewards - mean[:, None], mean, std


@_register(ADVANTAGE_ESTIMATORS, "rloo")
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


def plan_steps(groups: list[str], update: str, steps: int) -> list[list[str]]:
    """The prompt groups of each optimizer step over one sampled batch. `groups` lists every
    group the sampler produced, in order -- including groups the filter dropped whole, so a
    step's normaliser and the number of steps do not depend on what was filtered.

    multi: `steps` passes over all groups (PPO epochs; the paper's "Multi"; K = 1: one step)
    mini: the groups split into `steps` contiguous mini-batches of whole groups ("Mini")
    per_group: one step per prompt group (an option, not one of the paper's arms)
    """
    order: list[str] = list(dict.fromkeys(groups))
    if update == "multi":
        return [list(order) for _ in range(max(steps, 1))]
    if update == "per_group":
        return [[g] for g in order]
    if update == "mini":
        k = max(1, min(steps, len(order)))
        cuts = [round(j * len(order) / k) for j in range(k + 1)]
        return [order[cuts[j]:cuts[j + 1]] for j in range(k)]
    raise ValueError(f"unknown learn.update {update!r}; choose multi, mini or per_group")


def planned_steps(update: str, steps: int, groups: int) -> int:
    """Optimizer steps one sampled batch of `groups` prompt groups gives (see plan_steps)."""
    return len(plan_steps([str(g) for g in range(groups)], update, steps))


# ---------------------------------------------------------------- learning-rate schedule


def lr_factor(schedule: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based, counted over
    the whole run), as transformers' get_{constant,linear,cosine}_schedule_with_warmup:
    step / warmup during warm-up, then 1 (constant), (total - step) / (total - warmup)
    (linear, to 0 at `total_steps`) or half a cosine from 1 to 0 (cosine)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learn.lr_schedule {schedule!r}; choose constant, linear or cosine")


# ---------------------------------------------------------------- gradient filter


def filter_mask(advantages: torch.Tensor, threshold: float) -> torch.Tensor:
    """DASH gradient filtering: keep rows with |A| > threshold. [N] -> bool [N]."""
    return advantages.abs() > threshold


# ---------------------------------------------------------------- dynamic sampling (DAPO)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """A group carries signal when its rewards are not all equal (every estimator gives an
    all-equal group advantage 0). rewards [num_groups, G] -> bool [num_groups]."""
    return (rewards != rewards[:, :1]).any(dim=1)


def gate_groups(informative: list[bool], target: int) -> list[int]:
    """DAPO's dynamic-sampling batch: the indices of the first `target` informative groups in
    sampled order (verl's filter_groups keeps the first train_batch_size of them); fewer when
    the rounds found fewer."""
    return [i for i, ok in enumerate(informative) if ok][:target]


def dynamic_target(sample_cfg: dict) -> int | None:
    """The informative groups dynamic sampling fills the batch with (`sample.dynamic_groups`,
    null = `sample.prompts_per_iteration`); None when it is off (`sample.dynamic_rounds: 0`)."""
    if not int(sample_cfg["dynamic_rounds"]):
        return None
    return int(sample_cfg["dynamic_groups"] or sample_cfg["prompts_per_iteration"])


def rounds_needed(found: int, target: int, rounds_done: int, max_rounds: int) -> bool:
    """Whether dynamic sampling samples another round: fewer than `target` informative groups
    found so far and fewer than `max_rounds` extra rounds run (round 0 is not counted)."""
    return found < target and rounds_done < max_rounds


# ---------------------------------------------------------------- policy loss


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each target token. logits [B, T, V], targets [B, T] -> [B, T].

    Logits are divided by the sampling temperature so the learner scores tokens under
    the same distribution the sampler drew them from.
    """
    logits = logits.float() / temperature
    return torch.gather(torch.log_softmax(logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def processed_logprobs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the distribution a sampler draws from: logits / temperature, then top-k,
    then top-p (the smallest set of most likely tokens whose probability reaches top_p),
    renormalised; -inf outside. [..., V] -> [..., V]. The order and meaning of transformers'
    warpers and of vLLM's sampler (whose `processed_logprobs` are these values)."""
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    if top_k and 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, index = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = (probs.cumsum(-1) - probs) >= top_p     # mass before this token already reaches top_p
        drop[..., 0] = False
        scores = scores.scatter(-1, index, ordered.masked_fill(drop, float("-inf")))
    return torch.log_softmax(scores, dim=-1)


@torch.no_grad()
def processed_target_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float,
                              top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`processed_logprobs` of each target token, computed at the mask's positions only (no
    gradient; -inf where the token lies outside top-k/top-p). logits [B, T, V], targets and
    mask [B, T] -> [B, T], 0 off the mask."""
    at = mask.bool()
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    lp = processed_logprobs(logits.detach()[at], temperature, top_k, top_p)
    out[at] = lp.gather(-1, targets[at].unsqueeze(-1)).squeeze(-1)
    return out


def policy_gradient_loss(
    logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, normalizer: float
) -> torch.Tensor:
    """Plain token-level REINFORCE loss: -sum_{b,t} A_b * logp_{b,t} * mask_{b,t} / normalizer.

    logprobs [B, T], advantages [B], mask [B, T] (1 on completion tokens). The reference
    the clipped objective must reduce to when K = 1 (tested).
    """
    return -(advantages[:, None] * logprobs * mask).sum() / normalizer


@dataclass(frozen=True)
class LossSettings:
    """How the policy loss is formed: one learn stage's settings (`learn.*`), the same for every micro-batch."""

    agg: str                        # LOSS_AGGREGATIONS name (learn.loss_agg)
    clip_eps: float                 # PPO's lower clip range
    clip_eps_high: float            # DAPO's clip-higher upper range
    kl_coef: float = 0.0            # beta of the KL penalty to the reference policy
    kl_estimator: str = "k3"        # KL_ESTIMATORS name
    objective: str = "ppo"          # POLICY_OBJECTIVES name
    cispo_cap: float = 5.0          # CISPO's cap on the importance weight

    @classmethod
    def from_config(cls, cfg) -> LossSettings:
        """From the learn stage's config (a LearnConfig, dashflow/core/stage_configs.py)."""
        return cls(agg=cfg.loss_agg, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, kl_coef=cfg.kl_coef,
                   kl_estimator=cfg.kl_estimator, objective=cfg.objective, cispo_cap=cfg.cispo_cap)


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's tensors. B rows, T completion-aligned positions."""

    logprobs: torch.Tensor                      # [B, T] the policy now (with gradient)
    old_logprobs: torch.Tensor                  # [B, T] the policy before this batch's first step
    advantages: torch.Tensor                    # [B]
    mask: torch.Tensor                          # [B, T] 1 on completion tokens
    tis_weights: torch.Tensor | None = None     # [B, T] the sampler-mismatch correction (MISMATCH_CORRECTIONS)
    ref_logprobs: torch.Tensor | None = None    # [B, T] the reference policy (with kl_coef > 0)


def policy_loss(x: LossInputs, settings: LossSettings, consts: dict,
                ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The RL objective of one micro-batch, as the learner minimises it -> (loss, metrics).

    Per token: the policy objective `settings.objective` (POLICY_OBJECTIVES: ppo's clipped
    surrogate with DAPO's clip-higher, gspo, cispo), times the correction weight
    `x.tis_weights` if any, plus kl_coef x the KL estimator to `x.ref_logprobs` if any; then
    reduced by the loss aggregation `settings.agg` with the batch's constants `consts`
    (num_sequences, num_tokens, max_new_tokens: the batch as sampled). metrics: name ->
    (sum, count) over the mask, so a learner sums them over micro-batches (clip_fraction:
    tokens whose clipped or capped branch was taken -- for gspo every token of a clipped
    sequence; approx_kl_to_sampling; tis_weight and mismatch_masked, the tokens whose
    correction weight is 0; kl_to_reference). With one on-policy step (old = logprobs
    detached, no correction, no KL) the gradient of every objective is that of
    `policy_gradient_loss`, under every aggregation (tested).
    """
    logprobs, old_logprobs, mask = x.logprobs, x.old_logprobs, x.mask
    fn = get(POLICY_OBJECTIVES, settings.objective, "learn.objective")
    per_token, clipped = fn(logprobs, old_logprobs, x.advantages, mask, eps_low=settings.clip_eps,
                            eps_high=settings.clip_eps_high, cap=settings.cispo_cap)
    tokens = mask.sum()
    metrics = {}
    with torch.no_grad():
        metrics["clip_fraction"] = ((clipped.float() * mask).sum(), tokens)
        metrics["approx_kl_to_sampling"] = ((kl_k3(logprobs, old_logprobs, mask) * mask).sum(), tokens)
    if x.tis_weights is not None:
        per_token = per_token * x.tis_weights
        with torch.no_grad():
            metrics["tis_weight"] = ((x.tis_weights * mask).sum(), tokens)
            metrics["mismatch_masked"] = (((x.tis_weights == 0).float() * mask).sum(), tokens)
    if x.ref_logprobs is not None:
        kl = get(KL_ESTIMATORS, settings.kl_estimator, "KL estimator")(logprobs, x.ref_logprobs, mask)
        per_token = per_token + float(settings.kl_coef) * kl
        with torch.no_grad():
            metrics["kl_to_reference"] = ((kl * mask).sum(), tokens)
    return get(LOSS_AGGREGATIONS, settings.agg, "loss aggregation")(per_token, mask, **consts), metrics


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                               at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` [B, T] and, from the same log-softmax, the entropy at the positions
    of the bool mask `at` [B, T] -> [N] (a metric: no gradient). One pass over the
    [B, T, V] logits instead of two."""
    logsm = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = torch.gather(logsm, -1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        picked = logsm.detach()[at]
        entropy = -(picked.exp() * picked).sum(-1)
    return logp, entropy


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped objective per token, as a loss (to minimise), with DAPO's clip-higher.

    logprobs, old_logprobs [B, T], advantages [B] -> (loss [B, T], clipped [B, T] bool).
    loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = exp(logp - old_logp);
    `clipped` marks tokens where the clipped branch is taken (zero gradient there).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


# Each takes logprobs, old_logprobs [B, T], advantages [B], mask [B, T] and the clip settings,
# and returns (per-token loss [B, T], clipped [B, T] bool: where the clipped or capped branch
# was taken). With one on-policy step (old = logprobs detached) every ratio is 1 and nothing clips.


@_register(POLICY_OBJECTIVES, "ppo")
def ppo_objective(logprobs, old_logprobs, advantages, mask, *, eps_low: float, eps_high: float, cap: float):
    """PPO/GRPO: the token-level clipped surrogate (`clipped_surrogate`, DAPO's clip-higher)."""
    return clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high)


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's log s_b = mean over b's completion tokens of (logp - old_logp), [B, T] -> [B]
    (the log of the geometric mean of the token ratios; 0 for a row without tokens)."""
    on = mask > 0
    d = torch.where(on, logprobs - old_logprobs, torch.zeros_like(logprobs))
    return d.sum(1) / on.sum(1).clamp(min=1)


@_register(POLICY_OBJECTIVES, "gspo")
def gspo_objective(logprobs, old_logprobs, advantages, mask, *, eps_low: float, eps_high: float, cap: float):
    """GSPO (Zheng et al. 2025; TRL `importance_sampling_level="sequence"`): the clipped
    surrogate of the sequence ratio s_b = exp(mean_t log r_bt), clipped per sequence, the same
    value on every token of b (so the gradient reaches each token through the mean: d s_b =
    s_b mean_t d logp_bt). The GSPO paper clips at 3e-4 / 4e-4, not PPO's 0.2."""
    s = torch.exp(sequence_log_ratio(logprobs, old_logprobs, mask))[:, None]
    adv = advantages[:, None]
    unclipped = -adv * s
    clipped = -adv * torch.clamp(s, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped).expand_as(logprobs)
    return loss, (clipped > unclipped).expand_as(logprobs)


@_register(POLICY_OBJECTIVES, "cispo")
def cispo_objective(logprobs, old_logprobs, advantages, mask, *, eps_low: float, eps_high: float, cap: float):
    """CISPO (MiniMax-M1; TRL and verl `cispo`): -sg(min(r_bt, cap)) A_b logp_bt. The ratio
    is capped and detached and multiplies a REINFORCE log-prob gradient, so a token whose
    ratio is capped still gets a gradient (PPO's clip zeroes it); `cap` is the ratio's upper
    bound (ScaleRL's epsilon_max, 5), there is no lower one. `clipped`: ratio > cap."""
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    weight = torch.clamp(ratio, max=cap)
    return -weight * advantages[:, None] * logprobs, ratio > cap


# Each takes log-probs under the policy and the reference, [B, T], and the completion mask
# [B, T], and returns the per-token estimate [B, T], 0 off the mask. Only completion tokens
# enter (padding and prompt positions hold meaningless log-probs: exp() of them overflows,
# and inf x 0 is NaN), and the log-ratio is clamped to +-20 as verl does.
# What matters for a loss is the gradient (x ~ pi, d = logp_ref - logp):
#   k1 = -d                  E[grad] = E[grad logp] = 0: as a loss it regularises nothing
#   k2 = d^2 / 2             E[grad] = grad KL(pi || ref)           (the KL that PPO-RLHF penalises)
#   k3 = exp(d) - d - 1      E[grad] = grad KL(ref || pi)           (GRPO's and the DASH code's choice)
# All three are estimates of KL(pi || ref) in value (k2 biased, k1 and k3 unbiased).


def _log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d = logp_ref - logp on the mask, clamped to [-20, 20]; exactly 0 elsewhere."""
    on = mask > 0
    d = torch.where(on, ref_logprobs, logprobs.detach()) - logprobs
    return torch.where(on, d.clamp(-20.0, 20.0), torch.zeros_like(d))


@_register(KL_ESTIMATORS, "k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref. Unbiased value of KL(pi || ref); zero expected gradient."""
    return -_log_ratio(logprobs, ref_logprobs, mask)


@_register(KL_ESTIMATORS, "k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2. Its expected gradient is that of KL(pi || ref)."""
    return 0.5 * _log_ratio(logprobs, ref_logprobs, mask) ** 2


@_register(KL_ESTIMATORS, "k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 = exp(d) - d - 1, d = log pi_ref - log pi: unbiased, >= 0; expected gradient that of KL(ref || pi)."""
    d = _log_ratio(logprobs, ref_logprobs, mask)
    return torch.exp(d) - d - 1.0


# Sampler-mismatch corrections (`learn.tis_mode`, TRL's vllm_importance_sampling_mode): each
# takes the learner's log-probs of the sampled tokens under the sampling distribution
# (temperature, top-k, top-p applied: -inf where a token left the learner's top-k/top-p),
# the sampler's, the completion mask [B, T] and the bounds [lo, hi] (lo 0 = none), and
# returns the weight of each token [B, T], no gradient. Off the mask the weight is 1.
#   token_truncate    w_bt = clamp(r_bt, lo, hi)                     (token TIS)
#   token_mask        w_bt = r_bt if lo <= r_bt <= hi else 0         (IcePop with lo 0.5, hi 5)
#   sequence_truncate w_bt = clamp(R_b, lo, hi), R_b = exp(sum_t log r_bt)
#   sequence_mask     w_bt = R_b if lo <= R_b <= hi else 0           (TRL's default)
# with r_bt = exp(logp_learner - logp_sampler).


def _mismatch_log_ratio(learner_logprobs, sampler_logprobs, mask):
    on = mask > 0
    d = torch.where(on, learner_logprobs.detach() - sampler_logprobs, torch.zeros_like(sampler_logprobs))
    return d, on


def _bounded(ratio: torch.Tensor, lo: float, hi: float, truncate: bool) -> torch.Tensor:
    if truncate:
        return torch.clamp(ratio, min=lo or None, max=hi)
    return torch.where((ratio >= lo) & (ratio <= hi), ratio, torch.zeros_like(ratio))


def _token_level(truncate: bool):
    def correction(learner_logprobs, sampler_logprobs, mask, *, lo: float, hi: float) -> torch.Tensor:
        d, on = _mismatch_log_ratio(learner_logprobs, sampler_logprobs, mask)
        return torch.where(on, _bounded(torch.exp(d), lo, hi, truncate), torch.ones_like(d))
    return correction


def _sequence_level(truncate: bool):
    def correction(learner_logprobs, sampler_logprobs, mask, *, lo: float, hi: float) -> torch.Tensor:
        d, on = _mismatch_log_ratio(learner_logprobs, sampler_logprobs, mask)
        ratio = _bounded(torch.exp(d.sum(1, keepdim=True)), lo, hi, truncate)
        return torch.where(on, ratio.expand_as(d), torch.ones_like(d))
    return correction


for _name, _fn in (("token_truncate", _token_level(True)), ("token_mask", _token_level(False)),
                   ("sequence_truncate", _sequence_level(True)), ("sequence_mask", _sequence_level(False))):
    MISMATCH_CORRECTIONS[_name] = _fn


# ---------------------------------------------------------------- reward shaping


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment of a completion of `length` tokens: 0 up to
    max_new_tokens - buffer, then falling linearly to -penalty at max_new_tokens (a
    truncated completion, which the sampler stops at max_new_tokens, gets -penalty);
    buffer 0 = off. DAPO: R = ((L_max - L_cache) - |y|) / L_cache in the buffer, times
    `penalty` here (their scale is 1)."""
    if buffer <= 0:
        return 0.0
    start = max_new_tokens - buffer
    if length <= start:
        return 0.0
    return -penalty * min(length - start, buffer) / buffer


# ---------------------------------------------------------------- loss aggregation
# Each reduces a per-token loss [B, T] over completion tokens (mask [B, T]) of one
# micro-batch, normalised by constants of the whole optimizer batch as it was sampled
# (num_sequences rows, num_tokens completion tokens, counted before the gradient filter),
# so summing the micro-batch results (gradient accumulation) gives the aggregate over the
# optimizer batch exactly, and dropping rows changes the update by their own terms only.


@_register(LOSS_AGGREGATIONS, "token_mean")
def token_mean(per_token, mask, *, num_sequences: int, num_tokens: int, max_new_tokens: int) -> torch.Tensor:
    """Every completion token of the batch weighs the same: sum(loss * mask) / num_tokens (DAPO, DASH)."""
    return (per_token * mask).sum() / num_tokens


@_register(LOSS_AGGREGATIONS, "seq_mean")
def seq_mean(per_token, mask, *, num_sequences: int, num_tokens: int, max_new_tokens: int) -> torch.Tensor:
    """Original GRPO: mean over tokens within each sequence, then mean over sequences."""
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return per_seq.sum() / num_sequences


@_register(LOSS_AGGREGATIONS, "constant")
def constant_norm(per_token, mask, *, num_sequences: int, num_tokens: int, max_new_tokens: int) -> torch.Tensor:
    """Dr.GRPO: sum(loss * mask) / (num_sequences * max_new_tokens), a length-independent constant."""
    return (per_token * mask).sum() / (num_sequences * max_new_tokens)
