"""Terminal output of a run: one line per iteration, and where everything is at the end."""

from __future__ import annotations

from rich.console import Console

from dashflow.core.answers import HELDOUT, set_stats

console = Console(highlight=False, soft_wrap=True)


def _pct(x: float | None) -> str:
    return "   - " if x is None else f"{100 * x:5.1f}%"


def _sampled_key(stats: dict) -> str | None:
    """The mean@n key of an evaluation's stats (n samples per prompt), if it sampled."""
    return next((k.rsplit("_", 1)[0] for k in stats if k.startswith("mean@") and k.endswith("_strict")), None)


def eval_line(ev: dict) -> str:
    """Greedy (and mean@n) accuracy, strict next to flexible: `greedy 12.5% / 40.6%`."""
    parts = [f"greedy {_pct(ev.get('greedy_strict'))} / {_pct(ev.get('greedy_flexible'))}"]
    mean = _sampled_key(ev)
    if mean:
        n = mean.split("@")[1]
        parts.append(f"{mean} {_pct(ev.get(mean + '_strict'))} / {_pct(ev.get(mean + '_flexible'))}")
        parts.append(f"pass@{n} {_pct(ev.get(f'pass@{n}_strict'))} / {_pct(ev.get(f'pass@{n}_flexible'))}")
    return "  ".join(parts) + " (strict / flexible)"


def print_iteration(m: dict, cached: bool = False) -> None:
    t = m["time"]
    ev = m.get("eval", {})
    console.print(
        f"iter {m['iteration']:3d}{' (cached)' if cached else ''} | reward {m['reward_mean']:.3f} "
        f"acc {_pct(m.get('strict_accuracy'))} / {_pct(m.get('flexible_accuracy'))} kept {_pct(m['kept_fraction'])} len {m['mean_completion_tokens']:5.1f} "
        + (f"rounds +{m['dynamic_rounds']} groups {m['batch_groups']} " if m.get("dynamic_rounds") is not None else "")
        + "| "
        f"time sample {t['sampling']:6.1f}s reward {t['reward']:5.1f}s learn {t['learner']:6.1f}s "
        f"overhead {t['overhead']:5.1f}s"
        + "".join(f" | eval{'' if name == HELDOUT else ' ' + name} {eval_line(st)}"
                  for name, st in set_stats(ev).items())
    )
    lm = m.get("learner") or {}
    if lm.get("loss") is not None:
        extra = "".join(f" {name} {lm[key]:.4f}" for name, key in (("clip", "clip_fraction"), ("kl_ref", "kl_to_reference"),
                                                                    ("tis_w", "tis_weight"), ("tis_masked", "mismatch_masked"))
                    if lm.get(key) is not None)
        console.print(
            f"         learner | steps {lm.get('optimizer_steps')} loss {lm['loss']:+.4f} grad_norm {lm['grad_norm']:.3f} "
            f"entropy {lm.get('entropy') or 0:.3f} mismatch {lm.get('sampler_mismatch') or 0:.4f}{extra} "
            f"| {lm.get('tokens_per_s') or 0:.0f} tok/s", style="dim")


def print_summary(s: dict) -> None:
    base, final = s.get("base_eval") or {}, s.get("final_eval") or {}
    console.print()
    if base and final:
        console.print("eval accuracy, strict (the DASH paper's checker) / flexible (last box, else last number):")
        for name, st in set_stats(final).items():
            start = set_stats(base).get(name, {})
            console.print(f"  {name:<12s} base        : {eval_line(start)}")
            console.print(f"  {name:<12s} iteration {s['final_eval_iteration']:<2d}: {eval_line(st)}")
    root = s["run"]
    console.print(f"rollouts    : {root}/iter-*/{{rollouts,rewarded,advantaged,kept}}/part-*.parquet")
    console.print(f"checkpoints : {root}/iter-*/policy/  (final: {s.get('final_policy')})")
    console.print(f"metrics     : {root}/iter-*/metrics.json, {root}/summary.json, evals in {root}/*/eval/")
    if s.get("report"):
        console.print(f"report      : {s['report']} (and report.html beside it)")
