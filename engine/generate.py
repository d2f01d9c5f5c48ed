"""Text generation with the selected decoding plugin, through transformers' generate."""

from __future__ import annotations

from typing import Any

import torch


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
    beams = (kwargs.get("num_beams") or 1) > 1  # transformers cannot stream beam search: print the result at the end
    output = model.generate(**enc, streamer=None if beams else streamer, **kwargs)
    if was_training:
        model.train()
    text = tokenizer.decode(output[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    if beams and streamer is not None:
        streamer.on_finalized_text(text, stream_end=True)
    return text
