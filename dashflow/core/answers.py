"""Final answers: how they are extracted, compared and summarised -- small pure functions.

Two extractions, reported side by side (the field's convention, after lm-evaluation-harness's
two GSM8K filters "strict-match" and "flexible-extract"):

  strict    the DASH paper's checker (shuoli90/efficient_reasoning, utils/math_eval.py):
            the completion stripped, its last 4 lines joined, the last \\boxed{} / \\fbox{} /
            \\framebox{} in them; nothing else counts (no box there: wrong).
  flexible  the last \\boxed{} anywhere in the completion's tail (`max_chars`), else the last
            number in it (thousands separators only in groups of three: "1,234" is 1234,
            "1,2,3" is 3). Lenient: an echo of the question's last number also scores.

The extracted answer and the reference are compared by math-verify (symbolic and numeric
equivalence: 0.5 = \\frac{1}{2}) with errors raised, not swallowed: `check` returns the
failure as its error (a timeout too) for the caller to record.

Summaries of n samples per problem: mean@n, the unbiased pass@k estimator (Chen et al. 2021,
1 - C(n-c, k) / C(n, k)), and maj@k (the most frequent extracted answer among the first k;
ties go to the one seen first; unanswered samples do not vote).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter

EXTRACTIONS = ("strict", "flexible")
STRICT_LAST_LINES = 4
_BOXES = ("\\boxed", "\\fbox", "\\framebox")
# a number: thousands separators only in groups of three, an optional decimal part or /denominator
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def _brace_after_box(text: str, start: int) -> int | None:
    """Index of the `{` opening the box command at `start` (spaces allowed between), else None."""
    for box in _BOXES:
        if text.startswith(box, start):
            j = start + len(box)
            while j < len(text) and text[j] == " ":
                j += 1
            return j if j < len(text) and text[j] == "{" else None
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox, \\framebox) with balanced braces, else None."""
    start = max(text.rfind(b) for b in _BOXES)
    while start >= 0:
        brace = _brace_after_box(text, start)
        if brace is not None:
            depth = 0
            for i in range(brace, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[brace + 1 : i].strip()
        start = max(text.rfind(b, 0, start) for b in _BOXES)  # unbalanced or bare: an earlier box
    return None


def strict_answer(text: str) -> str | None:
    """The paper's extraction: the last box in the completion's last 4 lines, else None
    (an empty box counts as no answer)."""
    tail = "".join(text.strip().split("\n")[-STRICT_LAST_LINES:])
    boxed = last_boxed(tail)
    return boxed or None


def last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def flexible_answer(text: str, max_chars: int = 4000) -> str | None:
    """The last non-empty box in the last `max_chars` characters, else the last number there."""
    tail = text[-max_chars:]
    return last_boxed(tail) or last_number(tail)


def extract(text: str, extraction: str, max_chars: int = 4000) -> str | None:
    if extraction == "strict":
        return strict_answer(text[-max_chars:])
    if extraction == "flexible":
        return flexible_answer(text, max_chars)
    raise ValueError(f"unknown answer extraction {extraction!r}; choose one of {', '.join(EXTRACTIONS)}")


def check(parsed: str, reference: str) -> tuple[bool, str | None]:
    """(correct, error): an extracted answer against the reference, by math-verify.

    math-verify's own signal-based timeouts are off: the caller bounds the time (see
    tasks/reward.py, which runs every reward function under one per-row alarm). Errors,
    timeouts included, are returned, never read as a plain "wrong"."""
    from math_verify import parse, verify

    # its "timeout is disabled" warning: the caller's alarm is the timeout
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(f"${reference}$", parsing_timeout=None, raise_on_error=True)
    if not gold:
        return False, f"reference answer {reference!r} is not parseable"
    pred = parse(f"${parsed}$", parsing_timeout=None, raise_on_error=True)
    if not pred:
        return False, None  # an answer math-verify cannot read is simply wrong
    return bool(verify(gold, pred, timeout_seconds=None, raise_on_error=True)), None


_warm = False


def warm_up() -> None:
    """Import math-verify and parse once (sympy, the LaTeX grammar: seconds on a busy CPU),
    so that no row's time bound pays for it."""
    global _warm
    if not _warm:
        check("1", "1")
        _warm = True


# ---------------------------------------------------------------- n samples per problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> bool:
    """Majority vote over the first k samples' extracted answers (ties: the first seen;
    unanswered samples do not vote; no answer at all: wrong)."""
    votes = [(a.strip(), ok) for a, ok in zip(answers[:k], correct[:k]) if a is not None and a.strip()]
    if not votes:
        return False
    counts = Counter(a for a, _ in votes)
    best = max(counts.values())
    winner = next(a for a, _ in votes if counts[a] == best)
    return next(ok for a, ok in votes if a == winner)


def is_accuracy(key: str) -> bool:
    """An evaluation stat that is an accuracy: named <metric>_strict or <metric>_flexible."""
    return key.rsplit("_", 1)[-1] in EXTRACTIONS


HELDOUT = "heldout"


def set_stats(stats: dict) -> dict[str, dict]:
    """An evaluation's stats per evaluation set: `heldout`'s keys are bare (greedy_strict),
    another set's are prefixed with its name (gsm8k/greedy_strict)."""
    out: dict[str, dict] = {}
    for key, value in stats.items():
        if isinstance(value, dict):  # bookkeeping (the evaluate stage's per-set keys), not a stat
            continue
        name, _, rest = key.rpartition("/")
        out.setdefault(name or HELDOUT, {})[rest] = value
    return out


def ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, and n."""
    out = [1]
    while out[-1] * 2 <= n:
        out.append(out[-1] * 2)
    return out + ([n] if out[-1] != n else [])
