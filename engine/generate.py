"""Text generation with the selected decoding plugin, through transformers' generate."""

from __future__ import annotations

import sys
from typing import Any

import torch

from engine.model import context_length

_NOTED: set[str] = set()


def _note(message: str) -> None:
    """One line on stderr, once per process for the same message (samples repeat at every evaluation)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


def fit_in_context(model: Any, enc: Any, kwargs: dict[str, Any]) -> Any:
    """Cap max_new_tokens so prompt + continuation fit the model's context (its position embeddings end
    there); a prompt that fills the context keeps its last half. Says so in one line; returns enc."""
    context = context_length(model)
    wanted = kwargs.get("max_new_tokens")
    n = enc["input_ids"].shape[1]
    if not context or not isinstance(wanted, int) or n + wanted <= context:
        return enc
    if n >= context:
        keep = context // 2
        enc = {k: v[:, -keep:] for k, v in enc.items()}
        _note(f"the prompt's {n} tokens fill the model's context of {context}: generating from its last {keep}")
        n = keep
    if n + wanted <= context:
        return enc
    kwargs["max_new_tokens"] = context - n
    _note(f"generating {context - n} new tokens, not {wanted}: the model's context is {context} tokens "
          f"and the prompt takes {n}")
    return enc


def generation_settings(plugins: Any, tokenizer: Any, **overrides: Any) -> dict[str, Any]:
    """generate() keyword arguments: the decoding plugin's, its logits processors, then overrides."""
    from transformers import LogitsProcessorList

    kwargs = dict(plugins.hook.generation_kwargs(tokenizer=tokenizer) or {})
    processors = [p for group in plugins.hook.logits_processors(tokenizer=tokenizer) for p in (group or [])]
    if processors:
        kwargs["logits_processor"] = LogitsProcessorList(processors)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    return kwargs


@torch.no_grad()
def generate_text(
    model: Any, tokenizer: Any, plugins: Any, prompt: str, streamer: Any = None, add_special_tokens: bool = True, **overrides: Any
) -> str:
    """The continuation of prompt (without the prompt).

    add_special_tokens=False: the prompt is already formatted as in training (engine/formats.py), BOS included if any.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(device)
    kwargs = generation_settings(plugins, tokenizer, **overrides)
    padded = getattr(getattr(model, "generation_config", None), "suppress_tokens", None)
    if padded and kwargs.get("suppress_tokens") is not None:  # a plugin's list adds to the padded vocabulary ids, never frees them
        kwargs["suppress_tokens"] = sorted(set(kwargs["suppress_tokens"]) | set(padded))
    enc = fit_in_context(model, enc, kwargs)
    beams = (kwargs.get("num_beams") or 1) > 1  # transformers cannot stream beam search: print the result at the end
    output = model.generate(**enc, streamer=None if beams else streamer, **kwargs)
    if was_training:
        model.train()
    text = tokenizer.decode(output[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    if beams and streamer is not None:
        streamer.on_finalized_text(text, stream_end=True)
    return text


def formatted_prompt(plugins: Any, data_cfg: Any, tokenizer: Any, messages: list[dict[str, str]]) -> str | None:
    """The conversation as the run's format put prompts in training (None: no format, raw text)."""
    from engine import formats

    if data_cfg is None or not plugins.of_kind("format"):
        return None
    return formats.prompt_text(plugins, messages, data_cfg, tokenizer)


def generate_answer(
    model: Any, tokenizer: Any, plugins: Any, data_cfg: Any, prompt: str, streamer: Any = None,
    history: list[dict[str, str]] | None = None, **overrides: Any,
) -> str:
    """The model's answer to prompt (a user turn after history), formatted as the run's data.format did in
    training (format_prompt hook); generation stops at the end of the answer (EOS or the chat template's
    end of turn). Without a format (data_cfg None) the prompt is continued as raw text."""
    from engine import chat

    messages = [*(history or []), {"role": "user", "content": prompt}]
    text = formatted_prompt(plugins, data_cfg, tokenizer, messages)
    if text is None:
        return generate_text(model, tokenizer, plugins, prompt, streamer, **overrides)
    overrides.setdefault("eos_token_id", chat.stop_token_ids(tokenizer))
    return generate_text(model, tokenizer, plugins, text, streamer, add_special_tokens=False, **overrides)


def run_format(model_folder: Any) -> tuple[list[Any], Any]:
    """(selected format plugin, data section) of the run a model folder belongs to; ([], None) outside a run."""
    from pathlib import Path

    from engine import manager, runfolder, schema
    from engine.errors import UserError
    from engine.recipe import DataSection, data_section

    run = runfolder.run_of(Path(model_folder))
    if run is None:
        return [], None
    table = runfolder.read_recipe(run)
    data = data_section(dict(table.get("data", {})))
    data_cfg, problems = schema.validate(data, DataSection, "data.", str(run / "recipe.toml"))
    if problems:
        raise UserError(*problems)
    name = table.get("data", {}).get("format", "text") or "text"
    slots = {k.slot: ([] if k.many else "") for k in manager.KINDS.values()}
    slots["data.format"] = name
    options = {name: table[name]} if isinstance(table.get(name), dict) else {}
    chosen, errors = manager.select(slots, options, lambda key: str(run / "recipe.toml"))
    if errors:
        raise UserError(*errors)
    return chosen, data_cfg
