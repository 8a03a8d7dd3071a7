"""`auto` precision: bfloat16 where this machine computes it faster, float32 where not.

Whether bfloat16 pays depends on the CPU: on one host (AMD EPYC with avx512_bf16, torch
2.13.0+cpu) the learner ran 1.5-1.7x faster under bf16 autocast and the samplers 1.45-1.6x;
on another host bfloat16 was slower. `model.dtype: auto` (the samplers) and
`learn.precision: auto` (the learner) are resolved when the parameters load, from

1. the device: CUDA -> bfloat16 / bf16-mixed where `torch.cuda.is_bf16_supported()`;
2. the CPU's flags (/proc/cpuinfo): no bfloat16 instructions (avx512_bf16, amx_bf16,
   avx_vnni... ARM bf16) -> float32 / fp32 without measuring;
3. otherwise a probe of about a second: the model's matrix shapes (576 x 1536, SmolLM2-135M)
   in float32 and in bfloat16, forward (what a sampler does) and forward + backward under
   autocast (what the learner does); bfloat16 is picked where it is at least 10% faster.

The result is kept per machine (CPU model, flags, torch version, threads) in
~/.cache/dashflow/precision.json and printed once per process. The concrete values are what
the stages see and hash into their keys, so two hosts that pick differently make different
stage outputs, as they should.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16, AMX-BF16; ARM BF16
MARGIN = 1.10
_printed: set[str] = set()


def _cpu() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", set()
    name, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and name == "unknown":
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name, flags


def _time(fn, budget_s: float = 0.25) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def probe(threads: int | None = None) -> dict[str, float]:
    """bfloat16 speed-up over float32 on this CPU: {"forward": x, "train": y}."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(256, 576)
    w1, w2 = torch.randn(576, 1536) * 0.02, torch.randn(1536, 576) * 0.02
    fwd32 = _time(lambda: (x @ w1).relu() @ w2)
    xb, w1b, w2b = x.bfloat16(), w1.bfloat16(), w2.bfloat16()
    fwd16 = _time(lambda: (xb @ w1b).relu() @ w2b)

    def step(autocast: bool):
        a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = ((x @ a).relu() @ b).float().square().mean()
            loss.backward()
        return run
    train32, train16 = _time(step(False)), _time(step(True))
    return {"forward": fwd32 / fwd16, "train": train32 / train16}


def machine() -> tuple[str, str, list[str]]:
    """(cache key, CPU name, its bfloat16 flags): the key covers the CPU model, all its flags,
    torch's version and thread count."""
    import torch

    name, flags = _cpu()
    ident = json.dumps([name, sorted(flags), torch.__version__, torch.get_num_threads()])
    return hashlib.sha256(ident.encode()).hexdigest()[:16], name, sorted(f for f in BF16_FLAGS if f in flags)


def cache_file() -> Path:
    return Path(os.environ.get("DASHFLOW_CACHE", Path.home() / ".cache" / "dashflow")) / "precision.json"


def choose(device_type: str) -> dict:
    """{"dtype": ..., "precision": ..., "why": ...} for this machine (cached per machine)."""
    import torch

    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return {"dtype": "bfloat16" if ok else "float32", "precision": "bf16-mixed" if ok else "fp32",
                "why": f"cuda {'supports' if ok else 'lacks'} bfloat16"}
    key, name, has = machine()
    if not has:
        return {"dtype": "float32", "precision": "fp32", "why": f"cpu {name}: no bfloat16 instructions"}
    cache = cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        speed = probe()
        known[key] = {"cpu": name, "flags": has, "torch": torch.__version__, **speed}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(cache)
        except OSError:
            pass
    speed = known[key]
    return {"dtype": "bfloat16" if speed["forward"] >= MARGIN else "float32",
            "precision": "bf16-mixed" if speed["train"] >= MARGIN else "fp32",
            "why": f"cpu {name} ({', '.join(has)}): bfloat16 forward x{speed['forward']:.2f}, "
                   f"forward+backward x{speed['train']:.2f} against float32 (probe, {cache})"}


def resolve(tree: dict, scoped: dict) -> None:
    """Replace `auto` in model.dtype and learn.precision (also in learn@i overrides) in place,
    and say once per process what was picked and why."""
    wants_dtype = tree.get("model", {}).get("dtype") == "auto"
    spots = [d for d in [tree.get("learn", {})] + [v for k, v in scoped.items() if k.startswith("learn@")]
             if d.get("precision") == "auto"]
    if not wants_dtype and not spots:
        return
    device = tree.get("run", {}).get("device", "auto")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    pick = choose("cuda" if str(device).startswith("cuda") else "cpu")
    if wants_dtype:
        tree["model"]["dtype"] = pick["dtype"]
    for d in spots:
        d["precision"] = pick["precision"]
    line = (f"precision auto: {'model.dtype -> ' + pick['dtype'] if wants_dtype else ''}"
            f"{', ' if wants_dtype and spots else ''}{'learn.precision -> ' + pick['precision'] if spots else ''}"
            f" ({pick['why']})")
    if line not in _printed:
        _printed.add(line)
        print(line, file=sys.stderr)
