"""Algorithm math against hand-computed numbers."""

import math

import pytest
import torch

from dashflow.core import algorithms
from dashflow.core.algorithms import (
    ADVANTAGE_ESTIMATORS,
    LossInputs,
    LossSettings,
    filter_mask,
    policy_gradient_loss,
    token_logprobs,
)


def approx(t, values, tol=1e-5):
    assert torch.allclose(t.double(), torch.tensor(values, dtype=torch.double), atol=tol), (t, values)


def test_grpo_one_correct_of_four():
    # mean 0.25; sample std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5
    adv, mean, std = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([[1.0, 0.0, 0.0, 0.0]]), epsilon=0.0)
    approx(adv, [[1.5, -0.5, -0.5, -0.5]])
    approx(mean, [0.25])
    approx(std, [0.5])


def test_grpo_two_of_four_with_epsilon():
    # mean 0.5; std = sqrt(4 * 0.25 / 3) = 0.57735; A = ±0.5 / (0.57735 + 0.1)
    adv, _, _ = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([[1.0, 1.0, 0.0, 0.0]]), epsilon=0.1)
    a = 0.5 / (math.sqrt(1 / 3) + 0.1)
    approx(adv, [[a, a, -a, -a]])


def test_drgrpo_is_mean_centred_only():
    adv, _, _ = ADVANTAGE_ESTIMATORS["drgrpo"](torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]))
    approx(adv, [[0.75, -0.25, -0.25, -0.25], [0.25, 0.25, 0.25, -0.75]])


def test_rloo_leave_one_out_baseline():
    # A_0 = 1 - mean(0, 0, 0) = 1; A_1 = 0 - mean(1, 0, 0) = -1/3
    adv, _, _ = ADVANTAGE_ESTIMATORS["rloo"](torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    approx(adv, [[1.0, -1 / 3, -1 / 3, -1 / 3]])


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_all_equal_groups_have_zero_advantage(name):
    adv, _, std = ADVANTAGE_ESTIMATORS[name](torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.count_nonzero(adv) == 0
    approx(std, [0.0, 0.0])


def test_unknown_estimator_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'.*grpo"):
        algorithms.get(ADVANTAGE_ESTIMATORS, "ppo", "advantage estimator")


def test_processed_logprobs_apply_temperature_then_top_k_then_top_p():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    # T = 2: softmax([1, .5, 0, -.5]) = [2.7183, 1.6487, 1, .6065] / 5.9735 = [.4551, .2760, .1674, .1015]
    full = algorithms.processed_logprobs(scores, 2.0).exp()
    assert torch.allclose(full, torch.tensor([[0.4551, 0.2760, 0.1674, 0.1015]]), atol=1e-3)
    # top_p 0.6: the smallest set reaching 0.6 is {0, 1} (.4551 + .2760 = .7311), renormalised
    top = algorithms.processed_logprobs(scores, 2.0, top_p=0.6).exp()
    assert torch.allclose(top, torch.tensor([[0.4551 / 0.7311, 0.2760 / 0.7311, 0.0, 0.0]]), atol=1e-3)
    # top_k 3: [2.7183, 1.6487, 1] / 5.3670 = [.5065, .3072, .1863, 0]
    k3 = algorithms.processed_logprobs(scores, 2.0, top_k=3).exp()
    assert torch.allclose(k3, torch.tensor([[0.5065, 0.3072, 0.1863, 0.0]]), atol=1e-3)
    # top_k 3 then top_p 0.8: .5065 + .3072 = .8137 reaches 0.8 -> {0, 1}
    both = algorithms.processed_logprobs(scores, 2.0, top_k=3, top_p=0.8).exp()
    assert torch.allclose(both, torch.tensor([[0.5065 / 0.8137, 0.3072 / 0.8137, 0.0, 0.0]]), atol=1e-3)
    # top_p smaller than the top token's mass still keeps that token
    assert algorithms.processed_logprobs(scores, 2.0, top_p=0.1).exp()[0, 0].item() == pytest.approx(1.0)


def test_filter_keeps_strictly_above_threshold():
    mask = filter_mask(torch.tensor([0.0, 0.1, -0.1, 0.1001, -1.5, 0.05]), 0.1)
    assert mask.tolist() == [False, False, False, True, True, False]


def test_policy_gradient_loss_value_and_gradient():
    # two sequences, three token slots; the last slot of sequence 1 is padding
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.4, -9.0]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss = policy_gradient_loss(logprobs, adv, mask, normalizer=5.0)
    # -(2 * (-3.5) + (-1) * (-0.6)) / 5 = -(-7 + 0.6) / 5 = 1.28
    assert loss.item() == pytest.approx(1.28)
    loss.backward()
    # d loss / d logp[b, t] = -A_b * mask / 5
    approx(logprobs.grad, [[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]])


def test_accumulated_micro_batches_equal_the_full_batch_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5, requires_grad=True)
    targets = torch.randint(0, 5, (4, 3))
    adv = torch.tensor([1.0, -0.5, 0.25, 2.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1.0]])
    full = policy_gradient_loss(token_logprobs(logits, targets, 0.9), adv, mask, mask.sum().item())
    (g_full,) = torch.autograd.grad(full, logits)
    acc = torch.zeros_like(logits)
    for idx in ([0, 1], [2], [3]):
        part = policy_gradient_loss(token_logprobs(logits[idx], targets[idx], 0.9), adv[idx], mask[idx], mask.sum().item())
        (g,) = torch.autograd.grad(part, logits)
        acc += g
    assert torch.allclose(acc, g_full, atol=1e-6)


