"""Policy checkpoints: loading them (with a per-process model cache) and writing them.

Which model a name means (the embedded GGUF model, its conversion, a local directory or hub
id) is dashflow/core/models.py; token batches are dashflow/core/batches.py.

Every policy checkpoint (the base and each iteration's) is stored in the dtype the samplers
load (`stored_dtype`: `model.checkpoint_dtype`, by default `model.dtype`'s -- bfloat16 on
GPU, half the bytes of float32; float32 on this CPU, where bf16 is slower). The learner's float32 master weights stay
exact across iterations: with bfloat16 checkpoints, the optimizer state keeps the low 16
bits of every master weight (`split_master` / `join_master`), so policy + low bits are the
float32 weights bit for bit, while the policy alone is those weights rounded to nearest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dashflow.core.models import prewarmed

log = logging.getLogger(__name__)


def _quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-load bars are noise."""
    prewarmed()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# Loaded once per process (a flow runs every stage in one): tokenizers by the bytes of their
# files (every policy directory holds the same ones), and one inference model by its files'
# identity (path, inode, size, mtime_ns: a checkpoint lands by rename and is never written in
# place). Sampling, evaluation and reference scoring never change weights, so evaluate@i and
# sample@i+1 share policy@i, and learn@i hands over the float32 weights it has just written
# (offer_inference_model) instead of a reload. Learn releases the model before it trains.
_tokenizers: dict[str, object] = {}
_inference: dict[tuple, object] = {}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".index.json")


def load_tokenizer(path: str | Path):
    """The policy's tokenizer (left padding; pad = eos where it has none), shared in the process
    with every directory whose tokenizer files hold the same bytes; treat it as read-only."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith(("_", "."))
                   and not p.name.endswith(_WEIGHT_SUFFIXES)) if Path(path).is_dir() else []
    digest = hashlib.md5()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    key = digest.hexdigest() if files else f"name:{path}"
    if key not in _tokenizers:
        prewarmed()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _tokenizers[key] = tok
    return _tokenizers[key]


def load_model(path: str | Path, device: torch.device, dtype: str = "float32"):
    """A fresh model of its own (the learner trains it)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device)


def _files_identity(path: str | Path) -> tuple:
    from dashflow.core.store import stat_key  # what the store trusts an unchanged file by

    directory = Path(path).resolve()
    return (str(directory), tuple(sorted((f.name, *stat_key(f.stat())) for f in directory.iterdir() if f.is_file())))


def inference_model(path: str | Path, device: torch.device, dtype: str = "float32"):
    """The policy at `path` for sampling or scoring only (eval mode; callers run it under
    no_grad and never change its weights): the process keeps the last one (see above)."""
    key = (_files_identity(path), str(device), dtype)
    if key not in _inference:
        release_inference_model()  # one at a time: never two policies in (GPU) memory
        _inference[key] = load_model(path, device, dtype).eval()
    return _inference[key]


def offer_inference_model(path: str | Path, model, dtype: str) -> bool:
    """learn@i, after policy@i landed at `path`: its in-memory model as that policy's inference
    model, where it is bit for bit what the file holds (the file written from these float32
    weights, samplers computing in float32); the learner takes it back (release) before its
    next step. Returns whether it was taken."""
    params = list(model.parameters())
    if dtype != "float32" or any(p.dtype != torch.float32 for p in params) or getattr(model, "is_gradient_checkpointing", False):
        return False
    release_inference_model()
    _inference[(_files_identity(path), str(params[0].device), dtype)] = model
    return True


def take_inference_model(path: str | Path, device: torch.device):
    """For the learner: the float32 inference model of `path` the process holds (sample@0 loaded
    the base policy), out of the cache, instead of loading the same weights again (None: not
    held). It is what load_master(path, None, device) would load, bit for bit."""
    model = _inference.pop((_files_identity(path), str(device), "float32"), None)
    release_inference_model()  # whatever else is held: the learner needs the memory
    return model


def release_inference_model() -> None:
    _inference.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


