"""The strict and flexible checkers, pass@k and maj@k, on hand-written cases and hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from dashflow.core import answers
from dashflow.core.rewards import score_row

# (completion, reference, strict correct, strict answer, flexible correct, flexible answer)
CASES = [
    # boxed in the last line
    ("The answer is \\boxed{12}.", "12", True, "12", True, "12"),
    ("7 + 5 = 12.\nSo the answer is \\boxed{12}", "12", True, "12", True, "12"),
    ("Answer:\n\\boxed{-4}", "-4", True, "-4", True, "-4"),
    ("\\boxed{-4}", "4", False, "-4", False, "-4"),
    ("\\fbox{9}", "9", True, "9", True, "9"),
    ("\\framebox{9}", "9", True, "9", True, "9"),
    ("\\boxed {15}", "15", True, "15", True, "15"),
    ("\\boxed{3.0}", "3", True, "3.0", True, "3.0"),
    # boxed early, then contradicted: the last box wins
    ("\\boxed{12} wait, no: \\boxed{13}", "13", True, "13", True, "13"),
    ("\\boxed{12}\nHmm.\n\\boxed{13}", "12", False, "13", False, "13"),
    # a box followed by a later bare number: the box wins in both
    ("\\boxed{13} and then 12", "12", False, "13", False, "13"),
    # boxed early, then more than 4 lines of text: strict no longer sees it
    ("\\boxed{7}\nline 2\nline 3\nline 4\nline 5", "7", False, None, True, "7"),
    ("So \\boxed{7}.\na\nb\nc", "7", True, "7", True, "7"),              # exactly within the last 4 lines
    ("\\boxed{7}\n\n\n\n\n", "7", True, "7", True, "7"),                   # trailing blank lines are stripped
    # no box at all
    ("7 + 5 = 12", "12", False, None, True, "12"),
    ("The result is -4.", "-4", False, None, True, "-4"),
    ("I think 41", "42", False, None, False, "41"),
    ("no number here at all", "3", False, None, False, None),
    ("", "3", False, None, False, None),
    ("!!@@##$$%%^^&&**(())", "3", False, None, False, None),
    # the echoed question: flexible pays for it, strict does not
    ("What is 8 - 4? The numbers are 8 and 4", "4", False, None, True, "4"),
    # lists of numbers are not one number
    ("1,2,3", "123", False, None, False, "3"),
    ("The primes are 2, 3, 5 and 7", "7", False, None, True, "7"),
    # thousands separators
    ("It is 1,234 apples", "1234", False, None, True, "1234"),
    ("\\boxed{1,234}", "1234", True, "1,234", True, "1,234"),
    ("\\boxed{1{,}234}", "1234", True, "1{,}234", True, "1{,}234"),
    ("about 12,34 units", "34", False, None, True, "34"),
    # LaTeX fractions and expressions
    ("So x = \\boxed{\\frac{1}{2}}", "0.5", True, "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("\\boxed{0.5}", "\\frac{1}{2}", True, "0.5", True, "0.5"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True, "\\dfrac{3}{4}", True, "\\dfrac{3}{4}"),
    ("The answer is 3/4", "3/4", False, None, True, "3/4"),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", True, "x^2 + 2x + 1", True, "x^2 + 2x + 1"),
    ("\\boxed{\\sqrt{4}}", "2", True, "\\sqrt{4}", True, "\\sqrt{4}"),
    # nested braces
    ("\\boxed{{12}}", "12", True, "{12}", True, "{12}"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True, "\\frac{\\sqrt{2}}{2}", True, "\\frac{\\sqrt{2}}{2}"),
    # empty or unbalanced boxes
    ("The answer is \\boxed{}", "5", False, None, False, None),
    ("It is 5. \\boxed{}", "5", False, None, True, "5"),
    ("\\boxed{", "3", False, None, False, None),
    ("\\boxed{7", "7", False, None, True, "7"),
    ("\\boxed{6} and \\boxed{7", "6", True, "6", True, "6"),               # the unbalanced last box is skipped
    ("The answer: \\boxed{\\text{seven}}", "7", False, "\\text{seven}", False, "\\text{seven}"),
    ("2 + 2 = 4. \\boxed{4}", "4", True, "4", True, "4"),
]


@pytest.mark.parametrize("completion,reference,s_ok,s_answer,f_ok,f_answer", CASES)
def test_strict_and_flexible_checkers(completion, reference, s_ok, s_answer, f_ok, f_answer):
    assert answers.extract(completion, "strict") == s_answer
    assert answers.extract(completion, "flexible") == f_answer
    # a generous bound: this checks verdicts, not the bound (a loaded CPU makes sympy slow)
    row = score_row({"completion": completion, "answer": reference}, [], timeout_s=60, max_chars=4000)
    assert (row["strict_correct"], row["flexible_correct"]) == (s_ok, f_ok)
    assert row["reward_error"] is None


def test_adversarially_long_input_is_bounded():
    text = "1 + " * 200_000 + "\\boxed{" * 5000 + "x"
    row = score_row({"completion": text, "answer": "5"}, [], timeout_s=2, max_chars=4000)
    assert not row["strict_correct"] and not row["flexible_correct"]


def test_long_rambling_then_answer_uses_the_tail():
    text = "blah " * 100_000 + "so the answer is \\boxed{17}"
    assert answers.extract(text, "flexible") == "17" == answers.extract(text, "strict")


def test_an_unparseable_reference_is_an_error_not_a_plain_wrong():
    row = score_row({"completion": "\\boxed{5}", "answer": ""}, [], timeout_s=5, max_chars=4000)
    assert row["strict_correct"] is False and "reference answer '' is not parseable" in row["reward_error"]
    # a malformed reference math-verify still reads (as a string) is simply not equal
    row = score_row({"completion": "\\boxed{5}", "answer": "\\frac{"}, [], timeout_s=5, max_chars=4000)
    assert row["strict_correct"] is False and row["reward_error"] is None


def test_unknown_extraction_is_refused():
    with pytest.raises(ValueError, match="strict, flexible"):
        answers.extract("x", "lenient")


# ---------------------------------------------------------------- n samples


@pytest.mark.parametrize("n,c,k,expected", [
    (4, 0, 1, 0.0), (4, 4, 1, 1.0), (4, 1, 1, 0.25), (4, 2, 1, 0.5),
    (4, 1, 2, 0.5),            # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),          # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (4, 1, 4, 1.0), (4, 0, 4, 0.0),
    (5, 2, 3, 0.9),            # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (10, 3, 5, 1 - 21 / 252),  # C(7,5) = 21, C(10,5) = 252
])
def test_pass_at_k_against_hand_computed_values(n, c, k, expected):
    assert answers.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_1_is_the_mean():
    assert all(math.isclose(answers.pass_at_k(8, c, 1), c / 8) for c in range(9))


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError):
        answers.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        answers.pass_at_k(4, 1, 5)


def test_maj_at_k():
    # "5" twice (wrong), "6" once (right): the majority is wrong
    assert answers.maj_at_k(["5", "6", "5", None], [False, True, False, False], 4) is False
    # a tie between "6" and "5": the one seen first wins
    assert answers.maj_at_k(["6", "5", "5", "6"], [True, False, False, True], 4) is True
    assert answers.maj_at_k(["5", "6", "6", "5"], [False, True, True, False], 4) is False
    # unanswered samples do not vote; nothing answered is wrong
    assert answers.maj_at_k([None, None, "6"], [False, False, True], 3) is True
    assert answers.maj_at_k([None, None], [False, False], 2) is False
    # only the first k vote
    assert answers.maj_at_k(["6", "5", "5"], [True, False, False], 1) is True


def test_ks():
    assert answers.ks(1) == [1] and answers.ks(4) == [1, 2, 4] and answers.ks(6) == [1, 2, 4, 6]