def test_token_logprobs_uses_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    lp = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    # softmax([1, 0])[0] = e / (e + 1)
    assert lp.item() == pytest.approx(math.log(math.e / (math.e + 1)))


def test_pack_by_tokens():
    # sorted by length: idx 2 (1), 0 (2), 3 (3), 1 (5); budget 6 -> [2, 0, 3]? 3 rows x 3 = 9 > 6 -> [2, 0], then [3], [1]
    assert algorithms.pack_by_tokens([2, 5, 1, 3], token_budget=6) == [[2, 0], [3], [1]]
    assert algorithms.pack_by_tokens([2, 5, 1, 3], token_budget=100, max_rows=3) == [[2, 0, 3], [1]]
    assert algorithms.pack_by_tokens([50], token_budget=10) == [[0]]


# ---------------------------------------------------------------- PPO / KL / aggregation / TIS


def test_clipped_surrogate_inside_and_outside_the_clip_range_for_both_signs():
    # ratios 1.1 (inside), 1.5 (above 1 + 0.28), 0.5 (below 1 - 0.2); eps_low 0.2, eps_high 0.28
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.1, 1.5, 0.5], [1.1, 1.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, clipped = algorithms.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    # A = +1: max(-r, -clip(r)) = [-1.1, max(-1.5, -1.28) = -1.28, max(-0.5, -0.8) = -0.5]
    # A = -1: max(r, clip(r))   = [ 1.1, max( 1.5,  1.28) =  1.5,  max( 0.5,  0.8) =  0.8]
    approx(loss, [[-1.1, -1.28, -0.5], [1.1, 1.5, 0.8]])
    assert clipped.tolist() == [[False, True, False], [False, False, True]]
    loss.sum().backward()
    # d/dlogp of -A r = -A r where unclipped, 0 where the clipped branch is taken
    approx(logp.grad, [[-1.1, 0.0, -0.5], [1.1, 1.5, 0.0]])


def test_k1_k2_k3_estimators():
    logp, ref, on = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), torch.ones(2)
    approx(algorithms.KL_ESTIMATORS["k1"](logp, ref, on), [1.0, -1.0])
    # k2 = (logp - ref)^2 / 2 = [0.5, 0.5]
    approx(algorithms.KL_ESTIMATORS["k2"](logp, ref, on), [0.5, 0.5])
    # k3: d = ref - logp = [-1, 1] -> exp(d) - d - 1 = [e^-1, e - 2]
    approx(algorithms.KL_ESTIMATORS["k3"](logp, ref, on), [math.exp(-1), math.e - 2])
    assert algorithms.kl_k3(ref, ref, on).abs().max() == 0


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_is_computed_on_completion_tokens_only(name):
    """Padding and prompt positions hold meaningless log-probs (the reference column is 0
    there, the policy's may be -100): exp(100) overflows float32, and inf x 0 is NaN. The
    estimate must be exactly 0 off the mask, with a finite gradient everywhere."""
    logp = torch.tensor([[-1.0, -100.0, -120.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    kl = algorithms.KL_ESTIMATORS[name](logp, ref, mask)
    assert torch.isfinite(kl).all() and kl[0, 1:].abs().max() == 0
    loss = (kl * mask).sum()
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1:].abs().max() == 0
    # a huge gap on a completion token is clamped (d to +-20), not inf
    far = algorithms.KL_ESTIMATORS[name](torch.tensor([[-200.0]]), torch.tensor([[0.0]]), torch.ones(1, 1))
    assert torch.isfinite(far).all()


def _expected_gradient(name, theta, ref_logits):
    """E_{x ~ pi}[grad_theta k(x)] exactly: sum_x pi(x) (no gradient) * k(x) over the support."""
    logp = torch.log_softmax(theta, -1)
    k = algorithms.KL_ESTIMATORS[name](logp, torch.log_softmax(ref_logits, -1), torch.ones_like(logp))
    (g,) = torch.autograd.grad((logp.exp().detach() * k).sum(), theta)
    return g


def test_kl_estimator_gradients_are_what_params_yaml_says():
    """k1's expected gradient is 0, k2's is that of KL(pi || ref), k3's that of KL(ref || pi),
    on a 5-token categorical policy computed exactly (no sampling)."""
    theta = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.4], dtype=torch.float64, requires_grad=True)
    ref_logits = torch.tensor([1.0, 0.5, -1.0, 0.2, 0.0], dtype=torch.float64)
    pi, log_pi = torch.softmax(theta, -1), torch.log_softmax(theta, -1)
    ref, log_ref = torch.softmax(ref_logits, -1), torch.log_softmax(ref_logits, -1)
    (forward_kl,) = torch.autograd.grad((pi * (log_pi - log_ref)).sum(), theta, retain_graph=True)  # KL(pi || ref)
    (reverse_kl,) = torch.autograd.grad((ref * (log_ref - log_pi)).sum(), theta)  # KL(ref || pi)
    assert forward_kl.abs().max() > 0.05 and (forward_kl - reverse_kl).abs().max() > 0.05  # they differ
    assert torch.allclose(_expected_gradient("k1", theta, ref_logits), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(_expected_gradient("k2", theta, ref_logits), forward_kl, atol=1e-12)
    assert torch.allclose(_expected_gradient("k3", theta, ref_logits), reverse_kl, atol=1e-12)


@pytest.mark.parametrize("mode,expected", [("token_mean", 15 / 5), ("seq_mean", (6 / 3 + 9 / 2) / 2),
                                           ("constant", 15 / (2 * 4))])
def test_loss_aggregation_modes(mode, expected):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the 7 is padding
    fn = algorithms.LOSS_AGGREGATIONS[mode]
    consts = dict(num_sequences=2, num_tokens=5, max_new_tokens=4)
    assert fn(per_token, mask, **consts).item() == pytest.approx(expected)
    # micro-batches (one row each) normalised by the whole batch's constants sum to the same
    parts = fn(per_token[:1], mask[:1], **consts) + fn(per_token[1:], mask[1:], **consts)
    assert parts.item() == pytest.approx(expected)


def test_token_truncate_weights_are_capped_and_carry_no_gradient():
    learner = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    fn = algorithms.MISMATCH_CORRECTIONS["token_truncate"]
    w = fn(learner, torch.tensor([[-1.5, -0.5]]), torch.ones(1, 2), lo=0, hi=1.5)
    approx(w, [[1.5, math.exp(-0.5)]])  # exp(0.5) = 1.65 capped at 1.5
    assert not w.requires_grad


# r = exp(learner - sampler) per token: row 0 [2, 0.5] (R = 1), row 1 [4, 2] (R = 8),
# row 2 [0.25, padding] (R = 0.25), row 3 [a token outside the learner's top-k (-inf), 1] (R = 0)
_LN = math.log
MISMATCH_LEARNER = torch.tensor([[_LN(2), _LN(0.5)], [_LN(4), _LN(2)], [_LN(0.25), 9.0], [float("-inf"), 0.0]])
MISMATCH_MASK = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])


