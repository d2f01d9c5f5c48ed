"""The original design's Python API, on top of the recipe engine (not a second implementation).

    from engine import LanguageModelTrainer, TextDataset, CONFIG

    trainer = LanguageModelTrainer({**CONFIG, "data_dir": "my_texts", "epochs": 1})
    trainer.train()                                   # model_dir/final_model/, model_dir/metrics.json
    print(trainer.evaluate_model(TextDataset("held_out.txt", trainer.tokenizer, 512)))
    print(trainer.generate("Once upon a time"))

The config dict is validated like a recipe (unknown keys and wrong types are UserErrors naming the
key, with "did you mean"), then turned into a recipe dict (`to_recipe`) and trained by engine.loop.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine import schema
from engine.errors import UserError
from engine.schema import opt

SCHEDULERS = ("cosine", "linear", "constant", "cosine_restarts", "cosine_with_restarts", "constant_with_warmup")


@dataclass
class ConfigSchema:
    """The keys of CONFIG, their types and defaults (the original design's)."""

    data_dir: str = opt("data", "folder whose .txt files are the training data")
    model_dir: str = opt("models", "where results go: final_model/, best/, metrics.json, recipe.toml")
    base_model: str = opt("distilgpt2", "hub id or local folder of the model to fine-tune")
    max_length: int = opt(512, "tokens per training block", min=2)
    batch_size: int = opt(4, "sequences per micro-batch", min=1)
    gradient_accumulation_steps: int = opt(4, "micro-batches per optimizer step", min=1)
    epochs: int = opt(3, "passes over the training data", min=1)
    learning_rate: float = opt(5e-5, "peak learning rate", gt=0.0)
    warmup_ratio: float = opt(0.1, "share of the steps spent warming up", min=0.0, lt=1.0)
    weight_decay: float = opt(0.01, "decoupled weight decay", min=0.0)
    use_mixed_precision: bool = opt(True, "bf16/fp16 autocast where the device supports it (train.precision auto)")
    use_gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    use_cosine_scheduler: bool = opt(True, "cosine schedule; false: lr_scheduler_type (linear when that says cosine)")
    use_data_augmentation: bool = opt(False, "add one word_swap-augmented copy of every training document")
    val_split: float = opt(0.1, "share of documents held out for validation", gt=0.0, lt=1.0)
    early_stopping_patience: int = opt(3, "evaluations without improvement before stopping (0: no early stopping)", min=0)
    lr_scheduler_type: Literal[SCHEDULERS] = opt("cosine", "scheduler when use_cosine_scheduler is false")  # type: ignore[valid-type]
    use_lora: bool = opt(True, "train a LoRA adapter instead of all weights")
    lora_r: int = opt(16, "LoRA rank", min=1)
    lora_alpha: int = opt(32, "LoRA alpha", min=1)
    lora_dropout: float = opt(0.1, "dropout on the LoRA path", min=0.0, lt=1.0)
    use_8bit_optimizer: bool = opt(False, "8-bit AdamW from bitsandbytes (adamw8bit) instead of torch AdamW")


CONFIG: dict[str, Any] = schema.defaults_table(ConfigSchema)

_SCHEDULER_PLUGIN = {"cosine_with_restarts": "cosine_restarts", "constant_with_warmup": "constant"}


def validate_config(config: dict[str, Any] | None) -> ConfigSchema:
    """CONFIG with `config` over it, checked; raises UserError listing every bad key."""
    if config is not None and not isinstance(config, dict):
        raise UserError(f"config: expected a dict like engine.CONFIG, got {type(config).__name__}")
    merged = {**CONFIG, **(config or {})}
    value, errors = schema.validate(merged, ConfigSchema, "", "config")
    if errors:
        raise UserError(*errors)
    return value


def to_recipe(cfg: ConfigSchema) -> dict[str, Any]:
    """The recipe dict that trains what the config describes."""
    if cfg.use_cosine_scheduler:
        scheduler = "cosine"
    else:
        scheduler = "linear" if cfg.lr_scheduler_type == "cosine" else _SCHEDULER_PLUGIN.get(cfg.lr_scheduler_type, cfg.lr_scheduler_type)
    recipe: dict[str, Any] = {
        "optimizer": "adamw8bit" if cfg.use_8bit_optimizer else "adamw",
        "scheduler": scheduler,
        "sinks": ["console", "jsonl"],
        "decoding": "sampling",
        "augmentations": ["word_swap"] if cfg.use_data_augmentation else [],
        "model": {"base": cfg.base_model},
        "data": {"train": str(Path(cfg.data_dir) / "*.txt"), "val_split": cfg.val_split, "max_length": cfg.max_length, "augment_copies": 1},
        "train": {
            "output_dir": cfg.model_dir,
            "final_dir": "final_model",
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "learning_rate": cfg.learning_rate,
            "weight_decay": cfg.weight_decay,
            "precision": "auto" if cfg.use_mixed_precision else "fp32",
            "gradient_checkpointing": cfg.use_gradient_checkpointing,
            "overwrite": True,
        },
        "lora": {"enabled": cfg.use_lora, "r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout},
        scheduler: {"warmup_ratio": cfg.warmup_ratio},
    }
    if cfg.early_stopping_patience > 0:
        recipe["early_stopping"] = "patience"
        recipe["patience"] = {"patience": cfg.early_stopping_patience}
    return recipe


# recipe keys set from the config, named in errors by the config's own keys
CONFIG_KEY_OF = {
    "model.base": "base_model", "data.train": "data_dir", "train.output_dir": "model_dir", "data.max_length": "max_length",
    "train.batch_size": "batch_size", "train.gradient_accumulation_steps": "gradient_accumulation_steps",
    "train.epochs": "epochs", "train.learning_rate": "learning_rate", "train.weight_decay": "weight_decay",
    "data.val_split": "val_split", "train.gradient_checkpointing": "use_gradient_checkpointing",
    "lora.r": "lora_r", "lora.alpha": "lora_alpha", "lora.dropout": "lora_dropout", "lora.enabled": "use_lora",
}
_RECIPE_KEY = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in CONFIG_KEY_OF) + r")(?![\w])")


