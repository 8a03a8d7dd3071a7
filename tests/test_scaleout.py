"""Scaling out: per-request random streams, sampling on a local Ray cluster (2 workers on
this machine's 2 cores, through prefect-ray), a worker killed mid-stage, the learner as 2
torch.distributed ranks (gloo), and the vLLM engine's reply conversion."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_params
from dashflow.core import policy as policy_mod
from dashflow.core import samplers, schema, store
from dashflow.core.optimizer_state import OPTIMIZER_FILE
from dashflow.tasks import advantage, learn, prepare, reference, reward, sample
from dashflow.tasks import filter as filter_stage


def test_seeded_sampling_draws_from_the_processed_distribution():
    # softmax([log .5, log .3, log .2]) at T = 1: 20,000 streams, each one draw
    probs = torch.tensor([0.5, 0.3, 0.2])
    n = 20_000
    proc = samplers.SeededSampling([samplers.request_seed(3, i) for i in range(n)], 1.0, 0, 1.0, torch.device("cpu"))
    out = proc(None, probs.log().expand(n, 3).clone())
    choice = out.argmax(-1)
    assert torch.isinf(out).sum() == 2 * n and (out.max(-1).values == 0).all()   # exactly one token allowed per row
    freq = torch.bincount(choice, minlength=3).float() / n
    assert torch.allclose(freq, probs, atol=0.01), freq
    assert torch.allclose(proc.logprobs[0], probs.log()[choice])               # log-prob of the drawn token
    # the same stream gives the same draw, whoever else is in the batch
    again = samplers.SeededSampling([samplers.request_seed(3, 7)], 1.0, 0, 1.0, torch.device("cpu"))
    assert again(None, probs.log()[None].clone()).argmax(-1).item() == choice[7].item()


def _rows(params):
    return store.read_stage(params.layout.stage_dir("sample", 0), schema.ROLLOUTS, stage="test").to_pylist()


def _assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    key = lambda r: (r["prompt_id"], r["sample_index"])
    for x, y in zip(sorted(a, key=key), sorted(b, key=key)):
        for field in ("prompt_id", "sample_index", "prompt_token_ids", "completion_token_ids", "completion", "finish_reason"):
            assert x[field] == y[field], (field, x["prompt_id"], x["sample_index"])
        # same tokens; log-probs differ only by float rounding of different batch shapes
        assert all(math.isclose(u, v, abs_tol=1e-4) for u, v in zip(x["sampler_logprobs"], y["sampler_logprobs"]))


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    params = tiny_params(tmp_path_factory.mktemp("scaleout"), "one")
    prepare.run(params)
    return params, sample.run(params, 0)


def _two_workers(one_worker, tmp_path, name):
    params = tiny_params(tmp_path, name, **{"sample.workers": 2})
    shutil.copytree(one_worker[0].layout.base, params.layout.base)
    return params


@pytest.mark.slow
def test_two_ray_workers_sample_the_same_rows_as_one(prefect_server, one_worker, tmp_path):
    params = _two_workers(one_worker, tmp_path, "two")
    manifest = sample.run(params, 0)
    assert manifest.stats["workers"] == 2 and manifest.stats["rows"] == one_worker[1].stats["rows"] == 12
    assert manifest.key == one_worker[1].key                  # workers are not part of the stage key
    assert list(manifest.outputs) == list(one_worker[1].outputs) == ["part-00000.parquet", "part-00001.parquet"]
    _assert_same_rows(_rows(params), _rows(one_worker[0]))


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_output_is_complete(prefect_server, one_worker, tmp_path, monkeypatch,
                                                               capfd):
    # the Ray worker about to write shard 1 SIGKILLs itself once; Ray runs its job again
    monkeypatch.setenv(store.FAULT_ENV, "worker-shard@sample@0:1")
    params = _two_workers(one_worker, tmp_path, "killed")
    manifest = sample.run(params, 0)
    out = capfd.readouterr()
    assert "a worker died or was killed" in (out.out + out.err).lower()          # Ray saw the kill and retried
    assert list(manifest.outputs) == ["part-00000.parquet", "part-00001.parquet"]   # no partial or marker files
    assert sorted(p.name for p in params.layout.stage_dir("sample", 0).iterdir()) == sorted(
        ["part-00000.parquet", "part-00001.parquet", store.MANIFEST])
    _assert_same_rows(_rows(params), _rows(one_worker[0]))


def _call_gcs_without_token(job) -> tuple[str, str]:
    """Run on a Ray worker: what the local cluster's GCS answers a caller without the token
    (anyone on the network: Ray binds it to the machine's address, not loopback)."""
    import grpc
    import ray

    address = ray.get_runtime_context().gcs_address
    try:
        grpc.insecure_channel(address).unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")(b"", timeout=10)
        return address, "answered"
    except grpc.RpcError as exc:
        return address, exc.code().name


@pytest.mark.slow
def test_the_local_ray_cluster_refuses_a_caller_without_its_token(prefect_server, monkeypatch):
    import types

    from dashflow.core import scaleout

    # the cluster's workers import this file to run the probe
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RuntimeError, match="RAY_AUTH_MODE=disabled would start a local Ray cluster without"):
        scaleout.map_on_ray(_call_gcs_without_token, [types.SimpleNamespace(label="0")], name="probe")
    monkeypatch.delenv("RAY_AUTH_MODE")
    [(address, answer)] = scaleout.map_on_ray(_call_gcs_without_token, [types.SimpleNamespace(label="0")],
                                              name="probe")
    assert answer == "UNAUTHENTICATED", address