@pytest.mark.parametrize("mode, lo, expected", [
    ("token_truncate", 0.5, [[2, 0.5], [3, 2], [0.5, 1], [0.5, 1]]),
    ("token_truncate", 0, [[2, 0.5], [3, 2], [0.25, 1], [0, 1]]),
    ("token_mask", 0.5, [[2, 0.5], [0, 2], [0, 1], [0, 1]]),          # IcePop: outside [lo, hi] -> 0
    ("sequence_truncate", 0.5, [[1, 1], [3, 3], [0.5, 1], [0.5, 0.5]]),
    ("sequence_mask", 0.5, [[1, 1], [0, 0], [0, 1], [0, 0]]),        # TRL's default: the whole sequence out
    ("sequence_mask", 0, [[1, 1], [0, 0], [0.25, 1], [0, 0]]),
])
def test_mismatch_corrections_by_hand(mode, lo, expected):
    """Bounds [lo, 3]. Padding keeps weight 1 (and its garbage log-prob never enters a
    sequence's ratio); a token the learner's top-k excludes has ratio 0."""
    w = algorithms.MISMATCH_CORRECTIONS[mode](MISMATCH_LEARNER, torch.zeros(4, 2), MISMATCH_MASK, lo=lo, hi=3.0)
    approx(w, expected)


