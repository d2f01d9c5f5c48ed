"""`python -m engine generate`, samples and the Python API's generate: what they print is exactly what
transformers' generate gives with the same settings (seed, strategy options, max_new_tokens, the model
chosen with --model), and generation stops at the model's context instead of running past it."""

import shutil
from contextlib import nullcontext

import pytest
import torch


PROMPT = "The harbour"


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from engine.model import load_trained

    return load_trained(tiny_model_dir)


def decoding(name, **options):
    from engine.manager import Plugins, select

    chosen, errors = select({"decoding": name, "sinks": [], "optimizer": "", "scheduler": ""}, {name: options}, lambda key: "test")
    assert not errors
    return Plugins(chosen)


def native_ids(model, tokenizer, prompt=PROMPT, seed=None, **kwargs):
    """The new token ids transformers' generate gives (the reference the engine must match)."""
    from transformers import set_seed

    if seed is not None:
        set_seed(seed)
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out[0, enc["input_ids"].shape[1]:]


def native(model, tokenizer, prompt=PROMPT, seed=None, **kwargs):
    return tokenizer.decode(native_ids(model, tokenizer, prompt, seed, **kwargs), skip_special_tokens=True)


def cli_generate(capsys, *args):
    from engine import cli

    status = cli.main(["generate", *args])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-2000:]
    return captured.out.rstrip("\n"), captured.err


SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1, "no_repeat_ngram_size": 2}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_model_dir):
    """A run folder whose final/ and best/ are different models (best/: other random weights)."""
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("gen") / "run"
    shutil.copytree(tiny_model_dir, run / "final")
    shutil.copytree(tiny_model_dir, run / "best")
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config)
    other.save_pretrained(run / "best")
    (run / "recipe.toml").write_text('decoding = "sampling"\n[data]\ntrain = "x.txt"\n')
    return run


def test_cli_generate_matches_transformers_for_seed_options_and_length(capsys, run_folder, tiny_lm):
    model, tokenizer = tiny_lm
    args = [str(run_folder), "--prompt", PROMPT, "sampling.temperature=1.3", "sampling.top_k=7", "sampling.max_new_tokens=9"]
    options = {**SAMPLING, "temperature": 1.3, "top_k": 7}
    out3, _ = cli_generate(capsys, *args, "--seed", "3")
    assert out3 == PROMPT + native(model, tokenizer, seed=3, max_new_tokens=9, **options)
    assert len(native_ids(model, tokenizer, seed=3, max_new_tokens=9, **options)) == 9  # max_new_tokens reached generate
    assert cli_generate(capsys, *args, "--seed", "3")[0] == out3  # the seed reproduces the sample
    assert cli_generate(capsys, *args, "--seed", "4")[0] == PROMPT + native(model, tokenizer, seed=4, max_new_tokens=9, **options)
    assert cli_generate(capsys, *args, "--seed", "4")[0] != out3
    # the overrides changed the sampling: the recipe's own options give another text for the same seed
    assert native(model, tokenizer, seed=3, max_new_tokens=9, **SAMPLING) != out3[len(PROMPT):]


def test_cli_generate_model_final_best_or_path(capsys, run_folder, tiny_lm):
    from engine.model import load_trained

    model, tokenizer = tiny_lm
    best, _ = load_trained(run_folder / "best")
    # untrained tied weights repeat the last word greedily: no_repeat_ngram_size=1 lets the weights show
    greedy = ["--prompt", PROMPT, "decoding=greedy", "greedy.max_new_tokens=12", "greedy.no_repeat_ngram_size=1"]
    final_text = native(model, tokenizer, do_sample=False, max_new_tokens=12, no_repeat_ngram_size=1)
    best_text = native(best, tokenizer, do_sample=False, max_new_tokens=12, no_repeat_ngram_size=1)
    assert final_text != best_text
    assert cli_generate(capsys, str(run_folder), *greedy)[0] == PROMPT + final_text
    assert cli_generate(capsys, str(run_folder), "--model", "best", *greedy)[0] == PROMPT + best_text
    assert cli_generate(capsys, str(run_folder), "--model", str(run_folder / "best"), *greedy)[0] == PROMPT + best_text


def test_generate_stops_at_the_model_context_with_a_note(capsys, tiny_model_dir, tiny_lm):
    """The bug: 200 new tokens (the default) ran past a 128-token model's position embeddings (IndexError)."""
    from engine import generate

    model, tokenizer = tiny_lm
    n = len(tokenizer(PROMPT)["input_ids"])
    assert model.config.n_positions == 128
    generate._NOTED.clear()
    out, err = cli_generate(capsys, str(tiny_model_dir), "--prompt", PROMPT, "decoding=greedy")
    (note,) = [l for l in err.splitlines() if l.startswith("note:")]
    assert f"generating {128 - n} new tokens, not 200" in note and "context is 128 tokens" in note
    ids = native_ids(model, tokenizer, do_sample=False, max_new_tokens=128 - n)
    assert len(ids) == 128 - n
    assert out == PROMPT + tokenizer.decode(ids, skip_special_tokens=True)


def test_samples_and_api_stop_at_the_model_context(tiny_model_dir, tiny_lm, capsys):
    from engine import LanguageModelTrainer
    from engine.generate import generate_text
    from engine.samples import generate_samples

    model, tokenizer = tiny_lm
    n = len(tokenizer(PROMPT)["input_ids"])
    expected = native(model, tokenizer, do_sample=False, max_new_tokens=128 - n)
    (record,) = generate_samples(model, tokenizer, decoding("greedy"), [PROMPT], 500, seed=0, step=1, autocast=nullcontext)
    assert record["text"] == expected
    trainer = LanguageModelTrainer()
    trainer.load_model(tiny_model_dir)
    assert len(trainer.generate(PROMPT)) > 0  # 200 new tokens asked: capped, no IndexError
    # a prompt longer than the context keeps its last half and continues it
    long_prompt = " ".join(["the harbour town"] * 100)
    ids = tokenizer(long_prompt)["input_ids"]
    assert len(ids) > 128
    text = generate_text(model, tokenizer, decoding("greedy", max_new_tokens=10), long_prompt)
    tail = torch.tensor([ids[-64:]])
    out = model.generate(input_ids=tail, attention_mask=torch.ones_like(tail), do_sample=False, max_new_tokens=10,
                         pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(out[0, 64:], skip_special_tokens=True)
    assert "fill the model's context of 128: generating from its last 64" in capsys.readouterr().err


def test_instruction_eval_answers_stop_at_the_model_context(tiny_lm):
    """engine.answers.accuracy (eval of instruction runs) budgets the expected answer's length + 8 new tokens:
    a long expected answer on a 128-token model is capped instead of running past the position embeddings."""
    from engine.answers import accuracy
    from engine.formats import Segment

    model, tokenizer = tiny_lm
    example = [Segment("Question: where is the boat? Answer:", False), Segment(" the harbour" * 80, True)]
    result = accuracy(model, tokenizer, [example])
    assert result["answered"] == 1 and result["exact_match"] == 0.0
