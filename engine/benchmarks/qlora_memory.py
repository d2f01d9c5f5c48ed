"""Benchmark 3, QLoRA part: what a 4-bit base with a LoRA/DoRA adapter costs, byte by byte.

    python -m engine.benchmarks.memory --part qlora [--act-seq 256] [--tiny] [--json PATH]

Measured, not estimated:
- bytes per weight of a linear layer in fp32, bf16, 8 bits and 4 bits (NF4, with and without double
  quantization): a matrix quantized by bitsandbytes on CPU, every tensor it keeps counted;
- parameters of each model shape, counted on the meta device (no memory, no weights): the linear
  layers bitsandbytes quantizes (all but the output head), the rest (embeddings, norms, head), and the
  trainable adapter of peft for LoRA and DoRA (r 16 on all linear layers);
- optimizer-state bytes per trainable parameter of torch AdamW and bitsandbytes AdamW8bit after one step;
- saved activations per token with gradient checkpointing (the engine's chunked loss, bf16 autocast),
  on a real 4-bit base of the 1B shape's width with 1 and 2 layers: per layer kept, one layer
  recomputed in backward, and the loss.
The totals at seq 2048, batch 1 combine these; the formulas are printed beside the numbers.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Any, Iterator

import torch

GIB = 2**30
R = 16  # adapter rank of the tables (recipes/qlora.toml)

SHAPES: dict[str, dict[str, Any]] = {
    "distilgpt2": {"model_type": "gpt2", "n_layer": 6},
    "Llama 1.1B": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                   "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "Llama 7B": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "Llama 13B": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "Llama 34B": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 48,
                  "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000},
    "Llama 70B": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                  "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000},
}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}


def config_of(shape: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    settings = dict(shape)
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


# ------------------------------------------------------------------ bytes per weight, measured
def weight_bytes_per_param() -> dict[str, float]:
    """Bytes each format keeps per weight of a 2048 x 4096 matrix (all tensors bitsandbytes keeps)."""
    import bitsandbytes.functional as F

    w = torch.randn(2048, 4096, generator=torch.Generator().manual_seed(0))
    n = w.numel()
    out = {"fp32": 4.0, "bf16": float(w.to(torch.bfloat16).element_size())}
    cb, scb, _ = F.int8_vectorwise_quant(w.half())
    out["8bit"] = (cb.nbytes + scb.nbytes) / n

    def nbytes_4bit(double: bool) -> int:
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type="nf4")
        total = packed.nbytes + state.absmax.nbytes + state.code.nbytes
        if state.nested:
            total += state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
        return total

    out["4bit"] = nbytes_4bit(False) / n
    out["4bit+dq"] = nbytes_4bit(True) / n
    return out


FORMULAS = {
    "fp32": "4",
    "bf16": "2",
    "8bit": "1 + 4/in (int8 weight, one fp32 scale per output row)",
    "4bit": "1/2 + 4/64 (two NF4 codes a byte, one fp32 scale per 64-weight block)",
    "4bit+dq": "1/2 + 1/64 + 4/(64*256) (the block scales in 8 bits, one fp32 scale per 256 of them; + a 256-entry fp32 code table per matrix)",
}


# ------------------------------------------------------------------ parameters, counted on the meta device
def counts(shape: dict[str, Any], dora: bool) -> dict[str, int]:
    """Quantizable linear weights, other parameters, adapter parameters, widest linear layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = config_of(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]
    quantized = sum(m.weight.numel() for m in linear)
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    widest = max(m.weight.numel() for m in linear)
    with torch.device("meta"):
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=2 * R, target_modules="all-linear", use_dora=dora))
    adapter = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return {"quantized": quantized, "other": total - quantized, "adapter": adapter, "widest": widest,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size}


def optimizer_bytes_per_param() -> dict[str, float]:
    """State bytes per trainable parameter after one step, on LoRA-shaped tensors (r 16 x 2048 and 2048 x 16)."""
    import bitsandbytes as bnb

    out = {}
    for name in ("adamw", "adamw8bit"):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(R, 2048, generator=g)), torch.nn.Parameter(torch.randn(2048, R, generator=g))]
        opt = torch.optim.AdamW(params, lr=1e-4) if name == "adamw" else bnb.optim.AdamW8bit(params, lr=1e-4)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt.step()
        state = sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        out[name] = state / sum(p.numel() for p in params)
    return out


