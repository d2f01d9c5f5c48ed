"""Chat templates: the tokenizer's own, or the default one; chats into target / non-target segments.

The default template (for a tokenizer without a chat_template: GPT-2, a tokenizer trained for
model.config) is ChatML:

    <|im_start|>system\\nYou are terse.<|im_end|>\\n
    <|im_start|>user\\nHi<|im_end|>\\n
    <|im_start|>assistant\\nHello!<|im_end|>\\n

Its two special tokens are added to the tokenizer (the engine grows the embeddings; under LoRA their
rows are trained and saved with the adapter), and the template is saved with the tokenizer
(chat_template.jinja), so `tokenizer.apply_chat_template` works on the saved model in plain
transformers. In training, an assistant turn's text and its end-of-turn token are targets; the
newline after it, the headers and every other turn are not.
"""

from __future__ import annotations

from typing import Any

from engine.formats import FormatError, Segment

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


def ensure_chat_template(tokenizer: Any) -> list[str]:
    """Give a tokenizer without a chat template the default one and its special tokens; returns the tokens added."""
    if getattr(tokenizer, "chat_template", None):
        return []
    vocab = tokenizer.get_vocab()
    new = [t for t in (IM_START, IM_END) if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    tokenizer.chat_template = DEFAULT_TEMPLATE
    return new


def _special_tokens(tokenizer: Any) -> list[str]:
    names = set(map(str, tokenizer.all_special_tokens))
    names.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
    return sorted(names, key=len, reverse=True)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def split_answer(answer: str, content: str, specials: list[str]) -> tuple[str, str]:
    """(target, rest) of an assistant turn as rendered: the text up to and including the first special
    token after its content (the end of turn), and what follows (a newline: not a target)."""
    at = answer.rfind(content) if content else 0
    after_content = at + len(content) if at >= 0 else 0
    best = None
    for token in specials:
        found = answer.find(token, after_content)
        if found >= 0 and (best is None or found < best[0]):
            best = (found, token)
    if best is None:
        return answer, ""
    end = best[0] + len(best[1])
    return answer[:end], answer[end:]


def check_messages(messages: Any, field: str) -> list[dict[str, str]]:
    """The turns of one chat, checked: a list of {role, content} with known roles and an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise FormatError(field, f"must be a non-empty list of {{role, content}} turns, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FormatError(f"{field}[{i}]", f"must be a {{role, content}} table, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise FormatError(f"{field}[{i}].role", f"is {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise FormatError(f"{field}[{i}].content", f"is missing or not text ({content!r})")
        out.append({"role": role, "content": content})
    assistants = [m for m in out if m["role"] == "assistant"]
    if not assistants:
        raise FormatError(field, "has no assistant turn: nothing to train on")
    if not any(m["content"].strip() for m in assistants):
        raise FormatError(field, "has only empty assistant turns")
    return out


def chat_segments(messages: list[dict[str, str]], tokenizer: Any, field: str, last_turn_only: bool = False) -> list[Segment]:
    """Segments of a checked chat through the tokenizer's chat template: assistant answers (with their
    end-of-turn token) are targets (only the last one with last_turn_only), the rest is not."""
    from jinja2.exceptions import TemplateError

    specials = _special_tokens(tokenizer)
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    segments: list[Segment] = []
    done = ""
    try:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = _render(tokenizer, messages[:i], True) if i else _render(tokenizer, [], True)
            full = _render(tokenizer, messages[: i + 1], False)
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise FormatError(field, f"turn {i}: the chat template does not render this chat turn by turn "
                                         f"(its text before turn {i} changes when the turn is added); the engine cannot mark the answers")
            segments.append(Segment(prefix[len(done):], False))
            target, rest = split_answer(full[len(prefix):], m["content"], specials)
            segments.append(Segment(target, not last_turn_only or i == last_assistant))
            if rest:
                segments.append(Segment(rest, False))
            done = full
        tail = _render(tokenizer, messages, False)
    except TemplateError as exc:
        raise FormatError(field, f"is refused by the chat template: {exc}") from None
    if tail.startswith(done) and tail[len(done):]:
        segments.append(Segment(tail[len(done):], False))
    return [s for s in segments if s.text]


def generation_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation rendered for the assistant's next answer (add_generation_prompt)."""
    from jinja2.exceptions import TemplateError

    from engine.errors import UserError

    try:
        return _render(tokenizer, messages, True)
    except TemplateError as exc:
        raise UserError(f"the chat template refuses this conversation: {exc}") from None


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token that ends an assistant turn in the tokenizer's chat template (None without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}]
        prefix, full = _render(tokenizer, messages[:1], True), _render(tokenizer, messages, False)
    except Exception:  # a template that wants other roles or arguments: fall back to EOS
        return None
    target, _ = split_answer(full[len(prefix):], "yz", _special_tokens(tokenizer))
    for token in _special_tokens(tokenizer):
        if target.endswith(token):
            return tokenizer.convert_tokens_to_ids(token)
    return None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: EOS and the chat template's end of turn."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = end_of_turn_id(tokenizer)
    if end is not None and end not in ids:
        ids.append(end)
    return ids


def fit_model(model: Any, tokenizer: Any, added: list[str]) -> list[int]:
    """Grow the embeddings for tokens added to the tokenizer and let generation stop at the end of a turn.

    Returns the ids of the added tokens (trained under LoRA with the adapter).
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        suppressed = getattr(model.generation_config, "suppress_tokens", None)
        if suppressed:  # padded vocabulary ids of a model.config model: the added tokens are real now
            model.generation_config.suppress_tokens = [t for t in suppressed if t >= len(tokenizer)] or None
    stops = stop_token_ids(tokenizer)
    if len(stops) > 1:
        model.generation_config.eos_token_id = stops
    return [tokenizer.convert_tokens_to_ids(t) for t in added]
