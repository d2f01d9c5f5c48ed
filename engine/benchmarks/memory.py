"""Benchmark 3: memory on CPU, measured exactly rather than by process size.

    python -m engine.benchmarks.memory [--seq 512] [--batch 4] [--layers 6] [--part all|design|qlora] [--json PATH]

The distilgpt2 architecture (GPT2Config(n_layer=6): 768 wide, 12 heads, vocab 50257) is built from
its config (no download) at the original design's settings, seq 512 x batch 4, fp32 on CPU.

1. Saved activations: the bytes autograd keeps for backward during one forward pass and loss, counted
   with torch.autograd.graph.saved_tensors_hooks (each storage once; parameters excluded), with LoRA
   r=16 on c_attn as in the design. Gradient checkpointing is measured with the reentrant variant,
   whose kept block inputs go through the same hooks (the non-reentrant variant keeps the same
   tensors, but outside autograd's saved tensors, where the hooks cannot see them). Each is measured
   with the plain loss (full fp32 logits) and with the engine's chunked loss (engine/loss.py).
2. Optimizer state: bytes of every tensor in optimizer.state after one step of torch AdamW and of
   bitsandbytes AdamW8bit, for full fine-tuning of the whole model (LoRA's state is a few MB either way).

The design promised -50% activations from checkpointing and -75% optimizer state from 8-bit AdamW.

3. QLoRA (--part qlora; engine/benchmarks/qlora_memory.py): bytes per parameter of the base weights in
   fp32, bf16, 8 and 4 bits (with and without double quantization), measured by quantizing with
   bitsandbytes; adapter, gradient and optimizer-state bytes counted on models built on the meta
   device (distilgpt2 and Llama-style shapes from 1B to 70B, never trained); saved activations per
   token with checkpointing, measured on a 4-bit base of the 1B width; and from those the largest
   model that fits 24 GiB and 80 GiB at seq 2048, batch 1.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from engine import loss as loss_mod


def build_model(layers: int, seq: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_positions=max(1024, seq), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def saved_activation_bytes(model: Any, batch: dict[str, torch.Tensor], chunked: bool) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_mod.token_loss_sum(model, batch, chunked)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def activations(seq: int, batch_size: int, layers: int) -> list[dict[str, Any]]:
    from peft import LoraConfig, get_peft_model

    model = build_model(layers, seq)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn"]))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        for chunked in (False, True):
            rows.append({"checkpointing": checkpointing, "chunked_loss": chunked, "bytes": saved_activation_bytes(model, batch, chunked)})
    return rows


def optimizer_state_bytes(kind: str, layers: int, seq: int) -> tuple[int, int]:
    model = build_model(layers, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt.step()
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total, sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.benchmarks.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=6, help="GPT-2 layers (6: distilgpt2)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this path")
    ap.add_argument("--part", choices=("all", "design", "qlora"), default="design", help="design (default): activations and optimizer state of the design's setting; qlora: the QLoRA tables; all: both")
    ap.add_argument("--act-seq", type=int, default=256, help="tokens of the QLoRA activation measurement (per-token costs)")
    ap.add_argument("--tiny", action="store_true", help="QLoRA part at a tiny width (checks the plumbing quickly)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    result: dict[str, Any] = {"settings": vars(args)}
    if args.part in ("all", "qlora"):
        from engine.benchmarks import qlora_memory

        result["qlora"] = qlora_memory.run(args.act_seq, args.tiny)
    if args.part == "qlora":
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)
        return 0

    acts = activations(args.seq, args.batch, args.layers)
    base = acts[0]["bytes"]
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    print(f"Saved activations, GPT-2 {args.layers} layers (distilgpt2 architecture), seq {args.seq} x batch {args.batch}, fp32, LoRA r=16 on c_attn")
    print(f"{'gradient checkpointing':<24}{'loss':<10}{'saved bytes':>14}{'vs baseline':>13}{'promised':>10}")
    for r in acts:
        change = (r["bytes"] - base) / base
        promised = "-50%" if r["checkpointing"] and not r["chunked_loss"] else ""
        r["change"] = change
        print(f"{'on' if r['checkpointing'] else 'off':<24}{'chunked' if r['chunked_loss'] else 'plain':<10}{mib(r['bytes']):>14}{change:>+13.1%}{promised:>10}")

    adamw, n = optimizer_state_bytes("adamw", args.layers, args.seq)
    adam8, _ = optimizer_state_bytes("adamw8bit", args.layers, args.seq)
    print(f"\nOptimizer state after one step, full fine-tuning ({n:,} parameters)")
    print(f"{'optimizer':<28}{'state bytes':>14}{'bytes/param':>13}{'vs AdamW':>10}{'promised':>10}")
    print(f"{'torch AdamW (fp32)':<28}{mib(adamw):>14}{adamw / n:>13.2f}{0:>+10.1%}{'':>10}")
    print(f"{'bitsandbytes AdamW8bit':<28}{mib(adam8):>14}{adam8 / n:>13.2f}{(adam8 - adamw) / adamw:>+10.1%}{'-75%':>10}")
    if args.json:
        result |= {"activations": acts, "optimizer": {"parameters": n, "adamw_bytes": adamw, "adamw8bit_bytes": adam8,
                  "change": (adam8 - adamw) / adamw}, "promised": {"checkpointing": -0.5, "adamw8bit": -0.75}}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