# ------------------------------------------------------------------ activations per token, measured
@contextlib.contextmanager
def chunk_budget(elements: int) -> Iterator[None]:
    """engine/loss.py's logits-per-chunk budget for a while, so a short measurement takes the chunked path."""
    from engine import loss as loss_mod

    saved = loss_mod.chunked_loss_sum.__defaults__
    loss_mod.chunked_loss_sum.__defaults__ = (elements,)
    try:
        yield
    finally:
        loss_mod.chunked_loss_sum.__defaults__ = saved


def activation_costs(shape: dict[str, Any], seq: int, dora: bool) -> dict[str, float]:
    """Bytes per token: kept per layer with checkpointing, one layer's full activations, the loss part.

    A 4-bit base of the shape's width with 1 and 2 layers (random weights saved and loaded back
    quantized, as the engine loads a base), the adapter on all linear layers, bf16 autocast,
    the chunked loss; saved tensors counted as engine/benchmarks/memory.py counts them.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging

    from engine import quant
    from engine.benchmarks.memory import saved_activation_bytes

    logging.disable_progress_bar()
    measured = {}
    for layers in (1, 2):
        settings = {**shape, "num_hidden_layers": layers, "tie_word_embeddings": True}
        config = config_of(settings)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as folder:
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.float32, device_map={"": "cpu"})
        model = quant.prepare(model)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules="all-linear", use_dora=dora))
        model.train()
        for checkpointing in (False, True):
            if checkpointing:
                model.enable_input_require_grads()
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            for tokens in (seq // 2, seq):
                ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
                # the chunked loss as at seq 2048 (where logits exceed one chunk): 4 chunks at this length
                with chunk_budget((tokens - 1) * config.vocab_size // 4), torch.autocast("cpu", dtype=torch.bfloat16):
                    measured[(layers, checkpointing, tokens)] = saved_activation_bytes(model, batch, chunked=True)
        del model

    def per_token(layers: int, checkpointing: bool) -> float:  # the slope between the two lengths
        return (measured[(layers, checkpointing, seq)] - measured[(layers, checkpointing, seq // 2)]) / (seq - seq // 2)

    kept = per_token(2, True) - per_token(1, True)
    # what does not grow with the tokens: autocast's bf16 copies of fp32 weights (the output head's above all)
    fixed = measured[(1, True, seq)] - seq * per_token(1, True)
    return {
        "kept_per_layer": kept,
        "layer_full": per_token(2, False) - per_token(1, False),
        "loss": per_token(1, True) - kept,
        "fixed": fixed,
        "hidden": shape["hidden_size"],
        "vocab": shape["vocab_size"],
        "seq": seq,
    }


# ------------------------------------------------------------------ totals
def qlora_total(c: dict[str, int], w: dict[str, float], opt: float, act: dict[str, float], tokens: int) -> dict[str, float]:
    """Bytes of a QLoRA step at `tokens` tokens with checkpointing: each term and the sum.

    Per-token activation costs measured at one width scale with the hidden size for other shapes; the
    fixed part (autocast's bf16 copy of the fp32 output head) with hidden size x vocabulary.
    """
    scale = c["hidden"] / act["hidden"]
    fixed = act["fixed"] * (c["hidden"] * c["vocab"]) / (act["hidden"] * act["vocab"])
    parts = {
        "base (4-bit+dq linear, fp32 rest)": c["quantized"] * w["4bit+dq"] + c["other"] * 4,
        "adapter + grads (fp32)": c["adapter"] * 8,
        "optimizer (AdamW8bit)": c["adapter"] * opt,
        "activations (checkpointed)": tokens * scale * (c["layers"] * act["kept_per_layer"] + act["layer_full"] + act["loss"]) + fixed,
        "dequantized workspace (bf16)": c["widest"] * 2,
        "one loss chunk in backward": chunk_bytes(tokens, c["vocab"]),
    }
    parts["total"] = sum(parts.values())
    return parts


def chunk_bytes(tokens: int, vocab: int) -> int:
    """One chunk of logits while its loss is recomputed in backward: bf16 logits, fp32 copy, fp32 gradient."""
    from engine.loss import CHUNK_ELEMENTS

    return min(CHUNK_ELEMENTS, tokens * vocab) * (2 + 4 + 4)


def largest_fitting(points: list[tuple[int, float]], budget: float) -> float:
    """Parameters at which the total reaches the budget, interpolated between measured shapes."""
    points = sorted(points)
    for (p0, t0), (p1, t1) in zip(points, points[1:]):
        if t0 <= budget <= t1:
            return p0 + (p1 - p0) * (budget - t0) / (t1 - t0)
    if budget > points[-1][1]:  # beyond the largest shape: its bytes per parameter
        p, t = points[-1]
        return p * budget / t
    return 0.0


def run(act_seq: int = 256, tiny: bool = False, tokens: int = 2048) -> dict[str, Any]:
    shapes = {"tiny Llama": TINY} if tiny else SHAPES
    w = weight_bytes_per_param()
    opt = optimizer_bytes_per_param()
    print("QLoRA memory (benchmark 3): bytes per weight, measured with bitsandbytes")
    print(f"{'format':<10}{'bytes/weight':>14}  formula")
    for name, value in w.items():
        print(f"{name:<10}{value:>14.5f}  {FORMULAS[name]}")
    print(f"optimizer state per trainable parameter: AdamW {opt['adamw']:.3f}, AdamW8bit {opt['adamw8bit']:.3f} bytes")

    act_shape = TINY if tiny else SHAPES["Llama 1.1B"]
    acts = {kind: activation_costs(act_shape, act_seq, kind == "DoRA") for kind in ("LoRA", "DoRA")}
    print(f"\nsaved activations per token, 4-bit base {act_shape['hidden_size']} wide, bf16 autocast, chunked loss, seq {act_seq}")
    print(f"{'adapter':<8}{'kept/layer (ckpt)':>20}{'one layer full':>16}{'loss':>10}{'fixed (not per token)':>24}")
    for kind, a in acts.items():
        print(f"{kind:<8}{a['kept_per_layer']:>20,.0f}{a['layer_full']:>16,.0f}{a['loss']:>10,.0f}{a['fixed'] / 2**20:>20,.1f} MiB")

    rows: dict[str, Any] = {}
    print(f"\nper shape (r {R} on all linear layers; totals at seq {tokens}, batch 1, gradient checkpointing, AdamW8bit)")
    head = f"{'shape':<12}{'params':>9}{'fp32':>9}{'bf16':>9}{'8bit':>9}{'4bit':>9}{'4bit+dq':>9}{'LoRA':>9}{'DoRA':>9}{'opt':>8}{'acts':>9}{'QLoRA':>9}{'DoRA':>9}"
    print(head + "   (GiB; adapter and optimizer in MiB)")
    for name, shape in shapes.items():
        lora, dora = counts(shape, False), counts(shape, True)
        base = {k: lora["quantized"] * v + lora["other"] * (v if k in ("fp32", "bf16") else 4) for k, v in w.items()}
        total_lora = qlora_total(lora, w, opt["adamw8bit"], acts["LoRA"], tokens)
        total_dora = qlora_total(dora, w, opt["adamw8bit"], acts["DoRA"], tokens)
        params = lora["quantized"] + lora["other"]
        rows[name] = {"counts": lora, "dora_adapter": dora["adapter"], "base_bytes": base, "qlora": total_lora, "qdora": total_dora, "params": params}
        mib = 2**20
        print(f"{name:<12}{params / 1e9:>8.2f}B" + "".join(f"{base[k] / GIB:>9.2f}" for k in w)
              + f"{lora['adapter'] * 4 / mib:>9.1f}{dora['adapter'] * 4 / mib:>9.1f}{lora['adapter'] * opt['adamw8bit'] / mib:>8.1f}"
              + f"{total_lora['activations (checkpointed)'] / GIB:>9.2f}{total_lora['total'] / GIB:>9.2f}{total_dora['total'] / GIB:>9.2f}")
    fits = {}
    if not tiny:
        llamas = [(r["params"], r["qlora"]["total"]) for n, r in rows.items() if n.startswith("Llama")]
        for budget in (24, 80):
            fitting = [n for n, r in rows.items() if n.startswith("Llama") and r["qlora"]["total"] <= budget * GIB]
            fits[f"{budget} GiB"] = {"largest_shape": fitting[-1] if fitting else None, "params": largest_fitting(llamas, budget * GIB)}
            print(f"{budget} GiB: largest shape that fits {fits[f'{budget} GiB']['largest_shape']}; "
                  f"about {fits[f'{budget} GiB']['params'] / 1e9:.0f}B parameters (interpolated between the shapes)")
    return {"weight_bytes_per_param": w, "optimizer_bytes_per_param": opt, "activations_per_token": acts, "shapes": rows, "fits": fits}
