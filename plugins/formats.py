"""The built-in data formats (recipe key data.format): plain text, prompt/completion pairs, chats.

They use only the public hooks (format_example, format_prompt, prepare_tokenizer) and the public
helpers of engine.formats and engine.chat, as a third-party format would.
"""

from engine import hookimpl
from engine.chat import chat_segments, check_messages, ensure_chat_template, generation_prompt
from engine.formats import FormatError, Segment


def _text_field(example, name, setting):
    if name not in example:
        raise FormatError(name, f"is missing (fields: {', '.join(map(str, example))}); set {setting} to the one holding it")
    value = example[name]
    if value is not None and not isinstance(value, str):
        raise FormatError(name, f"is not text ({type(value).__name__}: {value!r})")
    return value


class Text:
    """Plain text: every token is a target; EOS ends each document (data.text_field of a row, a .txt document)."""

    @hookimpl
    def format_example(self, example, data, tokenizer):
        text = _text_field(example, data.text_field, "data.text_field")
        if text is None or not text.strip():
            return []  # an empty document is skipped, as always
        return [Segment(text, True), Segment(tokenizer.eos_token, True)]

    @hookimpl
    def format_prompt(self, messages, data, tokenizer):
        return messages[-1]["content"]


class PromptCompletion:
    """Prompt/completion pairs (data.prompt_field, data.completion_field): the loss is on the completion and EOS only."""

    @hookimpl
    def format_example(self, example, data, tokenizer):
        prompt = _text_field(example, data.prompt_field, "data.prompt_field")
        completion = _text_field(example, data.completion_field, "data.completion_field")
        if prompt is None:
            raise FormatError(data.prompt_field, "is empty (null)")
        if completion is None or not completion.strip():
            raise FormatError(data.completion_field, "is empty: nothing to train on")
        return [Segment(prompt, False), Segment(completion, True), Segment(tokenizer.eos_token, True)]

    @hookimpl
    def format_prompt(self, messages, data, tokenizer):
        return messages[-1]["content"]


class Chat:
    """Chats (data.messages_field: lists of {role, content} turns) through the chat template; the loss is on assistant turns only."""

    @hookimpl
    def prepare_tokenizer(self, tokenizer, data):
        return ensure_chat_template(tokenizer)

    @hookimpl
    def format_example(self, example, data, tokenizer):
        if data.messages_field not in example:
            raise FormatError(data.messages_field, f"is missing (fields: {', '.join(map(str, example))}); set data.messages_field to the one holding the turns")
        messages = check_messages(example[data.messages_field], data.messages_field)
        return chat_segments(messages, tokenizer, data.messages_field, data.last_turn_only)

    @hookimpl
    def format_prompt(self, messages, data, tokenizer):
        return generation_prompt(tokenizer, messages)
