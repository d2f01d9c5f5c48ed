"""`python -m engine eval` on a run trained with an instruction format (data.format = prompt_completion,
chat, or a plugin's): loss and perplexity over answer tokens only, and with --generate N the
exact-match accuracy of generated answers on the first N examples.

Each example is cut where its last answer starts: the segments before it (the format plugin's, as in
training) are the prompt, the last run of target segments is the expected answer. The model answers
greedily, stopping at EOS or the chat template's end of turn; an answer is right when its text,
without special tokens and surrounding whitespace, equals the expected one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from engine.formats import Segment
from engine.generate import fit_in_context


def prompt_and_answer(segments: Sequence[Segment]) -> tuple[str, str]:
    """(prompt text, expected answer text) of one formatted example: split before its last target run."""
    last = max(i for i, s in enumerate(segments) if s.target)
    first = last
    while first > 0 and segments[first - 1].target:
        first -= 1
    return "".join(s.text for s in segments[:first]), "".join(s.text for s in segments[first : last + 1])


def _clean(tokenizer: Any, text: str) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any, examples: Sequence[Sequence[Segment]], limit: int | None = None) -> dict[str, Any]:
    """Share of examples whose greedy answer matches exactly; with the first few mismatches to show."""
    from engine import chat

    device = next(model.parameters()).device
    stops = chat.stop_token_ids(tokenizer)
    right, stopped, wrong = 0, 0, []
    chosen = list(examples)[: limit or None]
    for segments in chosen:
        prompt, expected = prompt_and_answer(segments)
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        budget = len(tokenizer(expected, add_special_tokens=False)["input_ids"]) + 8
        if enc["input_ids"].shape[1] == 0:
            enc = {"input_ids": torch.tensor([[tokenizer.eos_token_id]], device=device)}
        limits = {"max_new_tokens": budget}
        enc = fit_in_context(model, enc, limits)  # never past the model's context (position embeddings)
        out = model.generate(**enc, do_sample=False, max_new_tokens=limits["max_new_tokens"], eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        new = out[0, enc["input_ids"].shape[1] :]
        stopped += int(len(new) > 0 and new[-1].item() in stops)
        got = tokenizer.decode(new, skip_special_tokens=True).strip()
        want = _clean(tokenizer, expected)
        if got == want:
            right += 1
        elif len(wrong) < 3:
            wrong.append({"prompt": prompt, "expected": want, "generated": got})
    n = max(1, len(chosen))
    return {"exact_match": right / n, "stopped": stopped / n, "answered": len(chosen), "mismatches": wrong}


def evaluate_answers(folder: Any, recipe_table: dict[str, Any], format_name: str, data_cfg: Any, data: str,
                     max_length: int, batch_size: int, generate: int) -> dict[str, Any]:
    """Loss over the answer tokens of the examples in `data`, formatted and packed as in training."""
    import warnings

    from engine import evaluation, formats, from_checkpoint, manager, packing, quant
    from engine import model as model_mod
    from engine.errors import UserError

    from engine.generate import run_format

    chosen, _ = run_format(folder)
    if not chosen:  # a model folder outside a run: plain text
        chosen, _ = manager.select({**{k.slot: ([] if k.many else "") for k in manager.KINDS.values()}, "data.format": format_name}, {}, str)
    plugins = manager.Plugins(chosen)
    rows, _ = formats.load_rows(data, "--data", data_cfg)
    if not len(rows):
        raise UserError(f"--data: '{data}' holds no examples")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model, tokenizer, kind = from_checkpoint.load_any(folder)  # a model, an adapter or a checkpoint
    if torch.cuda.is_available() and not quant.is_quantized(model):  # a quantized base was loaded onto its device
        model.to("cuda")
    if format_name == "text" and generate:
        raise UserError("--generate: the run was trained on plain text (data.format = \"text\"): there are no answers to "
                        "check; use it with a run trained with data.format = \"prompt_completion\" or \"chat\"")
    formats.prepare_tokenizer(plugins, tokenizer, data_cfg)  # a no-op when final/ saved the template
    segments = formats.format_rows(rows, "--data", lambda row: plugins.hook.format_example(example=row, data=data_cfg, tokenizer=tokenizer))
    examples = formats.tokenize_segments(segments, tokenizer, None, lambda line: None)
    limit = model_mod.context_length(model)
    length = max_length or data_cfg.max_length
    if limit is not None and length > limit:
        raise UserError(f"--max-length: {length} is longer than the model's context ({limit}); give --max-length {limit} or less")
    lines: list[str] = []
    blocks = packing.build_blocks(examples, length, data_cfg.packing, data_cfg.too_long, for_eval=True, key="--data", log=lines.append)
    result = evaluation.evaluate(model, None, blocks, batch_size, tokenizer.pad_token_id, sum(e.target_chars for e in examples))
    out = {
        "model": str(folder),
        "kind": kind,
        "format": format_name,
        "data": data,
        "examples": len(examples),
        "max_length": length,
        "blocks": len(blocks),
        **evaluation.reported(result),
        "notes": lines,
    }
    if generate:
        out.update(accuracy(model, tokenizer, segments, generate))
    return out


def result_table(result: dict[str, Any]) -> str:
    from engine import report

    rows = [
        ("model", f"{result['model']} ({result['kind']})"),
        ("data", f"{result['data']}: {result['examples']:,} examples, data.format = {result['format']}"),
        ("blocks", f"{result['blocks']:,} of up to {result['max_length']} tokens"),
        ("tokens", f"{result['tokens']:,} answer tokens predicted"),
        ("loss", f"{result['loss']:.4f} nats per answer token"),
        ("perplexity", f"{result['perplexity']:.3f}"),
    ]
    if "exact_match" in result:
        rows.append(("exact match", f"{result['exact_match']:.1%} of {result['answered']} generated answers"))
        rows.append(("stopped", f"{result['stopped']:.1%} ended with an end-of-answer token"))
        for m in result["mismatches"]:
            rows.append(("  e.g.", f"expected {m['expected']!r}, generated {m['generated']!r}"))
    return "\n".join([*result["notes"], *report.label_lines(rows)])
