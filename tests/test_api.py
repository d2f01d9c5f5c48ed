"""The original design's Python API: CONFIG, LanguageModelTrainer, TextDataset, and `python -m engine` alone."""

import math

import pytest
import torch

from engine.errors import UserError
from engine.testing import write_corpus
from tests.conftest import direct_val_numbers, run_cli

ORIGINAL_KEYS = [
    "data_dir", "model_dir", "base_model", "max_length", "batch_size", "gradient_accumulation_steps", "epochs",
    "learning_rate", "warmup_ratio", "weight_decay", "use_mixed_precision", "use_gradient_checkpointing",
    "use_cosine_scheduler", "use_data_augmentation", "val_split", "early_stopping_patience", "lr_scheduler_type",
    "use_lora", "lora_r", "lora_alpha", "lora_dropout", "use_8bit_optimizer",
]


def test_config_holds_the_original_keys_and_defaults():
    from engine import CONFIG

    assert sorted(CONFIG) == sorted(ORIGINAL_KEYS)
    expected = {"base_model": "distilgpt2", "max_length": 512, "batch_size": 4, "gradient_accumulation_steps": 4, "epochs": 3,
                "learning_rate": 5e-5, "warmup_ratio": 0.1, "weight_decay": 0.01, "val_split": 0.1, "early_stopping_patience": 3,
                "lr_scheduler_type": "cosine", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.1}
    assert {k: CONFIG[k] for k in expected} == expected
    assert CONFIG["data_dir"] == "data" and CONFIG["model_dir"] == "models"


def test_unknown_and_wrong_config_keys_are_errors_with_suggestions():
    from engine import LanguageModelTrainer

    with pytest.raises(UserError) as info:
        LanguageModelTrainer({"learning_rat": 1e-4, "batch_size": "4", "lora_dropout": 1.5})
    lines = info.value.lines
    assert "config: learning_rat: unknown key (did you mean learning_rate?)" in lines
    assert "config: batch_size: expected an integer, got '4'" in lines
    assert any(l.startswith("config: lora_dropout: must be less than 1.0") for l in lines)


def test_config_maps_to_the_recipe_keys():
    from engine.api import to_recipe, validate_config

    r = to_recipe(validate_config({"use_8bit_optimizer": True, "use_cosine_scheduler": False, "lr_scheduler_type": "cosine_with_restarts",
                                   "use_data_augmentation": True, "early_stopping_patience": 2, "use_mixed_precision": False,
                                   "data_dir": "texts", "model_dir": "out", "warmup_ratio": 0.2}))
    assert r["optimizer"] == "adamw8bit" and r["scheduler"] == "cosine_restarts" and r["cosine_restarts"] == {"warmup_ratio": 0.2}
    assert r["augmentations"] == ["word_swap"] and r["early_stopping"] == "patience" and r["patience"] == {"patience": 2}
    assert r["data"]["train"] == "texts/*.txt" and r["train"]["output_dir"] == "out" and r["train"]["final_dir"] == "final_model"
    assert r["train"]["precision"] == "fp32"
    assert to_recipe(validate_config({"use_cosine_scheduler": False}))["scheduler"] == "linear"
    assert "early_stopping" not in to_recipe(validate_config({"early_stopping_patience": 0}))