def _off_policy():
    """Two sequences of two tokens, old log-probs 0: r = [[e^.4, e^.2], [e^-.1, e^-.3]], A = [1, -1]."""
    logp = torch.tensor([[0.4, 0.2], [-0.1, -0.3]], requires_grad=True)
    return logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2)


def test_gspo_clips_the_sequence_ratio_by_hand():
    """s = exp(mean log r) = [e^.3 = 1.35, e^-.2 = 0.82]; clip [0.8, 1.28]: sequence 0
    (A > 0, s > 1.28) takes the clipped branch -1.28 on both tokens and gets no gradient;
    sequence 1 is inside: +s on both tokens, each token's gradient s x (1/2) x 2 tokens / 4.
    Token-level PPO would clip only token (0, 0) (r = 1.49) and keep (0, 1) (r = 1.22)."""
    logp, old, adv, mask = _off_policy()
    s1 = math.exp(-0.2)
    loss, metrics = algorithms.policy_loss(
        LossInputs(logp, old, adv, mask), LossSettings(agg="token_mean", objective="gspo", clip_eps=0.2,
                                                       clip_eps_high=0.28),
        consts=dict(num_sequences=2, num_tokens=4, max_new_tokens=2))
    assert loss.item() == pytest.approx((2 * -1.28 + 2 * s1) / 4, abs=1e-6)
    loss.backward()
    approx(logp.grad, [[0.0, 0.0], [s1 / 4, s1 / 4]])
    assert (metrics["clip_fraction"][0] / metrics["clip_fraction"][1]).item() == pytest.approx(0.5)
    ppo, _ = algorithms.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    assert ppo[0].tolist() == pytest.approx([-1.28, -math.exp(0.2)])  # not what gspo computed


