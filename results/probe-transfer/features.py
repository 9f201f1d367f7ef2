"""The base model's hidden states at the answer slot, on every item of the training split, the held-out split,
the transfer sets and CommitmentBank, written to one ``.npz`` file for ``probe.py``.

    python results/probe-transfer/features.py OUT.npz [--model NAME] [--every K]

The prompts are the default recipe's (three answered items read once by the base model, ``--frozen-head``), and the
slot is the one SHALA reads. Every ``K``-th decoder layer's output is kept, and the last layer's after the final
norm (the one the label logits are read from); that one is checked against the logits ``shala.lm`` returns.
"""
import argparse
import tempfile
import time

import numpy as np
import torch

from shala.config import load_config
from shala.lm import FrozenHead, next_token_logits, prompt_head
from shala.train import Trainer

SHARED = "../shared/data"
VARIERR = "lewidi2025:" + SHARED + "/lewidi2025/VariErrNLI/VariErrNLI_{}.json"  # evaluated, never fitted on
SETS = ["ambient=bundled:ambient-crowd", f"pk2019=chaosnli:{SHARED}/nli_extra/pk2019.jsonl",
        f"cb=chaosnli:{SHARED}/nli_extra/commitmentbank.jsonl"] + [
    f"varierr-{s}={VARIERR.format(s)}" for s in ("train", "dev", "test")]


def slot_states(model, builder, rows, head: FrozenHead, layers, batch_size: int = 16) -> dict:
    """{layer: [N, d] float32} at the answer slot; ``"final"``: the last layer after the final norm."""
    core = model.get_base_model().model
    stash = {}
    hooks = [core.layers[i].register_forward_hook(
        lambda m, a, out, i=i: stash.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in layers]
    hooks.append(core.norm.register_forward_hook(lambda m, a, out: stash.__setitem__("final", out)))
    prompts = [builder.prompt_ids(r["inputs"]) for r in rows]
    n = len(head.tokens)
    short = [r["id"] for r, p in zip(rows, prompts) if p[:n] != head.tokens or len(p) <= n]
    if short:
        raise ValueError(f"{len(short)} prompt(s) do not begin with the whole head, e.g. {short[:3]}")
    feats = {k: np.empty((len(rows), core.norm.weight.shape[0]), np.float32) for k in list(layers) + ["final"]}
    lm_head = model.get_base_model().lm_head
    cap = getattr(model.get_base_model().config, "final_logit_softcapping", None)
    try:
        for start in range(0, len(rows), batch_size):
            batch = prompts[start : start + batch_size]
            logits = next_token_logits(model, batch, builder.tokenizer.pad_token_id, common_prefix=head)
            # the last call is the rests' forward: right-padded after the head, each read at its last token
            last = torch.tensor([len(p) - n - 1 for p in batch])
            rows_at = torch.arange(len(batch))
            for k in feats:
                feats[k][start : start + len(batch)] = stash[k][rows_at, last].float().numpy()
            again = lm_head(stash["final"][rows_at, last])
            if cap:
                again = torch.tanh(again / cap) * cap
            if not torch.allclose(again.float(), logits.float(), atol=1e-3, rtol=1e-3):
                raise AssertionError("the slot's hidden state does not give the logits shala.lm read")
    finally:
        for h in hooks:
            h.remove()
    return feats


def main(out_path: str, model: str = None, every: int = 3) -> None:
    argv = ["--output-dir", tempfile.mkdtemp() + "/run"] + (["--model", model] if model else [])
    for spec in SETS:
        argv += ["--eval-dataset", spec]
    trainer = Trainer(load_config(argv))  # the default's data, prompts and head; it trains nothing here
    sets = {"train": trainer.data.train_rows, **trainer.data.eval_sets}
    peft_model = trainer.policy.model.eval()  # a fresh LoRA adds nothing: the base model
    depth = len(peft_model.get_base_model().model.layers)
    layers = sorted(set(range(every - 1, depth, every)) | {depth - 1})
    head = FrozenHead(prompt_head(trainer.builder.prompt_ids, sets["train"][0]["inputs"]))
    arrays = {"prior": np.asarray(trainer.data.prior, np.float64), "layers": np.asarray(layers)}
    for name, rows in sets.items():
        t0 = time.perf_counter()
        feats = slot_states(peft_model, trainer.builder, rows, head, layers)
        arrays[f"{name}/ids"] = np.asarray([r["id"] for r in rows])
        arrays[f"{name}/q"] = np.asarray([list(r["probs"]) for r in rows], np.float64)
        for k, v in feats.items():
            arrays[f"{name}/h{k}"] = v
        print(f"{name}: {len(rows)} items, {time.perf_counter() - t0:.0f} s", flush=True)
    np.savez_compressed(out_path, **arrays)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--model", default=None, help="the base model (default: the default recipe's)")
    parser.add_argument("--every", type=int, default=3, help="keep every K-th decoder layer's output")
    args = parser.parse_args()
    main(args.out, args.model, args.every)
