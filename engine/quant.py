"""A base model loaded in 8 or 4 bits (bitsandbytes through transformers), and the recipe rules around it.

- `problems`: combinations of recipe keys that cannot work (full fine-tuning of a quantized base, a
  quantized model built from model.config, 4-bit settings without 4 bits, ...), one line each; the
  recipe loader reports them with every other problem, before any model loads.
- `bnb_config`: transformers' BitsAndBytesConfig for model.quantization, model.quant_type and
  model.double_quant, with the compute dtype following the training precision.
- `load_options`: from_pretrained keyword arguments for a quantized base: the config and the device
  the quantized weights live on (bitsandbytes quantizes while loading; the weights cannot move later).
- `prepare`: peft's prepare_model_for_kbit_training (base frozen, non-quantized weights in fp32).
- `settings_of_run`: the quantization a run trained with (its recipe.toml), so eval, generate and
  merge load the base as it was trained.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine.errors import UserError

# the model section's defaults for the 4-bit settings (engine/recipe.py ModelSection)
DEFAULT_QUANT_TYPE = "nf4"
DEFAULT_DOUBLE_QUANT = True


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def problems(model_cfg: Any, lora_cfg: Any, where: Any) -> list[str]:
    """Every impossible combination of quantization and LoRA keys; where(dotted_key) names its file."""
    out: list[str] = []
    q = model_cfg.quantization
    if q != "none":
        if not lora_cfg.enabled:
            out.append(
                f'{where("model.quantization")}: model.quantization: "{q}" freezes the base in {q[0]} bits, whose weights '
                f"cannot be trained; full fine-tuning (lora.enabled = false) needs model.quantization = \"none\", or keep "
                f"the quantized base and train a LoRA adapter on it (lora.enabled = true: QLoRA)"
            )
        if model_cfg.config:
            out.append(
                f'{where("model.quantization")}: model.quantization: "{q}" quantizes pretrained weights loaded from '
                f'model.base; a model built from model.config starts from random weights: set model.quantization = "none"'
            )
    if q != "4bit":
        if model_cfg.quant_type != DEFAULT_QUANT_TYPE:
            out.append(
                f'{where("model.quant_type")}: model.quant_type: "{model_cfg.quant_type}" is a 4-bit data type and applies '
                f'only with model.quantization = "4bit" (it is "{q}")'
            )
        if model_cfg.double_quant != DEFAULT_DOUBLE_QUANT:
            out.append(
                f'{where("model.double_quant")}: model.double_quant: applies only with model.quantization = "4bit" '
                f'(it is "{q}"); remove the key'
            )
    if lora_cfg.enabled:
        if lora_cfg.init == "orthogonal" and lora_cfg.r % 2:
            out.append(f'{where("lora.init")}: lora.init: "orthogonal" needs an even lora.r, got {lora_cfg.r}')
    return out


def compute_dtype(mixed_precision: str) -> Any:
    """The dtype 8/4-bit layers compute in: Accelerate's mixed_precision ("no", "bf16", "fp16")."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def precision_of(requested: str) -> str:
    """Accelerate's mixed_precision value for a train.precision, as training resolves it on this machine."""
    import torch

    if requested == "fp32":
        return "no"
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        # native bf16 only (compute capability 8+): by default torch also says True where bf16 is merely
        # emulated (V100, T4: a bf16 tensor can be made), which trains far slower than fp16 there
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "no"


def bnb_config(model_cfg: Any, dtype: Any) -> Any:
    """BitsAndBytesConfig for the model section, or None for model.quantization = "none"."""
    if model_cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.quant_type,
        bnb_4bit_use_double_quant=model_cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_options(model_cfg: Any, dtype: Any) -> dict[str, Any]:
    """from_pretrained keyword arguments for the base: the quantization config and where it lives.

    bitsandbytes quantizes each weight as it is loaded, on the device it is loaded to, and a
    quantized model cannot be moved afterwards; so without model.device_map the whole model goes to
    this process's device (one GPU per process under DDP: Accelerate's local device).
    """
    config = bnb_config(model_cfg, dtype)
    if config is None:
        return {}
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UserError(
            f'model.quantization: "{model_cfg.quantization}" cannot be combined with FSDP here (the engine keeps '
            f"bitsandbytes' uint8 storage, which FSDP cannot shard); launch without the FSDP config: each process "
            f"then holds its own quantized copy (DDP), which is what QLoRA saves memory for"
        )
    if model_cfg.quantization == "8bit":
        _say_once("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
    options: dict[str, Any] = {"quantization_config": config}
    if not model_cfg.device_map:
        from accelerate import PartialState

        device = PartialState().device
        options["device_map"] = {"": device if device.type != "cuda" else device.index or 0}
    return options


def _say_once(logger_name: str, prefix: str) -> None:
    """Let a library's warning that repeats at every forward pass through once (8-bit layers in fp32)."""
    import logging

    logger = logging.getLogger(logger_name)
    if any(getattr(f, "prefix", None) == prefix for f in logger.filters):
        return

    class Once(logging.Filter):
        def __init__(self) -> None:
            super().__init__()
            self.prefix, self.seen = prefix, False

        def filter(self, record: logging.LogRecord) -> bool:
            if not str(record.msg).startswith(self.prefix):
                return True
            seen, self.seen = self.seen, True
            return not seen

    logger.addFilter(Once())


def prepare(model: Any, gradient_checkpointing: bool = False) -> Any:
    """peft's preparation of a quantized base for training an adapter: base frozen, other weights fp32."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )


def check_trainable(model: Any) -> None:
    """After peft: a trainable weight that is quantized (lora.modules_to_save naming a quantized layer)."""
    for name, p in model.named_parameters():
        if p.requires_grad and not p.dtype.is_floating_point:
            raise UserError(
                f"lora.modules_to_save: '{name}' is quantized ({p.dtype}) and cannot be trained; keep quantized layers "
                f"out of lora.modules_to_save (embeddings and the output head stay unquantized), or set model.quantization = \"none\""
            )


def settings_of_run(model_dir: Path) -> Any | None:
    """The quantization a run trained with (model.* keys and train.precision of its recipe.toml), when it
    quantized its base; None otherwise, or for a model folder outside a run."""
    from types import SimpleNamespace

    from engine import runfolder

    run = runfolder.run_of(model_dir)
    if run is None:
        return None
    recorded = runfolder.read_recipe(run)
    table = recorded.get("model", {})
    if table.get("quantization", "none") == "none":
        return None
    return SimpleNamespace(
        quantization=table["quantization"],
        quant_type=table.get("quant_type", DEFAULT_QUANT_TYPE),
        double_quant=table.get("double_quant", DEFAULT_DOUBLE_QUANT),
        device_map=table.get("device_map", ""),
        precision=recorded.get("train", {}).get("precision", "auto"),
    )
