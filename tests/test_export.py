"""python -m shala.export: a trained adapter as a portable peft folder, or merged into a standalone model."""

import json

import pytest
import torch

from shala import evaluate, export, train
from tests.test_train import FAST
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = save_tiny(root / "tiny")
    train.main(["--model", model, "--output-dir", str(root / "run"), *FAST, "--steps", "2", "--lr", "1e-2",
                "--no-eval-before"])
    return model, root / "run" / "final"


def test_the_final_adapter_names_its_base_and_has_a_model_card(trained):
    model, final = trained
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == model
    card = (final / "README.md").read_text()
    for text in (f"base_model: {model}", "library_name: peft", "Command: `python -m shala.train", "## Evaluation",
                 "jsd", "load_model("):
        assert text in card, text


def test_merged_export_loads_in_plain_transformers_with_the_adapters_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from shala.models import load_model

    model, final = trained
    out = export.main(["--adapter", str(final), "--out", str(tmp_path / "merged"), "--merge"])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # shala.evaluate --model reads the merged model's prompt and form as it would the adapter's
    assert evaluate.trained_meta(None, out) == evaluate.adapter_meta(final) != {}
    assert evaluate.trained_meta(None, model) == {}
    assert (out / "generation_config.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with_adapter = load_model(model, adapter=str(final))
    ids = torch.tensor([[5, 17, 40, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, with_adapter(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = pipeline("text-generation", model=out, tokenizer=tok, device="cpu")("Premise:", max_new_tokens=2)
    assert isinstance(text[0]["generated_text"], str)


def test_adapter_export_and_its_errors(trained, tmp_path):
    model, final = trained
    out = export.main(["--adapter", str(final), "--out", str(tmp_path / "adapter")])
    assert (out / "adapter_model.safetensors").is_file() and not (tmp_path / "adapter.tmp").exists()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export.main(["--adapter", str(final), "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="no adapter_config.json there"):
        export.main(["--adapter", str(tmp_path), "--out", str(tmp_path / "x")])
