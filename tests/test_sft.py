"""The shipped instruction recipe (recipes/sft.toml): exact answers on held-out chats, and masking matters."""

import pytest

from engine import chat, hookimpl
from engine.evaluation import evaluate_text
from engine.formats import Segment
from engine.testing import inline_plugin
from tests.conftest import REPO

ACCURACY = 0.95  # stated in recipes/sft.toml and docs/instruction-data.md


class ChatWithoutEnd:
    """The chat format, except that the end-of-turn token after an answer is not a target."""

    @hookimpl
    def prepare_tokenizer(self, tokenizer, data):
        return chat.ensure_chat_template(tokenizer)

    @hookimpl
    def format_example(self, example, data, tokenizer):
        out = []
        for s in chat.chat_segments(chat.check_messages(example["messages"], "messages"), tokenizer, "messages"):
            if s.target and s.text.endswith(chat.IM_END):
                out += [Segment(s.text[: -len(chat.IM_END)], True), Segment(chat.IM_END, False)]
            else:
                out.append(s)
        return out

    @hookimpl
    def format_prompt(self, messages, data, tokenizer):
        return chat.generation_prompt(tokenizer, messages)


def train_sft(tmp_path, *overrides):
    from engine import loop, recipe as recipe_mod

    recipe = recipe_mod.load(REPO / "recipes" / "sft.toml", [f"train.output_dir={tmp_path / 'run'}", "train.sample_prompts=[]", *overrides])
    recipe.data.train = str(REPO / recipe.data.train)
    recipe.data.val = str(REPO / recipe.data.val)
    loop.train(recipe)
    return evaluate_text(str(tmp_path / "run"), str(REPO / "recipes" / "data" / "sft_val.jsonl"), generate=200)


@pytest.mark.slow
def test_sft_recipe_answers_held_out_prompts_exactly(tmp_path):
    result = train_sft(tmp_path)
    assert result["format"] == "chat" and result["answered"] == 200
    assert result["exact_match"] >= ACCURACY, result["mismatches"]
    assert result["stopped"] == 1.0


@pytest.mark.slow
def test_without_the_end_of_answer_target_the_model_does_not_stop(tmp_path):
    with inline_plugin("format", "chat_without_end", ChatWithoutEnd):
        result = train_sft(tmp_path, 'data.format="chat_without_end"')
    assert result["stopped"] < 0.5 and result["exact_match"] < ACCURACY - 0.3
