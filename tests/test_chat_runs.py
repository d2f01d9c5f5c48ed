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

pytestmark = pytest.mark.slow  # each trains a small model for a minute or more on a busy CPU

QA = [("Colour of the sea?", "blue"), ("Colour of grass?", "green"), ("Colour of snow?", "white"), ("Colour of coal?", "black"),
      ("Sound of a cat?", "meow"), ("Sound of a dog?", "woof"), ("Sound of a cow?", "moo"), ("Sound of a duck?", "quack")]
CHATS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]


def write_chats(path, system=False, copies=1):
    rows = [{"messages": ([{"role": "system", "content": "Be brief."}] if system else []) + c} for c in CHATS] * copies
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-run")
    data, val = write_chats(folder / "train.jsonl", copies=4), write_chats(folder / "chats.jsonl")
    recipe = tiny_recipe(folder, data={"train": str(data), "val": str(val), "format": "chat", "max_length": 32},
                         model={"config": {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64}, "tokenizer_vocab_size": 300},
                         decoding="greedy", train={"max_steps": 150, "batch_size": 4, "learning_rate": 1e-2, "sample_prompts": ["Sound of a cow?"],
                                                   "eval_every_steps": 150, "sample_max_new_tokens": 6, "save_every_steps": 75})
    summary = run_recipe(recipe)
    return folder, summary


def test_template_saved_with_the_run_works_in_plain_transformers(chat_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = chat_run
    final = folder / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template == chat.DEFAULT_TEMPLATE
    text = tokenizer.apply_chat_template(CHATS[0][:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nColour of the sea?<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(final)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in model.generation_config.eos_token_id  # plain generate() stops at the end of the turn
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert out[0, -1].item() == end and tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == "blue"


def test_samples_at_evaluation_use_the_chat_format(chat_run):
    folder, _ = chat_run
    record = [json.loads(line) for line in (folder / "run" / "samples.jsonl").read_text().splitlines()][-1]
    assert record["prompt"] == "Sound of a cow?" and record["text"].strip() == "moo"


def test_generate_and_chat_commands_format_the_prompt_and_stop(chat_run):
    folder, _ = chat_run
    run = str(folder / "run")
    result = run_cli("generate", run, "--prompt", "Colour of snow?")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "white"  # the answer only: formatted as a user turn, stopped at <|im_end|>
    raw = run_cli("generate", run, "--prompt", "Colour of snow?", "--raw", "greedy.max_new_tokens=4")
    assert raw.returncode == 0 and raw.stdout.startswith("Colour of snow?") and raw.stdout.strip() != "Colour of snow? white"
    piped = subprocess.run([sys.executable, "-m", "engine", "chat", run], input="Sound of a dog?\nColour of coal?\n",
                           capture_output=True, text=True, cwd=REPO, timeout=600)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert [line.strip() for line in piped.stdout.splitlines() if line.strip()] == ["woof", "black"]


def test_eval_reports_answer_loss_and_exact_match(chat_run):
    folder, summary = chat_run
    result = run_cli("eval", str(folder / "run"), "--data", str(folder / "chats.jsonl"), "--generate", "20", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "run" / "final")
    assert got["format"] == "chat" and got["examples"] == len(CHATS)
    answers = sum(len(tokenizer(a + "<|im_end|>", add_special_tokens=False)["input_ids"]) for _, a in QA)
    assert got["tokens"] == answers  # each answer and its end of turn: nothing else is scored
    assert got["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)
    assert got["exact_match"] == 1.0 and got["answered"] == len(CHATS)
    assert got["kind"] == "model"


def test_eval_takes_a_checkpoint_of_an_instruction_run(chat_run):
    """eval RUN/checkpoints/step-N on chat data: the checkpoint's own weights, formatted as in training, named as a checkpoint."""
    from engine import evaluation

    folder, summary = chat_run
    checkpoints = sorted((folder / "run" / "checkpoints").glob("step-*"))
    assert len(checkpoints) >= 2
    last, earlier = evaluation.evaluate_text(str(checkpoints[-1]), str(folder / "chats.jsonl")), evaluation.evaluate_text(str(checkpoints[0]), str(folder / "chats.jsonl"))
    assert last["kind"] == earlier["kind"] == "checkpoint, model" and last["format"] == "chat"
    assert checkpoints[-1].name == f"step-{summary['steps']:08d}" and last["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)  # final/'s weights
    assert earlier["loss"] != pytest.approx(last["loss"], rel=1e-4)  # an earlier step's weights are its own


def test_python_api_generate_formats_like_training(chat_run):
    from engine import LanguageModelTrainer

    folder, _ = chat_run
    trainer = LanguageModelTrainer()
    trainer.load_model(folder / "run" / "final")
    torch.manual_seed(0)
    assert trainer.generate("Sound of a duck?", temperature=0.01, top_k=1).strip() == "quack"
    assert trainer.generate("Sound of a duck?", max_new_tokens=3, raw=True).strip() != "quack"


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