def test_cispo_keeps_the_gradient_of_a_capped_token_by_hand():
    """cap 1.3: weights sg(min(r, 1.3)) = [[1.3, e^.2], [e^-.1, e^-.3]]; loss -w A logp,
    token_mean over 4; gradient -w A / 4 on every token -- token (0, 0), capped, keeps
    -1.3 / 4 where PPO's clip would give it 0."""
    logp, old, adv, mask = _off_policy()
    w = [[1.3, math.exp(0.2)], [math.exp(-0.1), math.exp(-0.3)]]
    loss, metrics = algorithms.policy_loss(
        LossInputs(logp, old, adv, mask), LossSettings(agg="token_mean", objective="cispo", cispo_cap=1.3,
                                                       clip_eps=0.2, clip_eps_high=0.28),
        consts=dict(num_sequences=2, num_tokens=4, max_new_tokens=2))
    expected = -(w[0][0] * 0.4 + w[0][1] * 0.2) + (w[1][0] * -0.1 + w[1][1] * -0.3)
    assert loss.item() == pytest.approx(expected / 4, abs=1e-6)
    loss.backward()
    approx(logp.grad, [[-w[0][0] / 4, -w[0][1] / 4], [w[1][0] / 4, w[1][1] / 4]])
    assert (metrics["clip_fraction"][0] / metrics["clip_fraction"][1]).item() == pytest.approx(0.25)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "constant"])
@pytest.mark.parametrize("objective", ["ppo", "gspo", "cispo"])
def test_every_objective_on_policy_is_the_plain_policy_gradient(objective, agg):
    """One on-policy step (old = logp detached): r = s = 1, nothing clips, and the gradient
    is REINFORCE's under every aggregation -- gspo's sequence mean times its tokens gives back
    the token sum. So at learn.steps 1 the objectives differ only by float rounding."""
    torch.manual_seed(0)
    logp = torch.randn(3, 4).requires_grad_()
    adv, mask = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    consts = dict(num_sequences=3, num_tokens=9, max_new_tokens=4)
    loss, metrics = algorithms.policy_loss(
        LossInputs(logp, logp.detach(), adv, mask),
        LossSettings(agg=agg, objective=objective, clip_eps=0.2, clip_eps_high=0.28), consts=consts)
    loss.backward()
    mine, logp.grad = logp.grad.clone(), None
    per_token = -adv[:, None] * logp   # REINFORCE per token, aggregated the same way
    algorithms.LOSS_AGGREGATIONS[agg](per_token, mask, **consts).backward()
    assert torch.allclose(mine, logp.grad, atol=1e-6) and metrics["clip_fraction"][0].item() == 0


def test_policy_loss_reports_the_tokens_a_mismatch_mask_removed():
    logp = torch.zeros(2, 2, requires_grad=True)
    w = algorithms.MISMATCH_CORRECTIONS["token_mask"](torch.zeros(2, 2), torch.tensor([[0.0, -2.0], [0.0, 0.0]]),
                                                     torch.ones(2, 2), lo=0.5, hi=5.0)   # e^2 = 7.4 > 5: out
    loss, metrics = algorithms.policy_loss(
        LossInputs(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 2), tis_weights=w),
        LossSettings(agg="token_mean", clip_eps=0.2, clip_eps_high=0.2),
        consts=dict(num_sequences=2, num_tokens=4, max_new_tokens=2))
    loss.backward()
    approx(logp.grad, [[-0.25, 0.0], [0.25, 0.25]])
    assert (metrics["mismatch_masked"][0] / metrics["mismatch_masked"][1]).item() == pytest.approx(0.25)


@pytest.mark.parametrize("length, buffer, penalty, expected", [
    (40, 16, 1.0, 0.0), (48, 16, 1.0, 0.0),          # up to max_new_tokens - buffer = 48: nothing
    (56, 16, 1.0, -0.5), (60, 16, 0.5, -0.375),       # (48 - length) / 16 x penalty
    (64, 16, 1.0, -1.0), (64, 0, 1.0, 0.0),           # truncated: the whole penalty; buffer 0: off
])
def test_overlong_penalty_by_hand(length, buffer, penalty, expected):
    assert algorithms.overlong_penalty(length, 64, buffer, penalty) == pytest.approx(expected)