@pytest.mark.slow
def test_two_gloo_ranks_give_the_same_update_as_one_process(one_worker):
    params = one_worker[0].with_overrides({"filter.threshold": 0.0})  # keep every row with a nonzero advantage
    for stage in (reward, advantage, filter_stage, reference):
        stage.run(params, 0)
    def master() -> dict:  # the learner's float32 weights: the bfloat16 policy + the low bits
        low = params.layout.optimizer(0) / policy_mod.LOW_BITS_FILE
        model = policy_mod.load_master(params.layout.policy(0), low if low.exists() else None, torch.device("cpu"))
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    one = learn.run(params, 0)
    w1 = master()
    base = {k: v.float() for k, v in policy_mod.read_weights(params.layout.policy(-1)).items()}
    two = learn.run(params.with_overrides({"learn.launcher": "torchrun", "learn.nproc": 2}), 0, force=True)
    w2 = master()
    assert two.key == one.key and one.stats["updated"] and one.stats["rows"] >= 2
    for name in ("loss", "grad_norm", "entropy"):  # (an on-policy loss can be 0 up to float noise: abs_tol)
        assert math.isclose(one.stats[name], two.stats[name], rel_tol=1e-5, abs_tol=1e-7), \
            (name, one.stats[name], two.stats[name])
    # the mismatch is float noise (~4e-6) from batch shapes: equal in absolute terms
    assert math.isclose(one.stats["sampler_mismatch"], two.stats["sampler_mismatch"], abs_tol=1e-6)
    # the same update up to float rounding, relative to the update's size (AdamW's first step is
    # g / (|g| + eps): an element with |g| near eps may differ by a fraction of lr, the whole does not)
    d1 = torch.cat([(w1[k] - base[k]).flatten() for k in w1])
    d2 = torch.cat([(w2[k] - base[k]).flatten() for k in w1])
    assert d1.abs().max() > 1e-6 and ((d1 - d2).norm() / d1.norm()).item() < 1e-3
    s1 = torch.load(params.layout.optimizer(0) / OPTIMIZER_FILE)
    assert len(s1["state"]) == len(w1)


def test_vllm_engine_replies_convert_to_rollout_completions():
    """The engine process's replies (dashflow/core/vllm_engine.py) -> completions; a reply
    without one log-prob per token is an error naming the request (tests/test_vllm.py runs
    the engine itself)."""
    outs = [{"token_ids": [11, 12, 2], "logprobs": [-0.5, -1.25, -0.1], "finish_reason": "stop"},
            {"token_ids": [11, 12], "logprobs": [-0.5, -1.25], "finish_reason": "length"}]
    got = samplers.completions_from_engine(outs, False, [7, 8])
    assert [c.token_ids for c in got] == [[11, 12, 2], [11, 12]]
    assert [c.logprobs for c in got] == [[-0.5, -1.25, -0.1], [-0.5, -1.25]]
    assert [c.finish_reason for c in got] == ["stop", "length"]
    assert [c.logprobs for c in samplers.completions_from_engine(
        [dict(outs[0], logprobs=None)], True, [7])] == [[]]                      # greedy: none recorded
    with pytest.raises(ValueError, match="vLLM request 8: expected one log-prob per token \\(2\\), got 1"):
        samplers.completions_from_engine([outs[0], dict(outs[1], logprobs=[-0.5])], False, [7, 8])
    # a sampled token has a probability > 0: NaN or inf from the engine stops the batch (NaN weights, overflow)
    for bad in (float("nan"), float("-inf"), float("inf")):
        with pytest.raises(samplers.SamplerSyncError, match=f"vLLM request 8: a sampled token's log-prob is not "
                                                            f"finite \\({bad!r}\\)"):
            samplers.completions_from_engine([outs[0], dict(outs[1], logprobs=[-0.5, bad])], False, [7, 8])


def test_the_sync_check_fails_closed_on_probe_values_that_are_not_finite():
    """NaN compares false with everything: `gap > tolerance` let a NaN gap through. The probe's
    values are checked first, the engine's and the learner's, and the gap must be <= the tolerance."""
    learner = [-0.5, -1.0, -2.0]
    assert samplers.probe_problem([-0.51, -1.0, -2.02], learner) is None
    nan, inf = float("nan"), float("inf")
    assert samplers.probe_problem([-0.5, nan, nan], learner) == (
        "the engine's log-probs on the probe are not finite at 2 of 3 tokens (first: token 1 = nan)")
    assert samplers.probe_problem([-0.5, -1.0, -inf], learner) == (
        "the engine's log-probs on the probe are not finite at 1 of 3 tokens (first: token 2 = -inf)")
    assert samplers.probe_problem(learner, [nan, -1.0, -2.0]).startswith(
        "the learner's (the checkpoint's own) log-probs on the probe are not finite at 1 of 3 tokens")
    assert samplers.probe_problem([-0.5], learner) == "the probe gave 1 log-probs from the engine and 3 from the learner"
    assert samplers.probe_problem([], []) == "the probe gave 0 log-probs from the engine and 0 from the learner"


def test_without_a_vllm_environment_the_run_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DASHFLOW_VLLM_PYTHON", raising=False)
    with pytest.raises(samplers.StageError, match=r"sample.vllm_python: .*nowhere/python is not a file"):
        samplers.find_vllm_python(str(tmp_path / "nowhere" / "python"))
    monkeypatch.setenv("DASHFLOW_VLLM_PYTHON", str(tmp_path / "python"))
    (tmp_path / "python").write_text("")
    assert samplers.find_vllm_python(None) == str(tmp_path / "python")
