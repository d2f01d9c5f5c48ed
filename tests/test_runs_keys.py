"""`python -m engine runs` shows "-" for recipe keys that did not apply to a run (and drops rows that then agree)."""

from engine.runs import differing_keys, not_applying


SCRATCH = {  # as recipe.toml holds it: every key, defaults filled in
    "augmentations": [],
    "model": {"base": "distilgpt2", "config": {"model_type": "gpt2", "n_layer": 2}, "tokenizer_vocab_size": 1024, "pad_vocab_multiple": 64},
    "data": {"val": "", "val_split": 0.1, "augment_copies": 1},
    "train": {"epochs": 6, "max_steps": 0, "learning_rate": 0.003},
    "lora": {"enabled": False, "r": 16, "alpha": 32, "target_modules": []},
}
LORA = {
    "augmentations": [],
    "model": {"base": "runs/quickstart/final", "config": {}, "tokenizer_vocab_size": 4096, "pad_vocab_multiple": 64},
    "data": {"val": "held_out.txt", "val_split": 0.2, "augment_copies": 1},
    "train": {"epochs": 3, "max_steps": 30, "learning_rate": 0.002},
    "lora": {"enabled": True, "r": 8, "alpha": 32, "target_modules": ["c_attn"]},
}


def test_keys_that_do_not_apply_are_shown_as_a_dash():
    rows = dict(differing_keys([SCRATCH, LORA]))
    assert rows["model.base"] == ["-", '"runs/quickstart/final"']  # not "distilgpt2": the first run has no base model
    assert rows["model.tokenizer_vocab_size"] == ["1024", "-"]  # a pretrained base keeps its tokenizer
    assert rows["lora.r"] == ["-", "8"] and rows["lora.target_modules"] == ["-", '["c_attn"]']
    assert rows["lora.enabled"] == ["false", "true"]
    assert rows["data.val_split"] == ["0.1", "-"] and rows["data.val"] == ['""', '"held_out.txt"']
    assert rows["train.epochs"] == ["6", "-"] and rows["train.max_steps"] == ["0", "30"]
    assert rows["lora.alpha"] == ["-", "32"] and "data.augment_copies" not in rows  # applies to neither: no row


def test_not_applying_lists_by_kind_of_run():
    assert "model.base" in not_applying(SCRATCH) and "model.tokenizer_vocab_size" not in not_applying(SCRATCH)
    assert "model.tokenizer_vocab_size" in not_applying(LORA) and not any(k.startswith("lora.") for k in not_applying(LORA))
