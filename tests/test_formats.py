"""Data formats (data.format): answer-only loss masks, the chat template, bad data, packing isolation."""

import json

import pytest
import torch
import torch.nn.functional as F

from engine import chat, formats, packing
from engine import recipe as recipe_mod
from engine.errors import UserError
from engine.formats import IGNORE_INDEX, Rows
from engine.manager import Plugins
from engine.model import train_tokenizer
from engine.testing import tiny_recipe

CHAT = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "2+3"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "and 4+4?"},
    {"role": "assistant", "content": "8, of course"},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["You add numbers. 2+3 and 4+4? 5 8, of course. The boat left the harbour."] * 20
    return train_tokenizer(texts, vocab_size=300)


def setup(tmp_path, tokenizer, **data):
    """The format plugin a recipe with these data keys selects, and its data section."""
    recipe = recipe_mod.from_dict(tiny_recipe(tmp_path, data=data), "(test)")
    plugins = Plugins([s for s in recipe.plugins if s.kind == "format"])
    plugins.hook.prepare_tokenizer(tokenizer=tokenizer, data=recipe.data)
    return plugins, recipe.data


def examples(plugins, data, tokenizer, rows, key="data.train"):
    return formats.examples_of(Rows(rows, [f"d.jsonl: line {i + 1}" for i in range(len(rows))]), key, plugins, data, tokenizer)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ masks
