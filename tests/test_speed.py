"""Speed features: chunked cross-entropy, vocabulary padding, tokenization cache, micro-batch sizing, bench."""

import dataclasses
import json

import pytest
import torch

from engine import loss as loss_mod
from engine.testing import run_recipe, tiny_recipe, write_corpus
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_auto_batch_size_probes_with_the_optimizer_state_already_made(monkeypatch):
    """AdamW's state (two fp32 copies of the weights) is made before the probes, by a step the fused kernel
    skips: the probes measure the memory the run will hold, and the state and weights equal fresh ones, so the
    first real step is the same as without probing. Without it a micro-batch that fitted in the probe could
    run out of memory at the first step. Other optimizers get a line saying their state is not counted."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine import autobatch
    from engine.loss import token_loss_sum
    from engine.step import inner_optimizer

    def setup(fused):
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=64, attn_pdrop=0.0,
                                           resid_pdrop=0.0, embd_pdrop=0.0))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None)
        return (accelerator, *accelerator.prepare(model, optimizer))

    monkeypatch.setattr(autobatch, "probes_memory", lambda device: True)
    accelerator, model, optimizer = setup(True)
    inner, before = inner_optimizer(optimizer), {n: p.detach().clone() for n, p in model.named_parameters()}
    states_at_probe, lines = [], []

    def loss_fn(m, b):
        states_at_probe.append(len(inner.state))
        return token_loss_sum(m, b, "plain")

    autobatch.choose(model, loss_fn, accelerator, 2, 1, 16, 64, lines.append, optimizer)
    n_params = len(list(model.parameters()))
    assert states_at_probe and all(n == n_params for n in states_at_probe)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for state in inner.state.values():
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    after = {}
    for name, (acc, m, opt) in (("probed", (accelerator, model, optimizer)), ("fresh", setup(True))):
        token_loss_sum(m, {"input_ids": ids, "labels": ids}, "plain")[0].backward()
        opt.step()
        after[name] = {n: p.detach().clone() for n, p in m.named_parameters()}
    for n, value in after["fresh"].items():
        assert torch.equal(after["probed"][n], value), n
    accelerator, model, optimizer = setup(False)
    lines.clear()
    autobatch.choose(model, lambda m, b: token_loss_sum(m, b, "plain"), accelerator, 2, 1, 16, 64, lines.append, optimizer)
    assert not inner_optimizer(optimizer).state and "makes its state at the first step" in lines[0]


@pytest.mark.slow
def test_auto_batch_size_probes_down_to_the_largest_micro_batch_that_fits(tmp_path, monkeypatch, capsys):
    """The GPU path, on CPU: the model raises CUDA's out-of-memory error for more than 4 rows, as a GPU
    would, and the device is declared one whose memory is probed. The run must pick 4 x accumulation 4
    for the recipe's 8 x 2 and train exactly as a run given 4 x 4 by hand (same global batch, same
    random state: probing consumes none)."""
    from transformers import AutoModelForCausalLM

    from engine import autobatch, model as model_mod

    real_load, probed = model_mod.load_model, []

    def load_model(cfg, tokenizer, *precision):
        model = real_load(cfg, tokenizer, *precision)

        def guard(module, args, kwargs):
            rows = kwargs["input_ids"].shape[0]
            if module.training:
                probed.append(rows)
                if rows > 4:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.register_forward_pre_hook(guard, with_kwargs=True)
        return model

    monkeypatch.setattr(model_mod, "load_model", load_model)
    monkeypatch.setattr(autobatch, "probes_memory", lambda device: True)
    auto = run_recipe(tiny_recipe(tmp_path / "auto", train={"batch_size": 8, "gradient_accumulation_steps": 2, "auto_batch_size": True, "max_steps": 4}))
    assert "auto batch size: micro-batch 4 x accumulation 4 (recipe: 8 x 2;" in capsys.readouterr().out
    assert probed[:3] == [16, 8, 4]  # divisors of 16, largest first, down to the first that fits
    assert max(probed[3:]) == 4 and len(probed[3:]) == 4 * 4  # training: 4 steps of 4 micro-batches of 4
    probed.clear()
    by_hand = run_recipe(tiny_recipe(tmp_path / "hand", train={"batch_size": 4, "gradient_accumulation_steps": 4, "max_steps": 4}))
    assert auto["tokens_seen"] == by_hand["tokens_seen"] and auto["train_loss"] == pytest.approx(by_hand["train_loss"], rel=1e-6)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "auto" / "run" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "hand" / "run" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


class _Callback:
    """Base of the throwaway callback plugins below: no options."""

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, options=None):
        pass


@pytest.mark.slow
def test_fused_activations_compute_the_same_function_in_one_kernel(tmp_path):
    from engine import model as model_mod
    from engine.testing import inline_plugin
    from engine.hookspecs import hookimpl
    from transformers import AutoConfig, AutoModelForCausalLM

    model = _tiny_gpt2()
    assert model.config.activation_function == "gelu_new"
    batch = _batch(300)
    loss, grads = _loss_and_grads(model, batch, loss_mod.plain_loss_sum)
    assert model_mod.use_fused_activations(model) == 2
    assert {type(block.mlp.act).__name__ for block in model.transformer.h} == {"GELUTanh"}
    fused_loss, fused_grads = _loss_and_grads(model, batch, loss_mod.plain_loss_sum)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-9, atol=1e-12, msg=name)

    seen = {}

    class Capture(_Callback):
        @hookimpl
        def on_train_start(self, context):
            seen[context.recipe.model.fused_activations] = {type(m).__name__ for m in context.model.modules() if "GELU" in type(m).__name__}

    with inline_plugin("callback", "capture_acts", Capture):
        for on in (True, False):
            run_recipe(tiny_recipe(tmp_path / str(on), model={"fused_activations": on}, callbacks=["capture_acts"]))
    assert seen == {True: {"GELUTanh"}, False: {"NewGELUActivation"}}
    # only the module in memory changed: the saved model still names gelu_new and loads as usual
    final = tmp_path / "True" / "run" / "final"
    assert AutoConfig.from_pretrained(final).activation_function == "gelu_new"
    assert type(AutoModelForCausalLM.from_pretrained(final).transformer.h[0].mlp.act).__name__ == "NewGELUActivation"


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(tmp_path, capsys):
    """train.compile: the step's forward and loss are compiled (inductor, on CPU here), it trains, reports the
    compile time, and final/ holds weights under their usual names, which load back with transformers."""
    from transformers import AutoModelForCausalLM

    one_layer = {"config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64,
                            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}
    compiled = run_recipe(tiny_recipe(tmp_path / "compiled", train={"compile": True, "max_steps": 3}, model=one_layer))
    assert "train.compile: the first step took" in capsys.readouterr().out
    eager = run_recipe(tiny_recipe(tmp_path / "eager", train={"max_steps": 3}, model=one_layer))
    # the same math through other kernels: the same losses and weights up to float rounding
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "compiled" / "run" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "eager" / "run" / "final").state_dict()
    assert a.keys() == b.keys() and not any("_orig_mod" in name for name in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_the_compiled_step_never_recompiles_after_the_first(tmp_path, monkeypatch):
    """Fixed shapes (batches padded to data.max_length, no masks): one compilation for the whole run, counted
    with torch._dynamo's counters (aot_eager backend: the same capture as inductor, without code generation)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from engine import step as step_mod
    from engine.hookspecs import hookimpl
    from engine.testing import inline_plugin

    monkeypatch.setattr(step_mod, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    seen = []

    class Count(_Callback):
        @hookimpl
        def on_step_end(self, context, metrics):
            seen.append((counters["stats"]["unique_graphs"], sum(counters["recompiles"].values()) if counters["recompiles"] else 0))

    recipe = tiny_recipe(tmp_path, train={"compile": True, "max_steps": 6, "batch_size": 3}, callbacks=["count"],
                         data={"train": str(write_corpus(tmp_path / "c.txt")), "max_length": 32, "packing": False})
    with inline_plugin("callback", "count", Count):
        run_recipe(recipe)
    assert seen[0][0] >= 1  # compiled at the first step
    assert all(s == seen[0] for s in seen)  # nothing compiled again: documents of every length, one graph
    torch._dynamo.reset()


def test_cuda_graphs_are_refused_clearly_without_a_gpu_or_compile(tmp_path):
    from engine.errors import UserError

    with pytest.raises(UserError, match="train.cuda_graphs: set train.compile|train.cuda_graphs: records the compiled step"):
        run_recipe(tiny_recipe(tmp_path / "a", train={"cuda_graphs": True, "max_steps": 1}))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="train.cuda_graphs: CUDA graphs need a CUDA GPU, and this run is on cpu"):
            run_recipe(tiny_recipe(tmp_path / "b", train={"cuda_graphs": True, "compile": True, "max_steps": 1}))


