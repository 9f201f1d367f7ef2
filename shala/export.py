"""python -m shala.export: a trained adapter as a folder that peft, or transformers alone, loads.

``python -m shala.export --adapter runs/shala/final --out DIR`` writes the adapter
with its base named as users can load it (a hub id for the shipped GGUF model), its
tokenizer and model card. ``--merge`` folds the adapter into the base model's weights
and writes a standalone Hugging Face model folder (safetensors weights, config,
generation config, tokenizer; the GGUF quantization config removed) that
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``pipeline("text-generation",
model=DIR)`` load with no SHALA installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from shala.choices import DTYPES

log = logging.getLogger("shala.export")

__all__ = ["export", "main"]


def _base_of(meta: dict, adapter: Path, model: Optional[str]) -> str:
    if model:
        return model
    if "base_model" not in meta:
        raise ValueError(f"--adapter {adapter}: no shala.json names its base model; pass --model")
    return meta["base_model"]


def export(adapter, out, *, merge: bool = False, model: Optional[str] = None, dtype: str = "float32") -> Path:
    """Write ``adapter`` (a ``shala.train`` output's ``final/``) to ``out``; see the module docstring."""
    from shala.evaluate import adapter_meta
    from shala.models import adapter_folder, load_model, load_tokenizer
    from shala.outputs import name_base_model

    adapter, out = adapter_folder(adapter), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; name a new folder")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    trained = adapter_meta(adapter)  # shala.json, or {} for an adapter shala.train did not write
    if merge and trained.get("frozen_head"):
        raise ValueError(f"--merge: {adapter} was trained with --frozen-head, so its prompts' head is read by the base "
                         "model without the adapter; merged weights cannot do that: export the adapter instead")
    base = _base_of(trained, adapter, model)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if merge:
        peft_model = load_model(base, dtype=dtype, adapter=str(adapter))
        merged = peft_model.merge_and_unload()
        if hasattr(merged.config, "quantization_config"):  # the GGUF file's: these weights are not quantised
            del merged.config.quantization_config
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(base).save_pretrained(tmp)
        for name in ("README.md", "shala.json"):
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, tmp / name)
    else:
        shutil.copytree(adapter, tmp)
        name_base_model(tmp, base)
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    log.info("wrote %s (%s)", out, "merged model" if merge else "adapter")
    return out


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m shala.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="a peft adapter folder written by shala.train (OUTPUT/final)")
    p.add_argument("--out", required=True, help="a new folder to write")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights: a standalone model")
    p.add_argument("--model", default=None, help="the base model (default: the one in the adapter's shala.json)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the merged weights")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return export(args.adapter, args.out, merge=args.merge, model=args.model, dtype=args.dtype)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad options, missing or existing paths
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
