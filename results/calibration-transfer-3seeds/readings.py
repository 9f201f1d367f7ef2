"""The answer-slot distributions of the base model and of trained adapters on every item of the training split,
the held-out split and the transfer sets, written to one JSON file for ``analyse.py``.

    python results/calibration-transfer-3seeds/readings.py OUT.json [ADAPTER ...] [--model NAME]

Each ADAPTER is a run's ``final`` folder trained with the default recipe (three answered items read by the base
model, ``--frozen-head``); the prompts are built as that recipe builds them, and the label prior is the training
split's, as in training's own evaluation. With no ADAPTER only the base model is read; ``--model`` names another
base model (``gemma3-270m``), its prompts built as the default recipe builds them for it.
"""
import argparse
import json
import tempfile

import torch

from shala.config import load_config
from shala.evaluate import predict
from shala.lm import FrozenHead, prompt_head
from shala.models import load_model
from shala.train import Trainer

VARIERR = "lewidi2025:../shared/data/lewidi2025/VariErrNLI/VariErrNLI_{}.json"  # evaluated, never trained on
SETS = ["ambient=bundled:ambient-crowd", "pk2019=chaosnli:../shared/data/nli_extra/pk2019.jsonl"] + [
    f"varierr-{s}={VARIERR.format(s)}" for s in ("train", "dev", "test")]


def readings(model, trainer, sets) -> dict:
    head = FrozenHead(prompt_head(trainer.builder.prompt_ids, sets["train"][0]["inputs"]))
    out = {}
    for name, rows in sets.items():
        p, _ = predict(model, trainer.builder, rows, progress=False, common_prefix=head)
        out[name] = {"ids": [r["id"] for r in rows], "q": [list(r["probs"]) for r in rows], "p": p.tolist()}
        print(f"{name}: {len(rows)} items", flush=True)
    return out


def main(out_path: str, adapters: list, model: str = None) -> None:
    argv = ["--output-dir", tempfile.mkdtemp() + "/run"] + (["--model", model] if model else [])
    for spec in SETS:
        argv += ["--eval-dataset", spec]
    trainer = Trainer(load_config(argv))  # the default's data, prompts and frozen head; it trains nothing here
    sets = {"train": trainer.data.train_rows, **trainer.data.eval_sets}
    result = {"prior": [float(x) for x in trainer.data.prior], "label_names": trainer.data.label_names,
              "base": readings(trainer.policy.model, trainer, sets)}  # a fresh LoRA adds nothing: the base model
    for path in adapters:
        result[path] = readings(load_model(trainer.cfg.model, adapter=path), trainer, sets)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("adapters", nargs="*")
    parser.add_argument("--model", default=None, help="the base model (default: the default recipe's)")
    args = parser.parse_args()
    main(args.out, args.adapters, args.model)
