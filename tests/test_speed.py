"""Speed features: chunked cross-entropy, vocabulary padding, tokenization cache, micro-batch sizing, bench."""

import json

import pytest
import torch

from engine import loss as loss_mod
from engine.testing import run_recipe, tiny_recipe
from tests.conftest import run_cli


def _tiny_gpt2(vocab=300, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(config).double()


def _batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, loss_mod.IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, fn):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_loss_equals_plain_loss_and_gradients(lora):
    vocab = 300
    model = _tiny_gpt2(vocab)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False))
    assert loss_mod.output_layer(model) is not None
    batch = _batch(vocab)
    # a chunk budget of 7 rows of logits: the 117 targets go through 17 chunks
    chunked = lambda m, b: loss_mod.chunked_loss_sum(m, b, chunk_elements=7 * vocab)  # noqa: E731
    plain_loss, plain_grads = _loss_and_grads(model, batch, loss_mod.plain_loss_sum)
    chunk_loss, chunk_grads = _loss_and_grads(model, batch, chunked)
    assert plain_grads.keys() == chunk_grads.keys() and len(plain_grads) > 0
    if lora:
        assert all("lora_" in n for n in plain_grads)
    torch.testing.assert_close(chunk_loss.double(), plain_loss.double(), rtol=1e-6, atol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(chunk_grads[name], plain_grads[name], rtol=1e-6, atol=1e-6, msg=name)
    # the identity swap is undone: the model returns real logits again
    assert model(input_ids=batch["input_ids"]).logits.shape[-1] == vocab


def test_chunked_loss_never_holds_full_logits():
    """Largest tensor saved for backward: the plain loss keeps fp32 logits of the whole batch, the chunked one does not."""
    vocab = 4096
    model = _tiny_gpt2(vocab).float()
    batch = _batch(vocab)

    def saved_bytes(fn):
        sizes = [0]
        params = {p.data_ptr() for p in model.parameters()}

        def pack(t):
            if t.data_ptr() not in params:  # weights are saved either way
                sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(model, batch)
        return max(sizes)

    full_logits = batch["labels"][:, 1:].numel() * vocab * 4  # fp32 logits of every target
    assert saved_bytes(loss_mod.plain_loss_sum) >= full_logits
    chunked = lambda m, b: loss_mod.chunked_loss_sum(m, b, chunk_elements=16 * vocab)  # noqa: E731
    assert saved_bytes(chunked) < full_logits / 4


def test_tokenization_cache_is_reused_and_gives_the_same_run(tmp_path):
    from engine import tokcache

    cache = tmp_path / "cache"
    before = dict(tokcache.stats)
    first = run_recipe(tiny_recipe(tmp_path / "a", data={"cache_dir": str(cache)}))
    after_first = dict(tokcache.stats)
    second = run_recipe(tiny_recipe(tmp_path / "b", data={"cache_dir": str(cache)}))
    after_second = dict(tokcache.stats)
    assert after_first["tokenized"] - before["tokenized"] == 2  # train and val documents
    assert after_first["tokenizers_trained"] - before["tokenizers_trained"] == 1
    assert after_second["tokenized"] == after_first["tokenized"]  # the second run tokenized nothing
    assert after_second["reused"] - after_first["reused"] == 2
    assert after_second["tokenizers_reused"] - after_first["tokenizers_reused"] == 1
    assert len(list((cache / "tokens").glob("*.npz"))) == 2
    assert second["train_loss"] == first["train_loss"] and second["val_loss"] == first["val_loss"]


def test_tokenization_cache_key_follows_text_and_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from engine import tokcache

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    docs = ["The boat sat in the harbour.", "Warm bread in the morning."]
    logs = []
    first = tokcache.tokenize(docs, tok, tmp_path, logs.append)
    again = tokcache.tokenize(list(docs), tok, tmp_path, logs.append)
    changed = tokcache.tokenize([docs[0], docs[1] + "!"], tok, tmp_path, logs.append)
    assert first == again == [ids + [tok.eos_token_id] for ids in tok(docs, add_special_tokens=False)["input_ids"]]
    assert changed[1] != first[1]
    assert [line.split()[1] for line in logs] == ["tokenized", "reused", "tokenized"]
    other = tokcache.tokenizer_hash(tok)
    tok.add_tokens(["harbour"])
    assert tokcache.tokenizer_hash(tok) != other


def test_vocabulary_is_padded_and_padding_ids_are_never_generated(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = tiny_recipe(tmp_path, model={"pad_vocab_multiple": 64})
    run_recipe(recipe)
    final = tmp_path / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    n = len(tokenizer)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size > n
    # make every padding id the model's favourite: generation must still never pick one
    model.get_output_embeddings().register_forward_hook(lambda mod, args, out: out.index_fill(-1, torch.arange(n, out.shape[-1]), 1e4))
    ids = tokenizer("The boat", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    assert int(out[0, ids["input_ids"].shape[1]:].max()) < n
    model.generation_config.suppress_tokens = None  # without the saved setting they would be generated
    out = model.generate(**ids, max_new_tokens=8, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    assert int(out[0, ids["input_ids"].shape[1]:].max()) >= n


def test_largest_fitting_micro_batch_keeps_the_global_batch():
    from engine import autobatch

    tried = []

    def fits(size):
        tried.append(size)
        return size <= 5

    assert autobatch.largest_fitting(12, fits) == 4
    assert tried == [12, 6, 4]  # divisors of 12, largest first, stopping at the first that fits
    assert autobatch.largest_fitting(7, lambda s: False) == 1


def test_bench_command_measures_without_writing_a_run(tmp_path):
    from engine import tomlfile

    recipe = tiny_recipe(tmp_path, data={"cache_dir": str(tmp_path / "cache")})
    path = tmp_path / "tiny.toml"
    path.write_text(tomlfile.dumps(recipe), encoding="utf-8")
    result = run_cli("bench", str(path), "--steps", "4", "train.auto_batch_size=true", "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "auto batch size: on cpu the recipe's batch is kept (4 x accumulation 1)" in result.stdout
    assert "tokens/s" in result.stdout and "process peak RSS" in result.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["steps"] == 4 and report["tokens_per_second"] > 0 and report["peak_memory_bytes"] > 0
    assert report["micro_batch"] == 4 and report["accumulation"] == 1
    assert not (tmp_path / "run").exists()  # no run folder


def test_bench_command_rejects_too_few_steps(tmp_path):
    result = run_cli("bench", "recipes/quickstart.toml", "--steps", "1")
    assert result.returncode == 2 and "--steps" in result.stderr and "Traceback" not in result.stderr


def test_shakespeare_recipe_validates_with_speed_defaults():
    result = run_cli("check", "recipes/shakespeare.toml")
    assert result.returncode == 0, result.stderr
    assert "chunked_loss = true" in result.stdout and "pad_vocab_multiple = 64" in result.stdout
    assert 'train = "../shared/data/tinyshakespeare-train.txt"' in result.stdout
    assert 'txt_documents = "file"' in result.stdout