@pytest.mark.slow
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


@pytest.mark.slow
def test_shakespeare_recipe_validates_with_speed_defaults():
    result = run_cli("check", "recipes/shakespeare.toml")
    assert result.returncode == 0, result.stderr
    assert 'chunked_loss = "auto"' in result.stdout and "pad_vocab_multiple = 64" in result.stdout
    assert 'train = "../shared/data/tinyshakespeare-train.txt"' in result.stdout
    assert 'txt_documents = "file"' in result.stdout


@pytest.mark.slow
def test_gpu_benchmark_plumbing_runs_on_cpu(tmp_path):
    """Benchmark 4 needs a GPU to mean anything; --smoke runs its every engine and Trainer run on CPU with a
    tiny model, so a GPU session only has to run it (its recipes and Trainer arguments are checked here)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "engine.benchmarks.gpu", "--smoke", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["smoke"] is True
    runs = ("engine-a", "trainer-a-eager", "trainer-a-compiled", "engine-b", "trainer-b-eager", "trainer-b-compiled", "bare-b")
    shapes = {key: (results[key]["micro_batch"], results[key]["accumulation"]) for key in runs}
    assert shapes == {"engine-a": (4, 4), "trainer-a-eager": (4, 4), "trainer-a-compiled": (4, 4), "engine-b": (4, 1),
                      "trainer-b-eager": (4, 1), "trainer-b-compiled": (4, 1), "bare-b": (4, 1)}, results
    assert all(results[key]["tokens_per_second"] > 0 and "mfu" in results[key] for key in runs)  # MFU: NaN without a GPU
    assert results["trainer-a"] in (results["trainer-a-eager"], results["trainer-a-compiled"])  # the faster counts
    assert "SMOKE RUN ON CPU" in proc.stdout and "bare PyTorch, compiled (ceiling)" in proc.stdout


def _llama3_style_tokenizer(text):
    """A byte-level BPE with Llama 3's split pattern (Split + ByteLevel without regex), trained here."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_long_documents_are_tokenized_in_pieces_with_exactly_the_same_ids():
    """One long document (a whole file) is encoded and trained on as pieces cut at clean line breaks, on
    all cores; the ids and the trained tokenizer must equal those of the whole document."""
    from engine import tokcache
    from engine.model import train_tokenizer
    from tests.conftest import REPO

    paragraphs = (REPO / "recipes" / "data" / "quickstart.txt").read_text(encoding="utf-8").split("\n\n")
    # one document with every kind of break: single and double newlines, CRLF, indents, trailing spaces
    joins = ["\n", "\n\n", "\r\n", "\n  ", " \n", "\n\n\n", ".\n"]
    document = "".join(p + joins[i % len(joins)] for i, p in enumerate(paragraphs))
    assert len(tokcache.pieces(document)) > 3

    ours = train_tokenizer([document], 400)  # trained on the pieces
    whole = _trained_on_whole(document)
    assert ours.backend_tokenizer.to_str() == whole.backend_tokenizer.to_str()

    for tok in (ours, _llama3_style_tokenizer(document)):
        assert tokcache.splits_exactly(tok)
        expected = tok([document], add_special_tokens=False)["input_ids"][0] + [tok.eos_token_id]
        assert tokcache._encode([document, "short one"], tok, print) == [expected, tok("short one", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]


def _trained_on_whole(document):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([document], trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_tokenizers_that_mark_word_starts_are_never_split():
    """SentencePiece-style tokenizers (Metaspace, a normalizer) would change at a cut: they keep whole documents."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine import tokcache

    meta = Tokenizer(models.BPE())
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not tokcache.splits_exactly(PreTrainedTokenizerFast(tokenizer_object=meta))
    normalized = Tokenizer(models.BPE())
    normalized.normalizer = normalizers.NFKC()
    normalized.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert not tokcache.splits_exactly(PreTrainedTokenizerFast(tokenizer_object=normalized))
    prefixed = Tokenizer(models.BPE())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not tokcache.splits_exactly(PreTrainedTokenizerFast(tokenizer_object=prefixed))


def _benchmark(module, *args, timeout=600):
    import subprocess
    import sys

    from tests.conftest import REPO

    return subprocess.run([sys.executable, "-m", f"engine.benchmarks.{module}", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_benchmark_1_runs_engine_and_trainer_and_prints_its_table(tmp_path, shared_data):
    """Benchmark 1 end to end at 2 steps: both runs train the same model on the same data and are evaluated alike."""
    out = tmp_path / "b1.json"
    proc = _benchmark("shakespeare", "--json", str(out), "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Quality per second" in proc.stdout and "target: <= 1.886 nats/char in <= 52.5 s" in proc.stdout
    r = json.loads(out.read_text())
    engine, trainer = r["engine"], r["trainer"]
    assert engine["steps"] == trainer["steps"] == 2 and engine["seconds"] > 0 and trainer["seconds"] > 0
    # 2 steps from the same initial weights: both near the untrained model's value, and close to each other
    assert 3.0 < engine["nats_per_char"] < 4.5 and abs(engine["nats_per_char"] - trainer["nats_per_char"]) < 0.1


@pytest.mark.slow
def test_benchmark_2_runs_its_four_loops_and_prints_its_table(tmp_path):
    out = tmp_path / "b2.json"
    proc = _benchmark("overhead", "--steps", "3", "--rounds", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x bare (engine's kernels)" in proc.stdout and "targets: engine >= 0.95x" in proc.stdout
    r = json.loads(out.read_text())
    assert set(r["tokens_per_second"]) == {"engine", "bare loop, engine's kernels", "bare loop, stock model + AdamW", "HF Trainer"}
    assert all(v > 0 for v in r["tokens_per_second"].values()) and r["engine_vs_bare"] > 0


@pytest.mark.slow
def test_benchmark_3_measures_what_checkpointing_chunking_and_8bit_state_save(tmp_path):
    """One distilgpt2-wide layer at seq 512: logits (512 x 50257) exceed a chunk, so every row differs."""
    out = tmp_path / "b3.json"
    proc = _benchmark("memory", "--layers", "1", "--seq", "512", "--batch", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "promised" in proc.stdout
    r = json.loads(out.read_text())
    acts = {(a["checkpointing"], a["chunked_loss"]): a["bytes"] for a in r["activations"]}
    assert acts[(True, False)] < acts[(False, False)] and acts[(False, True)] < acts[(False, False)]
    assert acts[(True, True)] < min(acts[(True, False)], acts[(False, True)])
    assert r["optimizer"]["adamw8bit_bytes"] < 0.3 * r["optimizer"]["adamw_bytes"]


@pytest.mark.slow  # two runs, ~11 s on a shared CPU
def test_cache_false_writes_nothing_to_the_cache_folders(tmp_path, monkeypatch):
    """data.cache = false: neither data.cache_dir nor $TUNESMITH_CACHE gets a file, nothing is reused, the run trains."""
    from engine import tokcache

    env_cache, recipe_cache = tmp_path / "env-cache", tmp_path / "recipe-cache"
    monkeypatch.setenv("TUNESMITH_CACHE", str(env_cache))
    before = dict(tokcache.stats)
    first = run_recipe(tiny_recipe(tmp_path / "a", data={"cache": False}, train={"max_steps": 3}))
    second = run_recipe(tiny_recipe(tmp_path / "b", data={"cache": False, "cache_dir": str(recipe_cache)}, train={"max_steps": 3}))
    after = dict(tokcache.stats)
    for folder in (env_cache, recipe_cache):
        assert not folder.exists() or not any(p.is_file() for p in folder.rglob("*")), list(folder.rglob("*"))
    assert after["reused"] == before["reused"] and after["tokenizers_reused"] == before["tokenizers_reused"]
    assert first["steps"] == second["steps"] == 3 and first["train_loss"] == second["train_loss"]


def test_bench_timer_waits_for_the_gpu_at_the_bounds_of_its_window(monkeypatch):
    """The step is asynchronous on CUDA: the timer's window (from the end of the first step to the end of the
    last) must start and end with the GPU caught up, or the first step's queued GPU work is counted as steady
    time. CUDA simulated: synchronize is recorded; the steps between the bounds are not waited for."""
    from types import SimpleNamespace

    from engine import bench

    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: events.append("sync"))
    timer = bench._StepTimer()
    context = SimpleNamespace(state=SimpleNamespace(step=0, tokens_seen=0), total_steps=5)
    timer.on_train_start(context)
    for step in range(1, 6):
        context.state.step, context.state.tokens_seen = step, 100 * step
        events.append(f"mark {step}")
        timer.on_step_end(context, {})
    assert events == ["mark 1", "sync", "mark 2", "mark 3", "mark 4", "mark 5", "sync"]
    assert [tokens for _, tokens in bench._StepTimer.marks] == [0, 100, 200, 300, 400, 500]
