"""The base model, its tokenizer, and LoRA.

A model comes from `model.base` (a local folder or a hub id, through from_pretrained) or is built
from the `model.config` table to train from scratch; then its tokenizer is a byte-level BPE trained
on the training text and saved with the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from engine.errors import UserError

EOS = "<|endoftext|>"


def _hub_help(base: str) -> str:
    return (
        f"model.base: '{base}' is not a local folder and could not be loaded from the hub; "
        f"check the name and your network, or point model.base at a local folder holding config.json, "
        f"the weights and the tokenizer (e.g. one written by save_pretrained)"
    )


def train_tokenizer(documents: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on the documents (tokenizers library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    # long documents in pieces cut at clean line breaks: the same pre-tokens, so the same tokenizer,
    # counted on all cores (engine/tokcache.py)
    from engine.tokcache import pieces

    tok.train_from_iterator((piece for doc in documents for piece in pieces(doc)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def load_tokenizer(model_cfg: Any, train_documents: Sequence[str], cache: Path | None = None) -> Any:
    from transformers import AutoTokenizer

    source = model_cfg.tokenizer or ("" if model_cfg.config else model_cfg.base)
    if not source:
        from engine import tokcache

        return tokcache.trained_tokenizer(train_documents, model_cfg.tokenizer_vocab_size, cache, train_tokenizer)
    key = "model.tokenizer" if model_cfg.tokenizer else "model.base"
    if os.path.isdir(source) and not any(
        (Path(source) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        raise UserError(
            f"{key}: folder '{source}' has no tokenizer (no tokenizer.json or tokenizer_config.json); save one there "
            f"with tokenizer.save_pretrained, or set model.tokenizer to a folder that has one"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    except OSError:
        if os.path.isdir(source):
            raise UserError(f"{key}: could not load a tokenizer from folder '{source}'") from None
        raise UserError(_hub_help(source)) from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer of '{source}' has no end-of-text token; documents need one between them")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg: Any, tokenizer: Any) -> Any:
    """The causal LM in fp32 (mixed precision is applied by Accelerate's autocast)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_cfg.config:
        settings = dict(model_cfg.config)
        model_type = settings.pop("model_type", None)
        if not model_type:
            raise UserError("model.config: needs model_type (e.g. model_type = \"gpt2\")")
        try:
            config = AutoConfig.for_model(model_type, **settings)
        except (ValueError, TypeError) as exc:
            raise UserError(f"model.config: {exc}") from None
        multiple = model_cfg.pad_vocab_multiple
        config.vocab_size = -(-len(tokenizer) // multiple) * multiple
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        model = AutoModelForCausalLM.from_config(config, attn_implementation=model_cfg.attention, dtype=torch.float32)
        if config.vocab_size > len(tokenizer):  # padding ids: never targets; never generated either
            model.generation_config.suppress_tokens = list(range(len(tokenizer), config.vocab_size))
        return model
    base = model_cfg.base
    if os.path.isdir(base) and not (Path(base) / "config.json").exists():
        raise UserError(f"model.base: folder '{base}' has no config.json; point it at a folder written by save_pretrained")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base,
            trust_remote_code=model_cfg.trust_remote_code,
            attn_implementation=model_cfg.attention,
            dtype=torch.float32,
            **({"device_map": model_cfg.device_map} if model_cfg.device_map else {}),
        )
    except OSError:
        if os.path.isdir(base):
            raise UserError(f"model.base: could not load model weights from folder '{base}'") from None
        raise UserError(_hub_help(base)) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def context_length(model: Any) -> int | None:
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def apply_lora(model: Any, lora_cfg: Any, trainable_tokens: list[int] | None = None) -> Any:
    """A peft LoRA model; trainable_tokens: embedding rows (tokens added for a chat template) trained and saved with the adapter."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules) or None,
        **({"trainable_token_indices": list(trainable_tokens)} if trainable_tokens else {}),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {exc}; set lora.target_modules to the model's module names") from None


def use_fused_activations(model: Any) -> int:
    """Swap GELUs computed as a chain of Python tensor ops for PyTorch's fused tanh-GELU; returns how many.

    transformers' NewGELUActivation (gelu_new) and FastGELUActivation (gelu_fast) compute
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in six to eight kernels forward and more backward;
    F.gelu(approximate="tanh") is the same function in one (transformers' own GELUTanh, which it
    documents as equivalent up to rounding). Only the module in memory changes: the saved config
    still names the original activation, so the saved model loads and runs anywhere as before.
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def enable_gradient_checkpointing(model: Any) -> None:
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def parameter_counts(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and other 1-D parameters get none."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def load_trained(path: str | Path) -> tuple[Any, Any]:
    """Load a saved model or LoRA adapter folder (final/, best/) with its tokenizer, for inference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such model folder")
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    elif (path / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    else:
        raise UserError(f"{path}: holds neither a model (config.json) nor a LoRA adapter (adapter_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