LOW_BITS_FILE = "master_low16.safetensors"
# Policy checkpoints are written as safetensors shards of at most this many bytes (tensor by
# tensor, transformers' `max_shard_size`; a model under it stays one `model.safetensors`):
# DVC's md5 of one file runs on one core, and shards let the store hash them on every core
# (0.54 GB float32 135M: 5 shards, ~0.5 s on 2 cores instead of ~1.0 s). vLLM and
# from_pretrained read sharded checkpoints as they read a single file.
SHARD_SIZE = 128 * 10**6


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_save_lock = threading.Lock()


def write_weights(model, out: Path, state_dict: dict | None = None) -> None:
    """`model.save_pretrained` in SHARD_SIZE shards, each shard written by write_safetensors:
    transformers decides what is saved (tied weights, names, shards, index, configs); only
    the writing of each shard's bytes is ours, the shards written and md5-hashed on every
    core at once. The files are byte for byte what save_pretrained writes alone
    (tests/test_stages.py)."""
    import transformers.modeling_utils as modeling_utils

    shards = []
    with _save_lock:  # the hook is a module global for the length of one save
        library_writer = modeling_utils.safe_save_file
        modeling_utils.safe_save_file = lambda tensors, filename, metadata=None: shards.append(
            (dict(tensors), Path(filename), metadata))
        try:
            model.save_pretrained(out, state_dict=state_dict, max_shard_size=SHARD_SIZE)
        finally:
            modeling_utils.safe_save_file = library_writer
    with ThreadPoolExecutor(max_workers=min(len(shards), len(os.sched_getaffinity(0))) or 1) as writers:
        list(writers.map(lambda shard: write_safetensors(*shard), shards))


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None,
                      algo: str = "md5") -> None:
    """Write `tensors` as the safetensors file `path` through store.write_hashed (around the
    page cache, digested with `algo` on the way for the stage's landing). The layout is safetensors' own
    (header JSON with `__metadata__` first, tensors by descending element size then name,
    padded with spaces to 8 bytes), so the bytes equal `safetensors.torch.save_file`'s for
    metadata of at most one key (safetensors orders several keys as a hash map does)."""
    from dashflow.core import store

    if any(t.dtype not in _SAFETENSORS_DTYPES for t in tensors.values()):
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)  # a dtype this writer does not know: hashed as it lands
        return
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def pieces():
        yield struct.pack("<Q", len(blob)) + blob
        for name in order:
            t = tensors[name].detach()
            if t.numel():
                yield t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()

    store.write_hashed(path, pieces(), algo)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: `model.safetensors` or its shards."""
    return sorted(f for f in Path(path).glob("model*.safetensors") if f.is_file())


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint, by name, whether one file or shards."""
    from safetensors.torch import load_file

    return {name: t for file in weight_files(path) for name, t in load_file(file).items()}


def stored_dtype(model_cfg: dict) -> str:
    """The dtype policy checkpoints are stored in: `model.checkpoint_dtype`, or when null the
    samplers' (`model.dtype`: bfloat16 stays bfloat16, anything else is stored as float32).
    A sampler computing in float32 from bfloat16 checkpoints would sample a rounded policy
    that lags the learner's (docs/checkpoints.md)."""
    return model_cfg.get("checkpoint_dtype") or ("bfloat16" if model_cfg.get("dtype") == "bfloat16" else "float32")


