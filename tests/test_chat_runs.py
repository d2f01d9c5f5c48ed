"""Instruction runs end to end: a chat template saved with the run, LoRA training the new token rows,
generate / chat / eval formatted as in training."""

import json
import subprocess
import sys

import pytest
import torch

from engine import chat, hookimpl
from engine.testing import inline_plugin, run_recipe, tiny_recipe
from tests.conftest import REPO, run_cli

CHATS = [
    [{"role": "user", "content": f"Reverse: {a} {b}"}, {"role": "assistant", "content": f"{b} {a}"}]
    for a in ("boat", "sea", "lamp", "bread", "apples") for b in ("wind", "town", "harbour", "garden")
]


def write_chats(path, system=False):
    rows = [{"messages": ([{"role": "system", "content": "Be brief."}] if system else []) + c} for c in CHATS]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-run")
    data = write_chats(folder / "chats.jsonl")
    pairs = folder / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": c[0]["content"] + " =", "completion": c[1]["content"]}) for c in CHATS) + "\n")
    recipe = tiny_recipe(folder, data={"train": str(data), "val": str(data), "format": "chat", "max_length": 64},
                         decoding="greedy", train={"max_steps": 60, "batch_size": 4, "learning_rate": 1e-2, "sample_prompts": ["Reverse: boat town"],
                                                   "eval_every_steps": 60, "sample_max_new_tokens": 6})
    summary = run_recipe(recipe)
    return folder, summary


def test_template_saved_with_the_run_works_in_plain_transformers(chat_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = chat_run
    final = folder / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template == chat.DEFAULT_TEMPLATE
    text = tokenizer.apply_chat_template(CHATS[0][:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nReverse: boat wind<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(final)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in model.generation_config.eos_token_id  # plain generate() stops at the end of the turn
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert out[0, -1].item() == end and tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == "wind boat"


def test_samples_at_evaluation_use_the_chat_format(chat_run):
    folder, _ = chat_run
    (record,) = [json.loads(line) for line in (folder / "run" / "samples.jsonl").read_text().splitlines()]
    assert record["prompt"] == "Reverse: boat town" and record["text"].strip() == "town boat"


def test_generate_and_chat_commands_format_the_prompt_and_stop(chat_run):
    folder, _ = chat_run
    run = str(folder / "run")
    result = run_cli("generate", run, "--prompt", "Reverse: sea garden")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "garden sea"  # the answer only: formatted as a user turn, stopped at <|im_end|>
    raw = run_cli("generate", run, "--prompt", "Reverse: sea garden", "--raw", "greedy.max_new_tokens=4")
    assert raw.returncode == 0 and raw.stdout.startswith("Reverse: sea garden") and raw.stdout.strip() != "Reverse: sea garden garden sea"
    piped = subprocess.run([sys.executable, "-m", "engine", "chat", run], input="Reverse: lamp town\nReverse: bread harbour\n",
                           capture_output=True, text=True, cwd=REPO, timeout=600)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert [line.strip() for line in piped.stdout.splitlines() if line.strip()] == ["town lamp", "harbour bread"]


def test_eval_reports_answer_loss_and_exact_match(chat_run):
    folder, summary = chat_run
    result = run_cli("eval", str(folder / "run"), "--data", str(folder / "chats.jsonl"), "--generate", "20", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout)
    assert got["format"] == "chat" and got["examples"] == len(CHATS)
    assert got["tokens"] == 3 * len(CHATS)  # two words and the end of turn per answer: nothing else is scored
    assert got["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)
    assert got["exact_match"] >= 0.9 and got["answered"] == 20


def test_python_api_generate_formats_like_training(chat_run):
    from engine import LanguageModelTrainer

    folder, _ = chat_run
    trainer = LanguageModelTrainer()
    trainer.load_model(folder / "run" / "final")
    torch.manual_seed(0)
    assert trainer.generate("Reverse: apples wind", temperature=0.01, top_k=1).strip() == "wind apples"
    assert trainer.generate("Reverse: apples wind", max_new_tokens=3, raw=True) != "wind apples"


class EmbeddingsAtStart:
    rows = None

    @hookimpl
    def on_train_start(self, context):
        tok = context.tokenizer
        ids = torch.tensor([tok.convert_tokens_to_ids(t) for t in (chat.IM_START, chat.IM_END)])
        EmbeddingsAtStart.rows = context.model.get_input_embeddings()(ids).detach().clone()


def test_lora_trains_and_saves_the_new_template_tokens(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    data = write_chats(tmp_path / "chats.jsonl", system=True)
    recipe = tiny_recipe(tmp_path, model={"base": str(tiny_model_dir)}, data={"train": str(data), "val": str(data), "format": "chat", "max_length": 64},
                         lora={"enabled": True, "r": 4, "alpha": 8}, train={"max_steps": 6, "learning_rate": 1e-2}, callbacks=["emb_at_start"])
    recipe["model"].pop("config")
    with inline_plugin("callback", "emb_at_start", EmbeddingsAtStart):
        run_recipe(recipe)
    final = tmp_path / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in (chat.IM_START, chat.IM_END)]
    assert new_ids == [len(tokenizer) - 2, len(tokenizer) - 1]
    indices = json.loads((final / "adapter_config.json").read_text())["trainable_token_indices"]
    assert sorted(next(iter(indices.values())) if isinstance(indices, dict) else indices) == new_ids
    model = AutoPeftModelForCausalLM.from_pretrained(final)  # grows the base's embeddings to the saved tokenizer
    rows = model.get_input_embeddings()(torch.tensor(new_ids)).detach()
    assert EmbeddingsAtStart.rows is not None and not torch.allclose(rows, EmbeddingsAtStart.rows, atol=1e-5)  # trained, and saved
    assert tokenizer.apply_chat_template(CHATS[0], tokenize=False).startswith("<|im_start|>user\n")