def in_config_terms(exc: UserError) -> UserError:
    """The same error with the recipe keys the config sets named as the config names them (base_model, not model.base)."""
    return UserError(*(_RECIPE_KEY.sub(lambda m: CONFIG_KEY_OF[m.group(1)], line) for line in exc.lines))


def check_data_dir(data_dir: str) -> None:
    folder = Path(data_dir)
    if not folder.is_dir() or not any(folder.glob("*.txt")):
        where = folder.resolve()
        what = "does not exist" if not folder.is_dir() else "holds no .txt files"
        raise UserError(
            f"data_dir: '{data_dir}' ({where}) {what}; put your training text there as .txt files "
            f"(paragraphs separated by blank lines), or set data_dir in the config"
        )


class LanguageModelTrainer:
    """Train, load, evaluate and sample a causal LM with a config dict (keys of engine.CONFIG)."""

    def __init__(self, config: dict[str, Any] | None = None):
        self.settings = validate_config(config)
        self.config: dict[str, Any] = dataclasses.asdict(self.settings)
        self.model: Any = None
        self.tokenizer: Any = None
        self.summary: dict[str, Any] | None = None
        self._format: tuple[list[Any], Any] = ([], None)

    def recipe(self) -> dict[str, Any]:
        return to_recipe(self.settings)

    def train(self) -> dict[str, Any]:
        """Train with the engine; results go to model_dir (final_model/ inside). Returns metrics.json's contents.

        Afterwards the trainer holds the trained model: best/ when early stopping kept one, else final_model/.
        """
        from engine import loop
        from engine import recipe as recipe_mod
        from engine.advice import explain_out_of_memory

        check_data_dir(self.settings.data_dir)
        try:
            recipe = recipe_mod.from_dict(self.recipe(), "config (LanguageModelTrainer)")
            with explain_out_of_memory(recipe):
                self.summary = loop.train(recipe)
        except UserError as exc:
            raise in_config_terms(exc) from None
        out = Path(self.settings.model_dir)
        self.load_model(out / "best" if (out / "best").is_dir() else out / "final_model")
        return self.summary

    def load_model(self, path: str | Path) -> None:
        """Load a saved model or LoRA adapter folder (final_model/, best/, any save_pretrained folder)."""
        from engine import model as model_mod
        from engine.generate import run_format

        self.model, self.tokenizer = model_mod.load_trained(path)
        self._format = run_format(path)  # a run trained with data.format: generate() formats prompts as in training

    def _need_model(self) -> None:
        if self.model is None:
            raise UserError("no model: call train() or load_model(path) first")

    def evaluate_model(self, dataset: Any, batch_size: int | None = None) -> dict[str, float]:
        """Mean next-token loss (token-weighted) and perplexity over a dataset of token blocks (e.g. TextDataset)."""
        import torch

        from engine import data as data_mod
        from engine.loss import token_loss_sum

        from engine import model as model_mod

        self._need_model()
        batch_size = batch_size or self.settings.batch_size
        blocks = [item["input_ids"] for item in dataset]
        limit = model_mod.context_length(self.model)
        longest = max((len(b) for b in blocks), default=0)
        if limit is not None and longest > limit:
            raise UserError(
                f"dataset: its blocks hold up to {longest} tokens, more than the model's context ({limit}); "
                f"build it with max_length {limit} or less, e.g. TextDataset(path, trainer.tokenizer, {limit})"
            )
        device = next(self.model.parameters()).device
        nats, tokens = 0.0, 0
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(blocks), batch_size):
                batch = data_mod.collate(blocks[start : start + batch_size], self.tokenizer.pad_token_id)
                loss, n = token_loss_sum(self.model, {k: v.to(device) for k, v in batch.items()})
                nats, tokens = nats + float(loss), tokens + int(n)
        self.model.train(was_training)
        loss = nats / max(1, tokens)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": tokens}

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 0.7,
        top_p: float = 0.9,
        top_k: int = 50,
        repetition_penalty: float = 1.1,
        no_repeat_ngram_size: int = 2,
        raw: bool = False,
    ) -> str:
        """The continuation of prompt, sampled with the `sampling` decoding plugin and these options.

        For a model of a run trained with an instruction format (data.format = "prompt_completion" or
        "chat"), the prompt is formatted as in training (a user turn) and the answer ends where the
        model ends it; raw=True continues the prompt as plain text.
        """
        from engine.generate import generate_answer, generate_text
        from engine.manager import Plugins, select

        self._need_model()
        options = {
            "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "repetition_penalty": repetition_penalty, "no_repeat_ngram_size": no_repeat_ngram_size,
        }
        chosen, errors = select({"decoding": "sampling", "sinks": [], "optimizer": "", "scheduler": ""},
                                {"sampling": options}, lambda key: "generate()")
        if errors:
            raise UserError(*[e.replace("sampling.", "") for e in errors])
        formats, data_cfg = getattr(self, "_format", ([], None))
        if raw or not formats:
            return generate_text(self.model, self.tokenizer, Plugins(chosen), prompt)
        decoding = [c for c in chosen if c.kind != "format"]  # select() fills the format slot too: the run's format replaces it
        return generate_answer(self.model, self.tokenizer, Plugins(decoding + formats), data_cfg, prompt)