def split_master(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 master weight -> (bfloat16 policy weight, int16 low bits) with
    `join_master(*split_master(w))` bit-identical to w. The policy weight is w rounded to
    the nearest bfloat16, ties away from zero (torch's own cast rounds ties to even; the
    two differ only on exact ties, and ties away is what makes the low bits enough): the
    upper 16 bits of w's float32 pattern, plus one in magnitude when the lower 16 bits are
    at least half a bfloat16 unit (0x8000)."""
    assert sys.byteorder == "little", "the bit split assumes a little-endian machine"
    halves = weight.detach().contiguous().view(torch.int16).view(*weight.shape, 2)
    low, high = halves[..., 0], halves[..., 1]
    up = (low < 0).to(torch.int16)  # low half >= 0x8000 read as int16 is negative
    policy = (high + up).view(torch.bfloat16)
    if not torch.isfinite(policy).all():
        raise ValueError("a float32 weight rounds past the largest bfloat16 (or is not finite)")
    return policy, low.clone()


def join_master(policy: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The float32 master weight split_master split (bit-identical)."""
    high = policy.contiguous().view(torch.int16) - (low < 0).to(torch.int16)
    return torch.stack([low, high], dim=-1).view(torch.float32).view(policy.shape)


def save_policy(model, tokenizer, out: Path, dtype: str) -> dict[str, torch.Tensor] | None:
    """Write `model` (float32 master weights) as a policy checkpoint in `dtype` into `out`.
    Returns the low bits of every master weight by parameter name when rounding loses them
    (bfloat16), None when the checkpoint holds the weights exactly (float32)."""
    low_bits = None
    if dtype == "bfloat16":
        state, low_bits, rounded = {}, {}, {}
        named = dict(model.named_parameters())
        for name, value in model.state_dict().items():
            if name in named and value.dtype == torch.float32:
                rounded[value.data_ptr()], low_bits[name] = split_master(value)
        for name, value in model.state_dict().items():  # tied weights share one rounding
            state[name] = rounded.get(value.data_ptr(), value.to(torch.bfloat16) if value.is_floating_point() else value)
        saved_dtype = model.config.dtype
        model.config.dtype = torch.bfloat16
        try:
            write_weights(model, out, state)
        finally:
            model.config.dtype = saved_dtype
    elif dtype == "float32":
        write_weights(model, out)
    else:
        raise ValueError(f"model.checkpoint_dtype must be bfloat16 or float32, not {dtype!r}")
    tokenizer.save_pretrained(out)
    return low_bits


def load_master(path: Path, low_bits: Path | None, device: torch.device):
    """The learner's float32 model from a policy checkpoint, made bit-exact with the low bits
    the previous learn kept (`low_bits`: its LOW_BITS_FILE; None: the checkpoint is exact,
    or it is the base policy, whose float32 weights are its checkpoint's)."""
    model = load_model(path, torch.device("cpu"), "float32")
    if low_bits is not None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        low = load_file(low_bits)
        stored = {}
        for file in weight_files(path):
            with safe_open(file, framework="pt") as f:
                stored.update({name: f.get_tensor(name) for name in f.keys() if name in low})
        named = dict(model.named_parameters())
        missing = sorted(set(named) - set(low))
        if missing:
            raise ValueError(f"{low_bits} has no low bits for {missing[:3]}")
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(join_master(stored[name], low[name]))
    return model.to(device)


def checkpoint_dtype(path: Path) -> str | None:
    """The dtype of a safetensors checkpoint's floating tensors (None: mixed, or not a
    safetensors checkpoint)."""
    from safetensors import safe_open

    dtypes = set()
    for file in weight_files(path):
        with safe_open(file, framework="pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    floats = {d for d in dtypes if d in ("F32", "BF16", "F16", "F64")}
    return {"F32": "float32", "BF16": "bfloat16"}.get(floats.pop()) if len(floats) == 1 else None


def chat_prompt(tokenizer, question: str, context: list[dict[str, str]] | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, ready for generation: the `context` turns
    (system, demonstrations; prompts.turns) and then the question as the user's turn."""
    messages = [*(context or []), {"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]


def context_length(path: str | Path) -> int | None:
    """The model's context in tokens (config.json max_position_embeddings), if it says."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    n = config.get("max_position_embeddings") or config.get("n_positions")
    return int(n) if isinstance(n, int) and n > 0 else None


def check_fits(prompts: list[tuple[str, list[int]]], max_new_tokens: int, context: int | None, *, stage: str,
               setting: str) -> None:
    """Every (prompt id, token ids) with `max_new_tokens` fits the model's context; else one
    error naming the longest prompt (nothing is fed on that would be cut or overrun)."""
    if context is None or not prompts:
        return
    pid, ids = max(prompts, key=lambda p: len(p[1]))
    if len(ids) + max_new_tokens > context:
        from dashflow.core.store import StageError

        raise StageError(f"{stage}: prompt {pid!r} is {len(ids):,} tokens; with {setting} = {max_new_tokens:,} it "
                         f"needs {len(ids) + max_new_tokens:,}, more than the model's context of {context:,} tokens. "
                         "Shorten or drop that row of the task, or lower " + setting)


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """The tokenizer's EOS plus the model's generation config's EOS ids."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)