def test_prompt_completion_trains_on_the_completion_and_eos_only(tmp_path, tokenizer):
    plugins, data = setup(tmp_path, tokenizer, format="prompt_completion", prompt_field="q", completion_field="a")
    (ex,) = examples(plugins, data, tokenizer, [{"q": "2+3=", "a": "5"}])
    prompt, answer = ids(tokenizer, "2+3="), ids(tokenizer, "5")
    assert ex.ids == prompt + answer + [tokenizer.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + answer + [tokenizer.eos_token_id]
    plugins, data = setup(tmp_path, tokenizer, format="prompt_completion", prompt_field="q", completion_field="a", train_on_prompt=True)
    (ex,) = examples(plugins, data, tokenizer, [{"q": "2+3=", "a": "5"}])
    assert ex.labels == ex.ids and not ex.plain  # every token a target, yet still never split


def test_multi_turn_chat_mask_equals_a_hand_built_one(tmp_path, tokenizer):
    plugins, data = setup(tmp_path, tokenizer, format="chat")
    assert tokenizer.chat_template == chat.DEFAULT_TEMPLATE
    (ex,) = examples(plugins, data, tokenizer, [{"messages": CHAT}])
    # by hand: (text, target) pieces of the ChatML rendering
    pieces = [
        ("<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\n2+3<|im_end|>\n<|im_start|>assistant\n", False),
        ("5<|im_end|>", True), ("\n", False),
        ("<|im_start|>user\nand 4+4?<|im_end|>\n<|im_start|>assistant\n", False),
        ("8, of course<|im_end|>", True), ("\n", False),
    ]
    expected_ids, expected_labels = [], []
    for text, target in pieces:
        piece = ids(tokenizer, text)
        expected_ids += piece
        expected_labels += piece if target else [IGNORE_INDEX] * len(piece)
    assert tokenizer.decode(ex.ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ex.ids == expected_ids and ex.labels == expected_labels
    end = tokenizer.convert_tokens_to_ids(chat.IM_END)
    assert sum(label == end for label in ex.labels) == 2  # the end of each answer is a target: the model learns to stop

    plugins, data = setup(tmp_path, tokenizer, format="chat", last_turn_only=True)
    (last,) = examples(plugins, data, tokenizer, [{"messages": CHAT}])
    targets = [t for t in last.labels if t != IGNORE_INDEX]
    assert last.ids == ex.ids and targets == ids(tokenizer, "8, of course<|im_end|>")


def test_tokenizer_own_chat_template_is_used(tmp_path, tokenizer):
    from copy import deepcopy

    own = deepcopy(tokenizer)
    own.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    plugins, data = setup(tmp_path, own, format="chat")
    assert "<|im_start|>" not in own.chat_template
    (ex,) = examples(plugins, data, own, [{"messages": CHAT[1:3]}])
    targets = [t for t in ex.labels if t != IGNORE_INDEX]
    assert targets == ids(own, "5") + [own.eos_token_id]
    assert chat.stop_token_ids(own) == [own.eos_token_id]


# ------------------------------------------------------------------ bad data
@pytest.mark.parametrize("fmt, row, fragments", [
    ("prompt_completion", {"prompt": "2+3="}, ["line 2", "field 'completion' is missing", "data.completion_field"]),
    ("prompt_completion", {"prompt": "2+3=", "completion": "  "}, ["line 2", "field 'completion' is empty"]),
    ("chat", {"messages": CHAT[:2]}, ["line 2", "field 'messages' has no assistant turn"]),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, ["line 2", "field 'messages[0].role' is 'robot'"]),
    ("chat", {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, ["line 2", "messages[0].content"]),
    ("chat", {"turns": CHAT}, ["line 2", "field 'messages' is missing (fields: turns)"]),
    ("text", {"body": "x"}, ["line 2", "field 'text' is missing (fields: body); set data.text_field"]),
])
def test_bad_example_names_file_line_and_field(tmp_path, tokenizer, fmt, row, fragments):
    plugins, data = setup(tmp_path, tokenizer, format=fmt)
    good = {"text": {"text": "ok"}, "prompt_completion": {"prompt": "1+1=", "completion": "2"}, "chat": {"messages": CHAT}}[fmt]
    with pytest.raises(UserError) as info:
        examples(plugins, data, tokenizer, [good, row])
    (line,) = info.value.lines
    assert line.startswith("data.train: d.jsonl: line 2: ")
    for fragment in fragments:
        assert fragment in line


def test_turn_order_the_template_refuses(tmp_path, tokenizer):
    from copy import deepcopy

    strict = deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                            "{{ m['content'] + eos_token }}{% endfor %}")
    plugins, data = setup(tmp_path, strict, format="chat")
    with pytest.raises(UserError, match=r"line 1: field 'messages' is refused by the chat template: Conversation roles must alternate"):
        examples(plugins, data, strict, [{"messages": CHAT}])  # starts with a system turn


def test_bad_rows_in_a_file_are_reported_with_their_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": "a", "completion": "b"}] * 3 + [{"prompt": "a", "completion": ""}]) + "\n")
    recipe = recipe_mod.from_dict(tiny_recipe(tmp_path, data={"train": str(path), "val": str(path), "format": "prompt_completion"}), "(test)")
    rows = formats.split_rows(recipe)
    assert rows.train.where[3] == f"{path}: line 4"
    plugins = Plugins([s for s in recipe.plugins if s.kind == "format"])
    with pytest.raises(UserError, match=rf"data.train: {path}: line 4: field 'completion' is empty"):
        formats.examples_of(rows.train, "data.train", plugins, recipe.data, train_tokenizer(["a b"] * 5, 260))


def test_unknown_format_is_a_recipe_error(tmp_path):
    with pytest.raises(UserError, match=r"data.format: unknown plugin 'chatml' \(did you mean chat\?\)"):
        recipe_mod.from_dict(tiny_recipe(tmp_path, data={"format": "chatml"}), "(test)")
    resolved = recipe_mod.from_dict(tiny_recipe(tmp_path, data={"format": "chat"}), "(test)").resolved()
    assert resolved["data"]["format"] == "chat" and "data.format" not in resolved


# ------------------------------------------------------------------ packing
def _model(attention="sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256, vocab_size=320, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel._from_config(config, attn_implementation=attention).eval()


def _token_losses(model, batch):
    from engine.loss import model_inputs

    logits = model(**model_inputs(batch, model)).logits[:, :-1].float()  # sdpa: the engine's mask; eager: transformers' own
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX).view(targets.shape), targets


@pytest.mark.parametrize("fmt", ["text", "chat"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_block_losses_equal_the_examples_run_one_by_one(tmp_path, tokenizer, fmt, attention):
    plugins, data = setup(tmp_path, tokenizer, format=fmt)
    rows = ([{"text": t} for t in ("The boat left the harbour.", "2+3 and 4+4?", "Of course. The boat.")]
            if fmt == "text" else [{"messages": CHAT}, {"messages": CHAT[1:3]}, {"messages": CHAT[:3]}])
    exs = examples(plugins, data, tokenizer, rows)
    total = sum(len(e) for e in exs)
    (block,) = packing.build_blocks(exs, total + 5, True, log=lambda line: None)
    assert block.shape == (3, total) and block[2].tolist() == [p for e in exs for p in range(len(e))]
    model = _model(attention)
    with torch.no_grad():
        packed, targets = _token_losses(model, packing.collate([block], 0))
        expected = []
        for e in exs:
            one = {"input_ids": torch.tensor([e.ids]), "attention_mask": torch.ones(1, len(e), dtype=torch.long), "labels": torch.tensor([e.labels])}
            losses, t = _token_losses(model, one)
            expected += [torch.zeros(1), losses[0]]  # the first token of an example is no target in a packed block
        expected = torch.cat(expected)[1:]
    mask = targets[0] != IGNORE_INDEX
    assert int(mask.sum()) == sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in exs)
    torch.testing.assert_close(packed[0][mask], expected[mask], atol=1e-5, rtol=1e-5)
    # the old behaviour, by name: the examples see each other, so the losses differ
    (concat,) = packing.build_blocks(exs, total + 5, "concat", log=lambda line: None)
    with torch.no_grad():
        seen, _ = _token_losses(model, packing.collate([concat], 0) if concat.dim() == 2 else
                                {"input_ids": concat[None], "attention_mask": torch.ones(1, len(concat), dtype=torch.long), "labels": concat[None]})
    assert not torch.allclose(seen[0][mask], expected[mask], atol=1e-3)


def test_examples_with_a_prompt_are_never_split_across_blocks(tmp_path, tokenizer):
    plugins, data = setup(tmp_path, tokenizer, format="chat")
    rows = [{"messages": CHAT}, {"messages": CHAT[:3]}, {"messages": CHAT[1:3]}] * 4
    exs = examples(plugins, data, tokenizer, rows)
    longest = max(len(e) for e in exs)
    blocks = packing.build_blocks(exs, longest + 3, True, log=lambda line: None)
    pieces = []
    for b in blocks:
        starts = [i for i, p in enumerate(b[2].tolist()) if p == 0] + [b.shape[1]]
        pieces += [b[0, a:z].tolist() for a, z in zip(starts, starts[1:])]
    assert sorted(pieces) == sorted(e.ids for e in exs)  # every example whole, once
    assert len(blocks) < len(exs)  # and packed


def test_too_long_examples_are_truncated_from_the_left_or_dropped_with_one_warning(tmp_path, tokenizer):
    plugins, data = setup(tmp_path, tokenizer, format="prompt_completion")
    long_prompt = " ".join(["the boat left the harbour"] * 6) + " 2+3="
    exs = examples(plugins, data, tokenizer, [{"prompt": long_prompt, "completion": "5"}, {"prompt": "2+3=", "completion": "5"},
                                              {"prompt": "2+3=", "completion": long_prompt}])
    lines = []
    blocks = packing.build_blocks(exs, 12, True, "truncate", log=lines.append)
    assert len(lines) == 1 and "2 of 3 examples are longer than data.max_length (12 tokens): 1 had their prompt truncated from the left, 1 were dropped" in lines[0]
    kept = [b[0].tolist() for b in blocks]
    flat = [t for b in kept for t in b]
    assert exs[0].ids[-12:] == flat[:12] or exs[0].ids[-12:] in [flat[i:i + 12] for i in range(len(flat))]
    assert sum(len(b) for b in kept) == 12 + len(exs[1])
    lines.clear()
    blocks = packing.build_blocks(exs, 12, True, "drop", log=lines.append)
    assert "0 had their prompt truncated from the left, 2 were dropped" in lines[0] and sum(b.shape[1] for b in blocks) == len(exs[1])


def test_plain_text_keeps_the_old_blocks_under_concat(tmp_path, tokenizer):
    from engine import data as data_mod

    plugins, data = setup(tmp_path, tokenizer, format="text")
    docs = ["The boat left the harbour.", "2+3 and 4+4?", "Of course. The boat." * 3]
    exs = examples(plugins, data, tokenizer, [{"text": d} for d in docs])
    old = data_mod.build_blocks(docs, tokenizer, 8, packing=True)
    new = packing.build_blocks(exs, 8, "concat", log=lambda line: None)
    assert all(torch.equal(a, b) for a, b in zip(old, new)) and len(old) == len(new)
    # isolated: every token but each document's first is a target exactly once, split documents included
    isolated = packing.build_blocks(exs, 8, True, log=lambda line: None)
    targets = sum(int((b[1, 1:] != IGNORE_INDEX).sum()) for b in isolated)
    assert targets == sum(len(e) - 1 for e in exs)


def test_pairs_read_from_json_csv_and_parquet_name_their_line_or_row(tmp_path, tokenizer):
    import datasets

    rows = [{"prompt": "2+3=", "completion": "5"}, {"prompt": "1+1=", "completion": ""}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "p.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    plugins, data = setup(tmp_path, tokenizer, format="prompt_completion")
    for name, where in (("p.json", "record 2"), ("p.csv", "line 3"), ("p.parquet", "row 2")):
        loaded, _ = formats.load_rows(str(tmp_path / name), "data.train", data)
        assert [r["prompt"] for r in loaded.items] == ["2+3=", "1+1="], name
        with pytest.raises(UserError, match=rf"data.train: {tmp_path / name}: {where}: field 'completion' is empty"):
            formats.examples_of(loaded, "data.train", plugins, data, tokenizer)
