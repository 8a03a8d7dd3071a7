"""Answer extraction and checking on hand-written completions."""

import pytest

from tasks.reward import extract_answer, score

CASES = [
    # (completion, reference, expected correct, expected parsed answer)
    ("The answer is \\boxed{12}.", "12", True, "12"),
    ("7 + 5 = 12", "12", True, "12"),
    ("\\boxed{12} wait, no: \\boxed{13}", "13", True, "13"),
    ("\\boxed{13} and then 12", "12", False, "13"),          # boxed beats a later bare number
    ("So x = \\boxed{\\frac{1}{2}}", "0.5", True, "\\frac{1}{2}"),
    ("\\boxed{0.5}", "\\frac{1}{2}", True, "0.5"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True, "\\dfrac{3}{4}"),
    ("The result is -4.", "-4", True, "-4"),
    ("\\boxed{-4}", "4", False, "-4"),
    ("It is 1,234 apples", "1234", True, "1234"),
    ("\\boxed{1,234}", "1234", True, "1,234"),
    ("I think 41", "42", False, "41"),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", True, "x^2 + 2x + 1"),
    ("\\boxed{\\sqrt{4}}", "2", True, "\\sqrt{4}"),
    ("\\boxed{{12}}", "12", True, "{12}"),
    ("no number here at all", "3", False, None),
    ("", "3", False, None),
    ("!!@@##$$%%^^&&**(())", "3", False, None),
    ("\\boxed{", "3", False, None),                          # unbalanced: no boxed, no number
    ("\\boxed{7", "7", True, "7"),                           # unbalanced box: falls back to the last number
    ("The answer: \\boxed{\\text{seven}}", "7", False, "\\text{seven}"),
    ("2 + 2 = 4. \\boxed{4}", "4", True, "4"),
    ("\\boxed{3.0}", "3", True, "3.0"),
    ("\\fbox{9}", "9", True, "9"),
]


@pytest.mark.parametrize("completion,reference,correct,parsed", CASES)
def test_score(completion, reference, correct, parsed):
    reward, ok, got, error = score(completion, reference)
    assert got == parsed
    assert ok is correct
    assert reward == (1.0 if correct else 0.0)
    assert error is None


def test_adversarially_long_input_is_bounded():
    text = "1 + " * 200_000 + "\\boxed{" * 5000 + "x"
    reward, ok, parsed, error = score(text, "5", max_chars=4000, timeout_s=2)
    assert reward == 0.0 and ok is False


def test_long_rambling_then_answer_uses_the_tail():
    text = "blah " * 100_000 + "so the answer is \\boxed{17}"
    assert extract_answer(text, max_chars=4000) == "17"
    assert score(text, "17")[1] is True


def test_garbage_reference_scores_zero_without_raising():
    reward, ok, parsed, error = score("\\boxed{5}", "\\frac{")
    assert (reward, ok, parsed) == (0.0, False, "5")


def test_fallback_none_requires_a_box():
    assert extract_answer("the answer is 5", fallback="none") is None
    assert extract_answer("the answer is \\boxed{5}", fallback="none") == "5"
