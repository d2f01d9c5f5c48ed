"""The base model, its tokenizer, and LoRA.

A model comes from `model.base` (a local folder or a hub id, through from_pretrained) or is built
from the `model.config` table to train from scratch; then its tokenizer is a byte-level BPE trained
on the training text and saved with the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from engine import hub
from engine.errors import UserError

EOS = "<|endoftext|>"


def _hub_help(base: str) -> str:
    return (
        f"model.base: '{base}' is not a local folder and could not be loaded from the hub; "
        f"check the name and your network, or point model.base at a local folder holding config.json, "
        f"the weights and the tokenizer (one written by save_pretrained, `hf download {base} --local-dir DIR`, "
        f"or a finished run); a model already in your Hugging Face cache loads offline with HF_HUB_OFFLINE=1"
    )


def resolve_base(base: str) -> str:
    """model.base as from_pretrained takes it: a finished run's folder means its final model.

    A LoRA run's final/ is an adapter, not a model: merge it first (python -m engine merge).
    """
    from engine import runfolder

    path = Path(base)
    if not path.is_dir() or runfolder.is_model_folder(path) or not (path / "recipe.toml").exists():
        return base
    try:
        folder = runfolder.model_folder(path)
    except UserError as exc:
        raise UserError(f"model.base: {exc.lines[0]}") from None
    if (folder / "adapter_config.json").exists():
        raise UserError(
            f"model.base: '{base}' is a LoRA run, its {folder.name}/ is an adapter; merge it into a standalone model "
            f"first (python -m engine merge {base} OUT_DIR) and set model.base to OUT_DIR"
        )
    return str(folder)


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

    source = model_cfg.tokenizer or ("" if model_cfg.config else resolve_base(model_cfg.base))
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
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code, **hub.load_options(source, key))
    except OSError:
        if os.path.isdir(source):
            raise UserError(f"{key}: could not load a tokenizer from folder '{source}'") from None
        raise UserError(hub.offline_help(source, key) if hub.offline() else _hub_help(source)) from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer of '{source}' has no end-of-text token; documents need one between them")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg: Any, tokenizer: Any, mixed_precision: str = "no") -> Any:
    """The causal LM in fp32 (mixed precision is applied by Accelerate's autocast).

    With model.quantization its linear layers are loaded quantized (engine/quant.py), computing in
    the dtype of mixed_precision (Accelerate's value: "no", "bf16" or "fp16").
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine import quant

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
    base = resolve_base(model_cfg.base)
    if os.path.isdir(base) and not (Path(base) / "config.json").exists():
        raise UserError(f"model.base: folder '{base}' has no config.json; point it at a folder written by save_pretrained")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base,
            trust_remote_code=model_cfg.trust_remote_code,
            attn_implementation=model_cfg.attention,
            dtype=torch.float32,
            **({"device_map": model_cfg.device_map} if model_cfg.device_map else {}),
            **hub.load_options(base, "model.base"),
            **quant.load_options(model_cfg, quant.compute_dtype(mixed_precision)),
        )
    except OSError:
        if os.path.isdir(base):
            raise UserError(f"model.base: could not load model weights from folder '{base}'") from None
        raise UserError(hub.offline_help(base, "model.base") if hub.offline() else _hub_help(base)) from None
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


def lora_config(lora_cfg: Any, trainable_tokens: list[int] | None = None) -> Any:
    """peft's LoraConfig for the lora section; trainable_tokens: embedding rows (tokens added for a chat
    template) trained and saved with the adapter (peft's trainable_token_indices)."""
    from peft import LoraConfig

    targets = lora_cfg.target_modules
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets if isinstance(targets, str) else (list(targets) or None),
        use_dora=lora_cfg.use_dora,
        use_rslora=lora_cfg.use_rslora,
        modules_to_save=list(lora_cfg.modules_to_save) or None,
        init_lora_weights=True if lora_cfg.init == "default" else lora_cfg.init,
        bias=lora_cfg.bias,
        **({"trainable_token_indices": list(trainable_tokens)} if trainable_tokens else {}),
    )


def apply_lora(model: Any, lora_cfg: Any, trainable_tokens: list[int] | None = None) -> Any:
    """The model with a LoRA adapter (peft); a quantized base is first prepared for k-bit training."""
    from peft import get_peft_model

    from engine import quant

    quantized = quant.is_quantized(model)
    if quantized:
        model = quant.prepare(model)
    try:
        model = get_peft_model(model, lora_config(lora_cfg, trainable_tokens))
    except ValueError as exc:
        key = "lora.modules_to_save" if lora_cfg.modules_to_save and "modules_to_save" in str(exc) else "lora.target_modules"
        raise UserError(f"{key}: {exc}; set {key} to the model's module names") from None
    except RuntimeError as exc:
        if quantized and "floating point" in str(exc):
            raise UserError(
                f"lora.modules_to_save: {list(lora_cfg.modules_to_save)} names a quantized layer, which cannot be "
                f"trained; keep quantized layers out of lora.modules_to_save (embeddings and the output head stay "
                f"unquantized), or set model.quantization = \"none\""
            ) from None
        raise
    if quantized:
        quant.check_trainable(model)
    return model


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


def skip_padding_check(model: Any) -> int:
    """Turn off transformers' check for a forgotten attention mask on this model instance; returns how many.

    The check (warn_if_padding_and_no_attention_mask) reads input ids back from the GPU on every
    forward, a host-device sync. The engine gives a mask whenever a batch has padding (engine/feed.py)
    and leaves it out only when nothing is masked, so the check can only warn wrongly.
    """
    from transformers import PreTrainedModel

    count = 0
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.warn_if_padding_and_no_attention_mask = lambda input_ids, attention_mask: None
            count += 1
    return count


def enable_gradient_checkpointing(model: Any, every: int = 1) -> None:
    """Recompute activations in backward (non-reentrant torch.utils.checkpoint), in every `every`-th block.

    every = 1 checkpoints every transformer block; 2 every other one (the rest keep their activations):
    less recomputation for less memory saved. transformers does the selection (every_n_layers) where
    it can; older versions get the same flags set on their checkpointing layers here.
    """
    import inspect

    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "every_n_layers" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if every > 1:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index % every == 0


def checkpointed_blocks(model: Any) -> list[bool]:
    """For each transformer block, whether its activations are recomputed in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [bool(m.gradient_checkpointing) for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


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
    from engine import quant

    quantized = quant.settings_of_run(path)
    if (path / "adapter_config.json").exists() and quantized is not None:
        model = load_quantized_adapter(path, quantized)
    elif (path / "adapter_config.json").exists():
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


def adapter_base(path: Path) -> str:
    """The base model an adapter folder was trained on (adapter_config.json's base_model_name_or_path)."""
    import json

    return json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path") or ""


def load_quantized_base(base: str, settings: Any) -> Any:
    """The base quantized as its run trained it (settings: engine.quant.settings_of_run)."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine import quant

    dtype = quant.compute_dtype(quant.precision_of(settings.precision))
    try:
        return AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, **({"device_map": settings.device_map} if settings.device_map else {}),
            **quant.load_options(settings, dtype),
        )
    except OSError as exc:
        raise UserError(f"{base}: could not load the adapter's base model ({exc}); is the base model still where the run found it?") from None


def load_quantized_adapter(path: Path, settings: Any) -> Any:
    """An adapter folder on its base, loaded quantized as the run trained it."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_quantized_base(adapter_base(path), settings), str(path))
