"""Loss, perplexity and bits per character of token blocks: used by training and `python -m engine eval`.

Validation blocks overlap by one token (data.build_blocks(..., for_eval=True)), so every token but the
first is a target exactly once; the mean is over target tokens (token-weighted), and bits per
character divide the total by the characters the targets stand for (comparable across tokenizers).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch

from engine import data as data_mod
from engine import report
from engine.loss import token_loss_sum


@torch.no_grad()
def evaluate(
    model: Any, accelerator: Any, blocks: list[torch.Tensor], batch_size: int, pad_id: int, n_chars: int, chunked: bool | str = True
) -> dict[str, float]:
    """Mean token loss, perplexity and bits per character; each block counted once.

    accelerator: shares the blocks among processes and sums the results; None evaluates every block
    in this process, on the model's device, without autocast.
    """
    was_training = model.training
    model.eval()
    if accelerator is None:
        device, mine, autocast = next(model.parameters()).device, blocks, contextlib.nullcontext
    else:
        device, autocast = accelerator.device, accelerator.autocast
        mine = blocks[accelerator.process_index :: accelerator.num_processes]
    nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    # Every process runs the same number of forward passes (FSDP's are collective); a process whose
    # share ran out runs its last batch again and does not count it.
    world = accelerator.num_processes if accelerator is not None else 1
    per_process = -(-len(blocks) // world)
    for start in range(0, per_process, batch_size):
        part = mine[start : start + batch_size]
        batch = {k: v.to(device) for k, v in data_mod.collate(part or blocks[:1], pad_id).items()}
        with autocast():
            loss, n = token_loss_sum(model, batch, chunked)
        if part:
            nats += loss.double()
            tokens += n
    if accelerator is not None:
        nats, tokens = accelerator.reduce(nats, "sum"), accelerator.reduce(tokens, "sum")
    nats, tokens = nats.item(), int(tokens.item())
    if was_training:
        model.train()
    val_loss = nats / max(1, tokens)
    return {
        "val_loss": val_loss,
        "perplexity": math.exp(min(val_loss, 700)),
        "val_bpc": data_mod.bits_per_character(nats, n_chars),
        "val_tokens": tokens,
    }


def evaluate_text(model_path: str, data: str, max_length: int = 0, batch_size: int = 8, generate: int = 0) -> dict[str, Any]:
    """`python -m engine eval`: the numbers of a model or adapter folder (or a run's final/) on a text file or dataset.

    Documents are read and packed as in training, with the run's data settings when the model comes
    from a run folder (recipe.toml); max_length 0 means the run's data.max_length, or the model's
    context length (at most 1024) for a model folder outside a run.
    """
    from engine import from_checkpoint, model as model_mod, runfolder, schema
    from engine.errors import UserError
    from engine.recipe import DataSection

    from engine.recipe import data_section

    folder = runfolder.model_folder(model_path)
    run = runfolder.run_of(folder)
    recipe_table = runfolder.read_recipe(run) if run else {}
    table = data_section(dict(recipe_table.get("data", {})))
    table["train"] = data
    data_cfg, problems = schema.validate(table, DataSection, "data.", str(run / "recipe.toml") if run else "--data")
    if problems:  # a recipe written by another version: fall back to the defaults
        data_cfg, _ = schema.validate({"train": data}, DataSection, "data.", "--data")
    format_name = recipe_table.get("data", {}).get("format", "text") or "text"
    if format_name != "text" or generate:
        from engine import answers

        return answers.evaluate_answers(folder, recipe_table, format_name, data_cfg, data, max_length, batch_size, generate)
    documents, _ = data_mod.load_documents(data, "--data", data_cfg)
    if not documents:
        raise UserError(f"--data: '{data}' holds no text")
    with warnings.catch_warnings():  # libraries' deprecation notices about each other are not the user's business
        warnings.simplefilter("ignore", FutureWarning)
        model, tokenizer, kind = from_checkpoint.load_any(folder)
    from engine import quant

    if torch.cuda.is_available() and not quant.is_quantized(model):  # a quantized base was loaded onto its device
        model.to("cuda")
    limit = model_mod.context_length(model)
    length = max_length or (data_cfg.max_length if run else min(limit or 1024, 1024))
    if limit is not None and length > limit:
        raise UserError(f"--max-length: {length} is longer than the model's context ({limit}); give --max-length {limit} or less")
    blocks = data_mod.build_blocks(documents, tokenizer, length, data_cfg.packing, for_eval=True)
    if not blocks:
        raise UserError(f"--data: '{data}' gives no token to predict (it needs at least two tokens)")
    n_chars = data_mod.characters(documents)
    result = evaluate(model, None, blocks, batch_size, tokenizer.pad_token_id, n_chars)
    return {
        "model": str(folder),
        "kind": kind,
        "data": data,
        "documents": len(documents),
        "characters": n_chars,
        "max_length": length,
        "blocks": len(blocks),
        **reported(result),
    }


def result_table(result: dict[str, Any]) -> str:
    if "format" in result:
        from engine import answers

        return answers.result_table(result)
    rows = [
        ("model", f"{result['model']} ({result['kind']})"),
        ("data", f"{result['data']}: {result['documents']:,} documents, {result['characters']:,} characters"),
        ("blocks", f"{result['blocks']:,} of up to {result['max_length']} tokens"),
        ("tokens", f"{result['tokens']:,} predicted"),
        ("loss", f"{result['loss']:.4f} nats per token"),
        ("perplexity", f"{result['perplexity']:.3f}"),
        ("bits/char", f"{result['bits_per_character']:.4f}"),
    ]
    return "\n".join(report.label_lines(rows))


def reported(result: dict[str, Any]) -> dict[str, Any]:
    """evaluate()'s numbers under the names `python -m engine eval` reports them."""
    return {"tokens": result["val_tokens"], "loss": result["val_loss"], "perplexity": result["perplexity"],
            "bits_per_character": result["val_bpc"]}
