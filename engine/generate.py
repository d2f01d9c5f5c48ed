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
def generate_text(model: Any, tokenizer: Any, plugins: Any, prompt: str, streamer: Any = None, **overrides: Any) -> str:
    """The continuation of prompt (without the prompt)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    kwargs = generation_settings(plugins, tokenizer, **overrides)
    enc = fit_in_context(model, enc, kwargs)
    beams = (kwargs.get("num_beams") or 1) > 1  # transformers cannot stream beam search: print the result at the end
    output = model.generate(**enc, streamer=None if beams else streamer, **kwargs)
    if was_training:
        model.train()
    text = tokenizer.decode(output[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    if beams and streamer is not None:
        streamer.on_finalized_text(text, stream_end=True)
    return text