@pytest.mark.slow
def test_dict_api_and_equivalent_recipe_give_the_same_metrics(tiny_model_dir, tmp_path):
    from engine import LanguageModelTrainer, TextDataset
    from engine import data as data_mod
    from engine import recipe as recipe_mod
    from engine.loop import train

    data_dir = tmp_path / "texts"
    data_dir.mkdir()
    write_corpus(data_dir / "a.txt", n_documents=20, seed=1)
    write_corpus(data_dir / "b.txt", n_documents=20, seed=2)
    config = {"data_dir": str(data_dir), "model_dir": str(tmp_path / "models"), "base_model": str(tiny_model_dir),
              "max_length": 128, "batch_size": 4, "gradient_accumulation_steps": 2, "epochs": 8, "learning_rate": 5e-2,
              "use_data_augmentation": True, "use_8bit_optimizer": True, "early_stopping_patience": 1, "lora_r": 8}
    trainer = LanguageModelTrainer(config)
    summary = trainer.train()
    models = tmp_path / "models"
    assert (models / "final_model" / "adapter_config.json").exists() and (models / "best").is_dir()
    assert not (models / "final").exists()

    recipe_toml = tmp_path / "same.toml"
    recipe_toml.write_text(f'''
augmentations = ["word_swap"]
optimizer = "adamw8bit"
scheduler = "cosine"
early_stopping = "patience"
sinks = ["jsonl"]
[model]
base = "{tiny_model_dir}"
[data]
train = "{data_dir}/*.txt"
max_length = 128
[train]
output_dir = "{tmp_path / 'recipe-run'}"
epochs = 8
batch_size = 4
gradient_accumulation_steps = 2
learning_rate = 5e-2
[lora]
r = 8
[patience]
patience = 1
''')
    same = train(recipe_mod.load(recipe_toml))
    for key in ("val_loss", "best_val_loss", "best_step", "train_loss", "steps", "tokens_seen", "trainable_params"):
        assert summary[key] == pytest.approx(same[key], rel=1e-6, abs=1e-9), key
    # early stopping fired, and the trainer holds the best model (not the last): its validation loss,
    # computed with transformers' own loss, is best_val_loss
    assert summary["stopped_early"] and summary["best_step"] < summary["steps"]
    val_docs = data_mod.split_documents(recipe_mod.from_dict(trainer.recipe(), "(test)")).val
    nats, tokens, _ = direct_val_numbers(trainer.model, trainer.tokenizer, val_docs, 128, packing="isolated")
    # isolated packing (positions restart per document): agrees to ~7e-5 here, not 1e-5 (unexplained yet);
    # the last model instead of the best is 1e-3 off
    assert nats / tokens == pytest.approx(summary["best_val_loss"], rel=2e-4)

    # evaluate_model: token-weighted loss over a TextDataset, checked against transformers' own loss
    val_file = write_corpus(tmp_path / "held_out.txt", n_documents=20, seed=9)
    dataset = TextDataset(str(val_file), trainer.tokenizer, 64)
    result = trainer.evaluate_model(dataset)
    nats = tokens = 0.0
    with torch.no_grad():
        for item in dataset:
            ids = item["input_ids"][None]
            nats += trainer.model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert result["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))

    # load_model: the saved best/ gives the same evaluation as the trained trainer holds
    other = LanguageModelTrainer(config)
    with pytest.raises(UserError, match="call train"):
        other.evaluate_model(dataset)
    other.load_model(models / "best")
    assert other.evaluate_model(dataset)["loss"] == pytest.approx(result["loss"], rel=1e-6)
    text = other.generate("The harbour", max_new_tokens=12)
    assert isinstance(text, str) and len(other.tokenizer(text)["input_ids"]) >= 3
    with pytest.raises(UserError, match="temperature: must be greater than 0.0"):
        other.generate("The harbour", temperature=0)


def test_generate_passes_its_arguments_to_transformers(tiny_model_dir):
    """Non-default arguments, at a fixed seed, give exactly transformers' sample with the same settings;
    the defaults are the original design's (temperature 0.7, top_p 0.9, top_k 50, ...)."""
    from transformers import set_seed

    from engine import LanguageModelTrainer

    trainer = LanguageModelTrainer()
    trainer.load_model(tiny_model_dir)
    model, tokenizer = trainer.model, trainer.tokenizer
    with torch.no_grad():  # an untrained model's next-token distribution is nearly flat: sharpen it so options matter
        model.transformer.ln_f.weight.mul_(8)
    enc = tokenizer("The harbour", return_tensors="pt")

    def native(seed, **kwargs):
        set_seed(seed)
        out = model.generate(**enc, do_sample=True, pad_token_id=tokenizer.pad_token_id, **kwargs)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    defaults = {"max_new_tokens": 200, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1, "no_repeat_ngram_size": 2}
    chosen = {"max_new_tokens": 9, "temperature": 1.4, "top_p": 0.6, "top_k": 11, "repetition_penalty": 1.3, "no_repeat_ngram_size": 1}
    set_seed(5)
    text = trainer.generate("The harbour", **chosen)
    assert text == native(5, **chosen) and len(tokenizer(text)["input_ids"]) >= 8
    for key in ("temperature", "top_p", "top_k", "no_repeat_ngram_size"):  # each of them changes this sample
        assert native(5, **{**chosen, key: defaults[key]}) != text, key
    set_seed(5)
    assert trainer.generate("The harbour", max_new_tokens=9) == native(5, **{**defaults, "max_new_tokens": 9})


def test_engine_alone_explains_itself_and_needs_data(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2
    assert "training like the original language_model.py with engine.CONFIG" in result.stdout
    assert ".txt files in ./data/" in result.stdout and "models/final_model" in result.stdout
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert "data_dir: 'data'" in line and "does not exist" in line and "Traceback" not in result.stderr
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.md").write_text("not a txt file")
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2 and "holds no .txt files" in result.stderr
    assert run_cli("--help", cwd=tmp_path).returncode == 0
