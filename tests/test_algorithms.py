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
