"""`python -m engine merge RUN_DIR OUT_DIR [--dtype fp32|bf16|fp16]`: fold a run's LoRA adapter into its
base model (peft's merge_and_unload) and save a standalone model with its tokenizer, in safetensors,
that plain transformers loads with AutoModelForCausalLM.from_pretrained(OUT_DIR).

A run that trained on a quantized base (model.quantization, recorded in its recipe.toml) had its
adapter learn against the quantized weights, so the base is loaded quantized as trained, dequantized
to the chosen dtype (transformers' dequantize), and the adapter merged into that: the merged model
computes what the adapter on the quantized base computed, up to rounding. Merging into the original
full-precision weights instead would add the quantization error back.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from engine import runfolder
from engine.errors import UserError

DTYPES = ("fp32", "bf16", "fp16")


def merge(run_dir: str | Path, out_dir: str | Path, dtype: str = "fp32") -> Path:
    """Returns the adapter folder that was merged."""
    import torch
    from transformers import AutoTokenizer

    from engine import quant

    if dtype not in DTYPES:
        raise UserError(f"--dtype: '{dtype}'; expected one of {', '.join(DTYPES)}")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    adapter = runfolder.model_folder(run_dir)
    out = Path(out_dir)
    if not (adapter / "adapter_config.json").exists():
        raise UserError(
            f"{adapter}: is a full fine-tune, not a LoRA adapter; it is already a standalone model "
            f"(load it with AutoModelForCausalLM.from_pretrained('{adapter}')), there is nothing to merge"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; give a new or empty folder for the merged model")
    settings = quant.settings_of_run(adapter)
    with warnings.catch_warnings():  # libraries' deprecation notices about each other are not the user's business
        warnings.simplefilter("ignore", FutureWarning)
        if settings is None:
            from peft import AutoPeftModelForCausalLM

            try:
                model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch_dtype)
            except OSError as exc:
                raise UserError(f"{adapter}: could not load the adapter's base model ({exc}); is the base model still where the run found it?") from None
        else:
            model = dequantized_with_adapter(adapter, settings, torch_dtype)
        merged = model.merge_and_unload()
    if settings is not None:
        restore_architecture(merged)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    _write_card(adapter, out, model.peft_config["default"].base_model_name_or_path)
    return adapter


def dequantized_with_adapter(adapter: Path, settings: Any, dtype: Any) -> Any:
    """The base quantized as the run trained it, dequantized to dtype, with the adapter on it (on CPU)."""
    from types import SimpleNamespace

    from peft import PeftModel

    from engine import model as model_mod

    on_cpu = SimpleNamespace(**{**vars(settings), "device_map": {"": "cpu"}})
    base = model_mod.load_quantized_base(model_mod.adapter_base(adapter), on_cpu)
    base = base.dequantize(dtype=dtype)
    base.to(dtype)  # the layers that were never quantized (embeddings, norms, head) as well
    return PeftModel.from_pretrained(base, str(adapter))


def restore_architecture(model: Any) -> None:
    """Give back the layer types that quantization replaced and dequantization did not restore.

    bitsandbytes quantizes GPT-2's Conv1D layers as (transposed) linear layers, and transformers'
    dequantize leaves nn.Linear there; saved like that, the weights would not load into GPT-2 again.
    The architecture is read from a model built from the config on the meta device (no memory).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(model.config)
    for name, module in reference.named_modules():
        if isinstance(module, Conv1D):
            linear = model.get_submodule(name)
            if isinstance(linear, torch.nn.Linear):
                conv = Conv1D(module.nf, linear.in_features)
                conv.weight = torch.nn.Parameter(linear.weight.detach().T.contiguous(), requires_grad=False)
                conv.bias = linear.bias
                model.set_submodule(name, conv)


def _write_card(adapter: Path, out: Path, base: str) -> None:
    """The merged model's card, from the adapter's run (recipe.toml, metrics.json, curves.png) when there is one."""
    from engine import modelcard, recipe as recipe_mod

    run = runfolder.run_of(adapter)
    if run is None:
        return
    try:
        recipe = recipe_mod.from_dict(runfolder.read_recipe(run), str(run / "recipe.toml"))
    except UserError:  # a recipe of another version: no card rather than a wrong one
        return
    summary = runfolder.read_summary(run) if (run / "metrics.json").exists() else None
    note = f"Merged by `python -m engine merge` from the LoRA adapter `{adapter}`."
    modelcard.write(out, recipe, summary, run, kind="merged model", base=base, note=note)
