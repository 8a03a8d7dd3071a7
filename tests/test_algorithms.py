"""Algorithm math against hand-computed numbers."""

import math

import pytest
import torch

from tasks import algorithms
from tasks.algorithms import ADVANTAGE_ESTIMATORS, filter_mask, policy_gradient_loss, token_logprobs


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


def test_k1_and_k3_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    approx(algorithms.KL_ESTIMATORS["k1"](logp, ref), [1.0, -1.0])
    # k3: d = ref - logp = [-1, 1] -> exp(d) - d - 1 = [e^-1, e - 2]
    approx(algorithms.KL_ESTIMATORS["k3"](logp, ref), [math.exp(-1), math.e - 2])
    assert algorithms.kl_k3(ref, ref).abs().max() == 0


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


def test_tis_weights_are_truncated_and_carry_no_gradient():
    learner = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    w = algorithms.tis_weights(learner, torch.tensor([[-1.5, -0.5]]), cap=1.5)
    approx(w, [[1.5, math.exp(-0.5)]])  # exp(0.5) = 1.65 capped at 1.5
    assert not w.requires_grad


def test_plan_steps_multi_mini_per_group():
    groups = ["a", "a", "b", "b", "c", "c"]
    assert algorithms.plan_steps(groups, "multi", 3) == [[0, 1, 2, 3, 4, 5]] * 3
    assert algorithms.plan_steps(groups, "mini", 2) == [[0, 1, 2, 3], [4, 5]]
    assert algorithms.plan_steps(groups, "mini", 9) == [[0, 1], [2, 3], [4, 5]]  # at most one step per group
    assert algorithms.plan_steps(groups, "per_group", 1) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="unknown learn.update 'ppo'"):
        algorithms.plan_steps(groups, "ppo", 1)


def test_one_step_clipped_objective_equals_plain_policy_gradient_on_the_real_model():
    """K = 1: old log-probs are the current ones detached, so the ratio is 1, nothing is
    clipped, and every parameter's gradient equals plain policy gradient's."""
    from tasks import policy

    path = policy.resolve_model("embedded:smollm2-135m-instruct")
    model = policy.load_model(path, torch.device("cpu"))
    prompts, completions = [[1, 4093, 28, 216], [1, 4093, 29]], [[339, 6459, 2], [5248, 30, 441, 2]]
    input_ids, attention, targets, mask = policy.collate(prompts, completions, pad_id=2)
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
    from tasks.algorithms import token_logprobs_and_entropy

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