def test_plan_steps_multi_mini_per_group():
    groups = ["a", "b", "c"]   # every sampled group, in order (filtered ones included)
    assert algorithms.plan_steps(groups, "multi", 1) == [["a", "b", "c"]]   # GRPO / preemptive / DASH
    assert algorithms.plan_steps(groups, "multi", 3) == [["a", "b", "c"]] * 3
    assert algorithms.plan_steps(groups, "mini", 2) == [["a", "b"], ["c"]]
    assert algorithms.plan_steps(groups, "mini", 9) == [["a"], ["b"], ["c"]]  # at most one step per group
    assert algorithms.plan_steps(groups, "per_group", 1) == [["a"], ["b"], ["c"]]
    assert [algorithms.planned_steps(u, 3, 16) for u in ("multi", "mini", "per_group")] == [3, 3, 16]
    with pytest.raises(ValueError, match="unknown learn.update 'ppo'"):
        algorithms.plan_steps(groups, "ppo", 1)


@pytest.mark.parametrize("schedule,expected", [
    # lr factors at steps 0..5 of a 6-step run with 2 warm-up steps (transformers' convention:
    # step 0 of a warm-up has factor 0; the decay reaches 0 at step `total`)
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_lr_schedule_factors_by_hand_and_as_transformers(schedule, expected):
    from transformers import get_scheduler

    got = [algorithms.lr_factor(schedule, s, 2, 6) for s in range(6)]
    assert got == pytest.approx(expected)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    sched = get_scheduler(name, opt, num_warmup_steps=2, num_training_steps=6)
    reference = []
    for _ in range(6):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(reference)
    assert algorithms.lr_factor("linear", 0, 0, 4) == 1.0 and algorithms.lr_factor("linear", 3, 0, 4) == 0.25


def test_one_step_clipped_objective_equals_plain_policy_gradient_on_the_real_model():
    """K = 1: old log-probs are the current ones detached, so the ratio is 1, nothing is
    clipped, and every parameter's gradient equals plain policy gradient's."""
    from dashflow.core import batches, models, policy

    path = models.resolve_model("embedded:smollm2-135m-instruct")
    model = policy.load_model(path, torch.device("cpu"))
    prompts, completions = [[1, 4093, 28, 216], [1, 4093, 29]], [[339, 6459, 2], [5248, 30, 441, 2]]
    input_ids, attention, targets, mask = batches.collate(prompts, completions, pad_id=2)
    adv = torch.tensor([1.5, -0.5])

    def grads(use_clipped: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logp = algorithms.token_logprobs(model(input_ids=input_ids, attention_mask=attention).logits[:, :-1], targets, 0.9)
        if use_clipped:
            per_token, clipped = algorithms.clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.28)
            assert not clipped.any()
            loss = algorithms.token_mean(per_token, mask, num_sequences=2, num_tokens=7, max_new_tokens=4)
        else:
            loss = algorithms.policy_gradient_loss(logp, adv, mask, normalizer=7.0)
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, clipped = grads(False), grads(True)
    assert len(plain) == len(clipped) > 0
    assert max((a - b).abs().max().item() for a, b in zip(plain, clipped)) < 1e-6
    assert max(a.abs().max().item() for a in plain) > 1e-4  # a real, nonzero gradient


def test_logprobs_and_entropy_from_one_log_softmax_match_the_separate_functions():
    from dashflow.core.algorithms import token_logprobs_and_entropy

    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 7), torch.tensor([[1, 2, 3], [4, 5, 6]])
    at = torch.tensor([[False, True, True], [True, False, False]])
    logp, ent = token_logprobs_and_entropy(logits, targets, 0.9, at)
    assert torch.allclose(logp, token_logprobs(logits, targets, 0.9))
    expected = torch.distributions.Categorical(logits=logits / 0.9).entropy()[at]
    assert torch.allclose(ent, expected, atol=1e-6) and ent.shape == (3,)
    # uniform over 7 tokens: entropy ln 7
    _, flat = token_logprobs_and_entropy(torch.zeros(1, 1, 7), torch.tensor([[0]]), 1.0, torch.tensor([[True]]))
    assert abs(flat.item() - math.log(7)) < 1e-6


def _f32(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def test_master_weights_split_into_a_nearest_bfloat16_and_low_bits_that_restore_them_exactly():
    from dashflow.core.policy import join_master, split_master

    # float32 bit patterns, by hand: 1.0 = 0x3F800000; a bfloat16 unit at 1.0 is 0x10000 of them
    w = _f32([0x3F800000,    # 1.0: exact in bfloat16, low bits 0
              0x3F804000,    # 1 + 2^-9 (a quarter unit): rounds down to 1.0
              0x3F80C000,    # 1 + 3 * 2^-9 (three quarters): rounds up to 1 + 2^-7 = 1.0078125
              0x3F808000,    # 1 + 2^-8 (a tie): away from zero, 1.0078125 (torch's cast: 1.0, to even)
              0xBF808000,    # -(1 + 2^-8): away from zero, -1.0078125
              0x3F81FFFF,    # just below 1 + 2^-6: rounds up across the unit, to 1.015625
              0x00000000, 0x80000000])  # +0, -0
    policy, low = split_master(w)
    assert policy.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert policy.float().tolist() == [1.0, 1.0, 1.0078125, 1.0078125, -1.0078125, 1.015625, 0.0, -0.0]
    assert [int(x) & 0xFFFF for x in low] == [0x0000, 0x4000, 0xC000, 0x8000, 0x8000, 0xFFFF, 0, 0]
    assert torch.equal(join_master(policy, low).view(torch.int32), w.view(torch.int32))  # bit for bit
    # away from ties the policy is torch's own round-to-nearest
    assert torch.equal(policy[[0, 1, 2, 5]], w[[0, 1, 2, 5]].to(torch.bfloat16))


def test_master_weight_split_is_exact_for_any_weights():
    from dashflow.core.policy import join_master, split_master

    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(4096, generator=g) * s for s in (1e-6, 1e-2, 1.0, 1e3)]).view(64, 256)
    policy, low = split_master(w)
    assert torch.equal(join_master(policy, low).view(torch.int32), w.view(torch.int32))
    assert float(((policy.float() - w).abs() / w.abs()).max()) <= 2 ** -8  # half a bfloat16 unit, relative
    with pytest.raises(ValueError, match="largest bfloat16"):
        split_master(torch.tensor([3.4e38]))


def test_policy_loss_composes_clip_tis_and_kl_by_hand():
    """algorithms.policy_loss, the learner's objective, on numbers worked by hand.
    r = exp(logp - old) = [[1, e^0.5], [e^-0.3, 1]], A = [1, -2], clip [0.8, 1.28]:
    token (0,0) unclipped -1; (0,1) clipped at 1.28 -> -1.28; (1,0) clipped at 0.8 -> 2 x 0.8 = 1.6;
    (1,1) masked. TIS weights [[1, .5], [2, 1]]; k3 KL to ref [[-1, 0], [0, 0]]: e^-1 at (0,0), x 0.1.
    token_mean over the 4 tokens *as sampled*: (-1 + 0.1 e^-1 - 0.64 + 3.2) / 4."""
    logp = torch.zeros(2, 2, requires_grad=True)
    old = torch.tensor([[0.0, -0.5], [0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, metrics = algorithms.policy_loss(
        LossInputs(logp, old, torch.tensor([1.0, -2.0]), mask, tis_weights=torch.tensor([[1.0, 0.5], [2.0, 1.0]]),
                   ref_logprobs=torch.tensor([[-1.0, 0.0], [0.0, 0.0]])),
        LossSettings(agg="token_mean", clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.1, kl_estimator="k3"),
        consts={"num_sequences": 2, "num_tokens": 4, "max_new_tokens": 2})
    e = math.exp
    assert loss.item() == pytest.approx((-1 + 0.1 * e(-1) - 0.64 + 3.2) / 4, abs=1e-6)
    loss.backward()
    # only (0,0) has a gradient: -A r = -1, plus 0.1 x d/dlogp k3 = 0.1 x (1 - e^-1); the clipped and masked: 0
    assert logp.grad.flatten().tolist() == pytest.approx([(-1 + 0.1 * (1 - e(-1))) / 4, 0.0, 0.0, 0.0], abs=1e-6)
    means = {k: (s / n).item() for k, (s, n) in metrics.items()}
    assert means == pytest.approx({"clip_fraction": 2 / 3, "tis_weight": 3.5 / 3, "kl_to_reference": e(-1) / 3,
                                   "mismatch_masked": 0.0,
                                   "approx_kl_to_sampling": ((e(-0.5) - 0.5) + (e(0.3) - 1.3)) / 3}, abs=1e-6)


def test_policy_loss_on_policy_has_the_plain_policy_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 4).requires_grad_()
    adv, mask = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    loss, metrics = algorithms.policy_loss(
        LossInputs(logp, logp.detach(), adv, mask), LossSettings(agg="constant", clip_eps=0.2, clip_eps_high=0.28),
        consts={"num_sequences": 3, "num_tokens": 9, "max_new_tokens": 4})
    loss.backward()
    mine = logp.grad.clone()
    logp.grad = None
    policy_gradient_loss(logp, adv, mask, normalizer=3 * 4).backward()
    assert torch.allclose(mine, logp.grad) and set(metrics) == {"clip_fraction", "approx_kl_to_sampling"}
    assert metrics["clip_fraction"][0].item() == 0


def test_dynamic_sampling_gate_by_hand():
    rewards = torch.tensor([[1.0, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.5, 1]])
    assert algorithms.informative_groups(rewards).tolist() == [False, True, False, True]
    assert algorithms.gate_groups([False, True, False, True, True], 2) == [1, 3]   # the first 2 with signal
    assert algorithms.gate_groups([False, True], 4) == [1]                         # fewer when fewer were found
    assert algorithms.rounds_needed(3, 4, 0, 2) and algorithms.rounds_needed(3, 4, 1, 2)
    assert not algorithms.rounds_needed(4, 4, 0, 2)      # the batch is full
    assert not algorithms.rounds_needed(3, 4, 2, 2)      # the cap on extra rounds
    off = {"dynamic_rounds": 0, "dynamic_groups": 5, "prompts_per_iteration": 16}
    assert algorithms.dynamic_target(off) is None
    assert algorithms.dynamic_target({**off, "dynamic_rounds": 2}) == 5
    assert algorithms.dynamic_target({**off, "dynamic_rounds": 2, "dynamic_groups": None}) == 16


def test_with_binary_rewards_and_g4_dash_filter_drops_exactly_dynamic_samplings_groups():
    # Every group of 4 rewards in {0, 1}: a group with k of 4 correct has mean k/4 and sample
    # std sqrt(k(4-k)/12), so |A| is 1.5 / 0.5 (k = 1, 3) or 0.866 (k = 2): never <= 0.1.
    # DASH's filter at 0.1 therefore keeps every row of an informative group and none of the
    # others -- what the dynamic-sampling gate keeps (why those two arms measure the same).
    patterns = torch.tensor([[(m >> b) & 1 for b in range(4)] for m in range(16)], dtype=torch.float32)
    adv, _, _ = algorithms.grpo_advantage(patterns, epsilon=1e-4)
    keep = algorithms.filter_mask(adv.flatten(), 0.1).view(16, 4)
    informative = algorithms.informative_groups(patterns)
    assert informative.sum().item() == 14                       # all but 0000 and 1111
    assert torch.equal(keep.all(dim=1), informative) and torch.equal(keep.any(dim=1), informative)
    k1 = patterns.sum(dim=1) == 1
    assert torch.allclose(adv[k1].abs().min(dim=1).values, torch.full((4,), 0.25 / (0.5 + 1e-4)), atol=1e-6)


def test_a_second_function_under_a_registered_name_is_refused():
    with pytest.raises(ValueError, match="'ppo' is registered already"):
        algorithms._register(algorithms.POLICY_OBJECTIVES, "ppo")
    assert algorithms.POLICY_OBJECTIVES["ppo"].__module__ == "dashflow.core.algorithms"  # the first one stays
