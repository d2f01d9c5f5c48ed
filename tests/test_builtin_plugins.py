"""Every built-in plugin does what it says: augmentations, optimizers, schedulers, early stopping,
the wandb sink, decoding strategies; the troubleshooting advice; and the issue's done-when recipe."""

import glob
import json
import math
import random
import struct
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from engine import data as data_mod
from engine import loop
from engine import hookimpl
from engine import recipe as recipe_mod
from engine.errors import UserError
from engine.manager import Plugins
from engine.testing import inline_plugin, run_recipe, tiny_recipe, write_corpus, write_recipe
from tests.conftest import REPO, direct_val_numbers, run_cli


def plugins_of(tmp_path, **top):
    recipe = recipe_mod.from_dict(tiny_recipe(tmp_path, **top), "(test)")
    return recipe, Plugins(recipe.plugins)


def instance(plugins, name):
    return next(s.instance for s in plugins if s.name == name)


def jsonl(run_dir, phase):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if f'"phase": "{phase}"' in l]


# ------------------------------------------------------------------ augmentations
TEXT = "The baker walked to the harbour\nand the old fisher sang a quiet song by the sea"


def test_each_augmentation_changes_words_the_way_it_says(tmp_path):
    _, plugins = plugins_of(
        tmp_path, augmentations=["word_swap", "word_dropout", "word_insertion"],
        word_swap={"swaps": 2}, word_dropout={"count": 3}, word_insertion={"count": 2},
    )
    words, vocab = TEXT.split(), ["ZEBRA", "QUUX"]
    for seed in range(20):
        swapped = instance(plugins, "word_swap").augment_document(text=TEXT, rng=random.Random(seed), vocabulary=vocab)
        assert Counter(swapped.split()) == Counter(words) and swapped.count("\n") == 1  # same words, same layout
        assert 2 <= sum(a != b for a, b in zip(swapped.split(), words)) <= 4
        dropped = instance(plugins, "word_dropout").augment_document(text=TEXT, rng=random.Random(seed), vocabulary=vocab)
        it = iter(words)
        assert len(dropped.split()) == len(words) - 3 and all(w in it for w in dropped.split())  # an ordered subsequence
        inserted = instance(plugins, "word_insertion").augment_document(text=TEXT, rng=random.Random(seed), vocabulary=vocab)
        assert [w for w in inserted.split() if w not in vocab] == words and len(inserted.split()) == len(words) + 2
    # probability mode: 0 changes nothing, 1 drops all words but one
    _, plugins = plugins_of(tmp_path / "p", augmentations=["word_swap", "word_dropout"], word_swap={"probability": 0.0},
                            word_dropout={"probability": 1.0})
    assert instance(plugins, "word_swap").augment_document(text=TEXT, rng=random.Random(0), vocabulary=vocab) == TEXT
    assert len(instance(plugins, "word_dropout").augment_document(text=TEXT, rng=random.Random(0), vocabulary=vocab).split()) == 1


def test_augmentations_run_in_recipe_order(tmp_path):
    vocab = ["ZEBRA"]
    results = {}
    for order in (["word_insertion", "word_dropout"], ["word_dropout", "word_insertion"]):
        _, plugins = plugins_of(tmp_path / "_".join(order), augmentations=order,
                                word_insertion={"count": 4}, word_dropout={"probability": 0.5})
        chained = plugins.augment(TEXT, random.Random(7), vocab)
        rng, by_hand = random.Random(7), TEXT
        for name in order:
            by_hand = instance(plugins, name).augment_document(text=by_hand, rng=rng, vocabulary=vocab)
        assert chained == by_hand
        results[tuple(order)] = chained
    # insertion first: inserted words can be dropped again; dropout first: all 4 survive
    assert Counter(results[("word_dropout", "word_insertion")].split())["ZEBRA"] == 4
    assert results[("word_insertion", "word_dropout")] != results[("word_dropout", "word_insertion")]


def test_augmented_copies_are_seeded_and_validation_is_never_touched(tmp_path):
    val = write_corpus(tmp_path / "val.txt", n_documents=30, seed=5)

    def documents(seed, copies=1, folder="a"):
        recipe, plugins = plugins_of(
            tmp_path / folder, augmentations=["word_swap", "word_insertion"], word_insertion={"probability": 0.2},
            data={"val": str(val), "augment_copies": copies}, train={"seed": seed},
        )
        from types import SimpleNamespace

        from engine import formats

        def texts(split):  # the path a run takes: rows (engine/formats.py), their data.text_field
            return SimpleNamespace(train=[r["text"] for r in split.train.items], val=[r["text"] for r in split.val.items])

        return texts(formats.split_rows(recipe)), texts(formats.run_rows(recipe, plugins))

    plain, docs = documents(1)
    n = len(plain.train)
    assert docs.val == plain.val  # validation untouched
    assert docs.train[:n] == plain.train and len(docs.train) == 2 * n  # 1 copy doubles the data
    assert sum(a != b for a, b in zip(docs.train[n:], plain.train)) > 0.8 * n
    assert documents(1, folder="b")[1].train == docs.train  # same seed, same data
    assert documents(2, folder="c")[1].train[n:] != docs.train[n:]  # another seed, other copies
    plain3, docs3 = documents(1, copies=3, folder="d")
    assert len(docs3.train) == 4 * n and docs3.val == plain3.val
    _, none = documents(1, copies=0, folder="e")
    assert none.train == plain.train



@pytest.mark.slow  # two one-epoch runs, ~15 s on a shared CPU
def test_one_augmented_copy_doubles_the_blocks_and_steps_of_an_epoch_in_a_real_run(tmp_path, capsys):
    """data.augment_copies = 1 with word_swap, in a real one-epoch run: about twice the training blocks (the
    copies hold the same words, so the same tokens up to merges), twice the steps; validation unchanged."""
    import re

    def run(folder, augmentations):
        recipe = tiny_recipe(tmp_path / folder, augmentations=augmentations, data={"augment_copies": 1},
                             train={"max_steps": 0, "epochs": 1, "batch_size": 64})
        summary = run_recipe(recipe)
        train, val = map(int, re.search(r"data: (\d+) training blocks, (\d+) validation blocks", capsys.readouterr().out).groups())
        return summary, train, val

    plain, plain_train, plain_val = run("plain", [])
    augmented, train, val = run("augmented", ["word_swap"])
    assert val == plain_val
    assert 1.9 * plain_train <= train <= 2.1 * plain_train, (plain_train, train)
    assert plain["steps"] == plain_train // 64 and augmented["steps"] == train // 64  # full batches only
    assert augmented["steps"] >= 2 * plain["steps"]


# ------------------------------------------------------------------ optimizers
def _state_bytes(optimizer):
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_8bit_optimizers_keep_at_most_30_percent_of_adamw_state(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.model import param_groups

    config = GPT2Config(n_layer=2, n_head=4, n_embd=128, n_positions=64, vocab_size=1000)
    ids = torch.randint(0, 1000, (2, 32))
    sizes, moved = {}, {}
    for name in ("adamw", "adamw8bit", "paged_adamw8bit"):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
        _, plugins = plugins_of(tmp_path / name, optimizer=name)
        optimizer = plugins.hook.create_optimizer(param_groups=param_groups(model, 0.01), learning_rate=1e-3, device=torch.device("cpu"))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        sizes[name] = _state_bytes(optimizer)
        moved[name] = (model.transformer.h[0].attn.c_attn.weight - before).abs().max().item()
    print({k: f"{v / 1e6:.2f} MB" for k, v in sizes.items()})
    for name in ("adamw8bit", "paged_adamw8bit"):
        assert sizes[name] <= 0.30 * sizes["adamw"], (name, sizes)
        assert moved[name] == pytest.approx(moved["adamw"], rel=0.05)  # the same first Adam step (about lr)


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_8bit_optimizer_options_reach_bitsandbytes_and_a_run_learns_with_them(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.model import param_groups

    config = GPT2Config(n_layer=1, n_head=2, n_embd=64, n_positions=32, vocab_size=300)
    ids = torch.randint(0, 300, (2, 16))
    options = {"beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "min_8bit_size": 5000}
    for name in ("adamw8bit", "paged_adamw8bit"):
        model = GPT2LMHeadModel(config)
        _, plugins = plugins_of(tmp_path / name, optimizer=name, **{name: options})
        optimizer = plugins.hook.create_optimizer(param_groups=param_groups(model, 0.01), learning_rate=1e-3, device=torch.device("cpu"))
        assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in optimizer.param_groups)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        # min_8bit_size: the embedding (300 x 64) keeps 8-bit state, the 64 x 192 attention weight (12288) too,
        # a 64-element LayerNorm weight keeps 32-bit state
        state_dtype = {n: optimizer.state[p]["state1"].dtype for n, p in model.named_parameters() if p in optimizer.state}
        assert state_dtype["transformer.wte.weight"] == torch.uint8 and state_dtype["transformer.h.0.attn.c_attn.weight"] == torch.uint8
        assert state_dtype["transformer.h.0.ln_1.weight"] == torch.float32
        # 64 x 64 = 4096 elements: 8-bit under bitsandbytes' default (4096), 32-bit under min_8bit_size 5000
        assert state_dtype["transformer.h.0.attn.c_proj.weight"] == torch.float32
    summary = run_recipe(tiny_recipe(tmp_path / "run8", optimizer="adamw8bit", adamw8bit=options, train={"max_steps": 8, "learning_rate": 1e-2}))
    losses = [r["loss"] for r in jsonl(tmp_path / "run8" / "run", "train")]
    assert summary["steps"] == 8 and losses[-1] < losses[0] - 0.3


def test_sgd_momentum_and_nesterov_update_as_documented(tmp_path):
    for nesterov, after_two in ((False, 1.0 + 1.9), (True, 1.9 + 2.71)):
        _, plugins = plugins_of(tmp_path / str(nesterov), optimizer="sgd", sgd={"momentum": 0.9, "nesterov": nesterov})
        p = torch.nn.Parameter(torch.zeros(3))
        optimizer = plugins.hook.create_optimizer(param_groups=[{"params": [p], "weight_decay": 0.0}], learning_rate=0.1, device=torch.device("cpu"))
        assert isinstance(optimizer, torch.optim.SGD)
        for _ in range(2):
            p.grad = torch.ones(3)
            optimizer.step()
        torch.testing.assert_close(p.detach(), torch.full((3,), -0.1 * after_two))
    _, plugins = plugins_of(tmp_path / "bad", optimizer="sgd", sgd={"momentum": 0.0, "nesterov": True})
    with pytest.raises(UserError, match="sgd.nesterov"):
        plugins.hook.create_optimizer(param_groups=[{"params": [torch.nn.Parameter(torch.zeros(1))]}], learning_rate=0.1, device=torch.device("cpu"))


# ------------------------------------------------------------------ schedulers
def _lrs(tmp_path, scheduler, options, total=100):
    _, plugins = plugins_of(tmp_path / scheduler, scheduler=scheduler, **{scheduler: options})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = plugins.hook.create_scheduler(optimizer=optimizer, total_steps=total)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(total):
        optimizer.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs  # lrs[s]: the learning rate after s scheduler steps


def test_schedulers_give_the_documented_learning_rate_at_known_steps(tmp_path):
    peak, cos = 2.0, lambda x: 0.5 * (1 + math.cos(math.pi * x))
    linear = _lrs(tmp_path, "linear", {"warmup_steps": 10})
    for s, want in ((0, 0.0), (5, 0.5), (10, 1.0), (55, 0.5), (91, 0.1), (100, 0.0)):
        assert linear[s] == pytest.approx(peak * want, abs=1e-9), ("linear", s)
    constant = _lrs(tmp_path, "constant", {"warmup_ratio": 0.2})
    for s, want in ((0, 0.0), (10, 0.5), (20, 1.0), (60, 1.0), (100, 1.0)):
        assert constant[s] == pytest.approx(peak * want, abs=1e-9), ("constant", s)
    restarts = _lrs(tmp_path, "cosine_restarts", {"warmup_steps": 10, "cycles": 3})
    for s in (10, 20, 25, 39, 40, 50, 70, 99):
        assert restarts[s] == pytest.approx(peak * cos(((s - 10) / 90 * 3) % 1), abs=1e-9), ("cosine_restarts", s)
    assert restarts[40] == pytest.approx(peak) and restarts[39] < 0.05 * peak  # a restart at each third
    cosine = _lrs(tmp_path, "cosine", {"warmup_ratio": 0.1, "min_lr_ratio": 0.1})
    for s in (0, 5, 10, 32, 55, 80, 100):
        want = s / 10 if s < 10 else 0.1 + 0.9 * cos((s - 10) / 90)
        assert cosine[s] == pytest.approx(peak * want, abs=1e-9), ("cosine", s)
    assert min(cosine) == pytest.approx(0.0) and min(cosine[10:]) == pytest.approx(0.1 * peak)  # the floor
    assert _lrs(tmp_path / "w", "cosine", {"warmup_steps": 30})[30] == pytest.approx(peak)  # warmup_steps wins


def test_scheduler_curves_equal_transformers_schedules_step_by_step(tmp_path):
    """The curves are written out (plugins/cosine.py says why); they must stay transformers' own."""
    from transformers import optimization as tf

    def tf_lrs(make, total=100):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        sched = make(optimizer)
        lrs = [sched.get_last_lr()[0]]
        for _ in range(total):
            optimizer.step()
            sched.step()
            lrs.append(sched.get_last_lr()[0])
        return lrs

    pairs = [
        (_lrs(tmp_path / "a", "cosine", {"warmup_steps": 7, "min_lr_ratio": 0.15}),
         tf_lrs(lambda o: tf.get_cosine_with_min_lr_schedule_with_warmup(o, 7, 100, min_lr_rate=0.15))),
        (_lrs(tmp_path / "b", "linear", {"warmup_steps": 13}), tf_lrs(lambda o: tf.get_linear_schedule_with_warmup(o, 13, 100))),
        (_lrs(tmp_path / "c", "constant", {"warmup_steps": 9}), tf_lrs(lambda o: tf.get_constant_schedule_with_warmup(o, 9))),
        (_lrs(tmp_path / "d", "cosine_restarts", {"warmup_steps": 5, "cycles": 4}),
         tf_lrs(lambda o: tf.get_cosine_with_hard_restarts_schedule_with_warmup(o, 5, 100, num_cycles=4))),
    ]
    for ours, theirs in pairs:
        assert ours == pytest.approx(theirs, abs=1e-12)


# ------------------------------------------------------------------ early stopping
def _patience(tmp_path, **options):
    _, plugins = plugins_of(tmp_path, early_stopping="patience", patience=options)
    return instance(plugins, "patience")


def test_patience_counts_evaluations_without_improvement(tmp_path):
    p = _patience(tmp_path / "a", patience=3, min_delta=0.05)
    losses = [3.0, 2.0, 1.97, 2.5, 1.96, 1.90, 2.1]  # 1.97 and 1.96 are within min_delta of 2.0
    decisions = [p.early_stopping_check(metrics={"val_loss": v, "perplexity": math.exp(v)}, step=i) for i, v in enumerate(losses)]
    assert [d.improved for d in decisions] == [True, True, False, False, False, True, False]
    assert [d.stop for d in decisions] == [False, False, False, False, True, False, False]
    assert "val_loss" in decisions[4].reason and "3 evaluations" in decisions[4].reason
    # mode max on another metric
    q = _patience(tmp_path / "b", metric="accuracy", mode="max", patience=1)
    assert q.early_stopping_check(metrics={"accuracy": 0.5}, step=1).improved
    assert q.early_stopping_check(metrics={"accuracy": 0.7}, step=2).improved
    assert q.early_stopping_check(metrics={"accuracy": 0.6}, step=3).stop
    with pytest.raises(UserError, match=r"patience.metric: 'accuracy' is not among the eval metrics \(perplexity, val_loss\)"):
        _patience(tmp_path / "c", metric="accuracy").early_stopping_check(metrics={"val_loss": 1.0, "perplexity": 2.7}, step=1)


def test_patience_state_survives_a_resume(tmp_path):
    seq = [2.0, 1.5, 1.6, 1.7, 1.4, 1.8, 1.9, 2.0]
    whole = _patience(tmp_path / "a", patience=3)
    expected = [whole.early_stopping_check(metrics={"val_loss": v}, step=i) for i, v in enumerate(seq)]
    first = _patience(tmp_path / "b", patience=3)
    for i, v in enumerate(seq[:3]):
        first.early_stopping_check(metrics={"val_loss": v}, step=i)
    state = json.loads(json.dumps(first.plugin_state()))  # what a checkpoint keeps
    resumed = _patience(tmp_path / "c", patience=3)
    resumed.load_plugin_state(state=state)
    got = [resumed.early_stopping_check(metrics={"val_loss": v}, step=i) for i, v in enumerate(seq[3:], 3)]
    assert got == expected[3:]


class CaptureWeights:
    """Keeps the trainable weights the run holds at its end."""

    captured: dict = {}

    @hookimpl
    def on_train_end(self, context, summary):
        model = context.accelerator.unwrap_model(context.model)
        CaptureWeights.captured = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_early_stopping_restores_and_saves_best_lora_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = tiny_recipe(
        tmp_path, early_stopping="patience", patience={"patience": 2}, callbacks=["capture"], scheduler="constant",
        constant={"warmup_steps": 0}, model={"base": str(tiny_model_dir), "config": {}},
        train={"learning_rate": 0.3, "max_steps": 12, "eval_every_steps": 1},  # a rate that makes val_loss turn
        lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, data={"packing": "concat"},
    )
    with inline_plugin("callback", "capture", CaptureWeights):
        summary = run_recipe(recipe)
        val_docs = data_mod.split_documents(recipe_mod.from_dict(recipe, "(test)")).val
    out = tmp_path / "run"
    evals = jsonl(out, "eval")
    best = min(evals, key=lambda e: e["val_loss"])
    assert summary["stopped_early"] and summary["steps"] < 12 and "patience" in summary["stop_reason"]
    assert summary["best_step"] == best["step"] < summary["steps"]
    assert summary["best_val_loss"] == pytest.approx(best["val_loss"])
    assert json.loads((out / "metrics.json").read_text())["best_step"] == best["step"]
    saved_best = load_file(out / "best" / "adapter_model.safetensors")
    saved_final = load_file(out / "final" / "adapter_model.safetensors")
    restored = {k: v for k, v in CaptureWeights.captured.items() if "lora_" in k}
    assert restored and all(not k.startswith("base_model") or "lora_" in k for k in CaptureWeights.captured)

    def key(name):  # peft drops the adapter name when saving
        return name.replace(".default", "")

    for name, value in restored.items():
        torch.testing.assert_close(saved_best[key(name)], value, rtol=0, atol=0)
    assert any(not torch.equal(saved_final[key(n)], v) for n, v in restored.items())  # final/ is the last step's
    # best/ loads with peft and gives the best validation loss again, computed with transformers' own loss
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "best").eval()
    nats, tokens, _ = direct_val_numbers(model, AutoTokenizer.from_pretrained(out / "best"), val_docs, 32)
    assert nats / tokens == pytest.approx(summary["best_val_loss"], rel=1e-5)
    last = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final").eval()
    nats, tokens, _ = direct_val_numbers(last, AutoTokenizer.from_pretrained(out / "final"), val_docs, 32)
    assert nats / tokens == pytest.approx(evals[-1]["val_loss"], rel=1e-5) and nats / tokens > summary["best_val_loss"]


# ------------------------------------------------------------------ wandb
def wandb_records(path):
    """Records of a wandb transaction log (.wandb: LevelDB log framing of wandb's protobuf Record)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """WANDB_MODE=offline with WANDB_DIR in tmp_path. wandb reads its variables once per process (wandb.setup),
    so the session is torn down before (new variables) and after (the service flushes the .wandb file)."""
    import wandb

    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield wandb.teardown


def wandb_run(wandb_dir):
    (path,) = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "*.wandb"))
    records = wandb_records(path)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history[r.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    return run, config, history


def test_wandb_offline_run_holds_recipe_and_metrics_at_their_steps(tmp_path, offline_wandb):
    recipe = tiny_recipe(tmp_path, sinks=["jsonl", "wandb"], wandb={"project": "proj-x", "name": "run-y", "tags": ["a", "b"]},
                         train={"eval_every_steps": 3, "max_steps": 7, "log_every_steps": 2})
    run_recipe(recipe)
    offline_wandb()
    run, config, history = wandb_run(tmp_path)
    assert run.project == "proj-x" and run.display_name == "run-y" and list(run.tags) == ["a", "b"]
    assert config["optimizer"] == "adamw" and config["train"]["max_steps"] == 7 and config["wandb"]["project"] == "proj-x"
    evals = {e["step"]: e["val_loss"] for e in jsonl(tmp_path / "run", "eval")}
    trains = {e["step"]: e["loss"] for e in jsonl(tmp_path / "run", "train")}
    assert sorted(evals) == [3, 6, 7] and sorted(trains) == [2, 4, 6, 7]
    assert {s: h["eval/val_loss"] for s, h in history.items() if "eval/val_loss" in h} == pytest.approx(evals)
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == pytest.approx(trains)
    assert not any(k in h for h in history.values() for k in ("loss", "val_loss"))  # only prefixed names


def test_wandb_project_variable_wins_and_the_summary_reaches_the_run(tmp_path, offline_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    summary = run_recipe(tiny_recipe(tmp_path, sinks=["jsonl", "wandb"], wandb={"project": "from-recipe"}, train={"max_steps": 3}))
    offline_wandb()
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    records = wandb_records(path)
    run, _, _ = wandb_run(tmp_path)
    assert run.project == "from-env"  # WANDB_PROJECT wins over wandb.project
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            logged.update({i.key: json.loads(i.value_json) for i in r.summary.update})
    assert logged["steps"] == summary["steps"] == 3
    assert logged["train_loss"] == pytest.approx(summary["train_loss"]) and logged["val_loss"] == pytest.approx(summary["val_loss"])


def test_wandb_without_a_login_stops_with_exit_2_saying_what_to_do(tmp_path, monkeypatch, capsys):
    import wandb

    from engine import cli

    wandb.teardown()
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb settings: no login
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    recipe = write_recipe(tiny_recipe(tmp_path, sinks=["jsonl", "wandb"], train={"max_steps": 2}), tmp_path / "r.toml")
    try:
        status = cli.main([str(recipe)])
    finally:
        wandb.teardown()
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert "wandb: could not start a run" in err and "WANDB_MODE=offline" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()


def test_wandb_logs_only_on_the_main_process(tmp_path):
    from engine.plugins.wandb_sink import Wandb

    class Context:
        is_main_process = False

    sink = Wandb(Wandb.Options())
    sink.on_train_start(context=Context())  # would need wandb.init (and fail offline without WANDB_MODE) if it logged
    sink.log_metrics(metrics={"loss": 1.0}, step=1, phase="train")
    assert sink.run is None


# ------------------------------------------------------------------ decoding
@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from engine.model import load_trained

    return load_trained(tiny_model_dir)


def _decode(tmp_path, model, tokenizer, decoding, options, prompt="The harbour", **overrides):
    from engine.generate import generate_text, generation_settings

    _, plugins = plugins_of(tmp_path / decoding, decoding=decoding, **{decoding: options})
    return generate_text(model, tokenizer, plugins, prompt, **overrides), generation_settings(plugins, tokenizer)


def _native(model, tokenizer, prompt="The harbour", **kwargs):
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_greedy_is_deterministic_and_equals_transformers_greedy(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    a, settings = _decode(tmp_path, model, tokenizer, "greedy", {"max_new_tokens": 15})
    b, _ = _decode(tmp_path / "again", model, tokenizer, "greedy", {"max_new_tokens": 15})
    assert a == b and len(tokenizer(a)["input_ids"]) >= 10
    assert settings["do_sample"] is False and settings["num_beams"] == 1
    assert a == _native(model, tokenizer, do_sample=False, max_new_tokens=15)


def test_beam_options_reach_generate(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    options = {"num_beams": 3, "length_penalty": -0.5, "no_repeat_ngram_size": 3, "max_new_tokens": 12}
    text, settings = _decode(tmp_path, model, tokenizer, "beam", options)
    assert settings["num_beams"] == 3 and settings["length_penalty"] == -0.5 and settings["do_sample"] is False
    assert text == _native(model, tokenizer, do_sample=False, num_beams=3, length_penalty=-0.5, early_stopping=True,
                           no_repeat_ngram_size=3, max_new_tokens=12)


def test_min_p_adds_transformers_processor_and_matches_native_min_p(tmp_path, tiny_lm):
    from transformers import set_seed
    from transformers.generation.logits_process import MinPLogitsWarper

    model, tokenizer = tiny_lm
    outputs = []
    for seed in range(3):
        set_seed(seed)
        text, settings = _decode(tmp_path / str(seed), model, tokenizer, "min_p", {"min_p": 0.3, "temperature": 0.8, "max_new_tokens": 12})
        set_seed(seed)
        assert text == _native(model, tokenizer, do_sample=True, temperature=0.8, top_k=0, min_p=0.3, max_new_tokens=12)
        set_seed(seed)
        outputs.append((text, _native(model, tokenizer, do_sample=True, temperature=0.8, top_k=0, max_new_tokens=12)))
    assert [type(p) for p in settings["logits_processor"]][-1] is MinPLogitsWarper
    assert settings["logits_processor"][-1].min_p == 0.3
    assert any(ours != plain for ours, plain in outputs)  # the cut changes what is sampled


@pytest.mark.slow
def test_generate_command_takes_strategy_from_recipe_or_arguments(tmp_path, tiny_model_dir, tiny_lm):
    import shutil

    model, tokenizer = tiny_lm
    run = tmp_path / "run"  # a run folder: its recipe says greedy
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "recipe.toml").write_text('decoding = "greedy"\n[greedy]\nmax_new_tokens = 10\n[data]\ntrain = "x.txt"\n')
    result = run_cli("generate", str(run), "--prompt", "The harbour")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.rstrip("\n") == "The harbour" + _native(model, tokenizer, do_sample=False, max_new_tokens=10)
    result = run_cli("generate", str(run), "--prompt", "The harbour", "decoding=beam", "beam.num_beams=2", "beam.max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = _native(model, tokenizer, do_sample=False, num_beams=2, no_repeat_ngram_size=2, early_stopping=True, max_new_tokens=8)
    assert result.stdout.rstrip("\n") == "The harbour" + expected


# ------------------------------------------------------------------ troubleshooting advice
class OomOptimizer:
    """An optimizer whose step runs out of GPU memory."""

    @hookimpl
    def create_optimizer(self, param_groups, learning_rate, device):
        class Failing(torch.optim.SGD):
            def step(self, closure=None):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return Failing(param_groups, lr=learning_rate)


def test_out_of_memory_names_the_recipe_keys_to_change(tmp_path, capsys):
    from engine import cli, tomlfile

    path = tmp_path / "r.toml"
    path.write_text(tomlfile.dumps(tiny_recipe(tmp_path, optimizer="oom")))
    with inline_plugin("optimizer", "oom", OomOptimizer):
        status = cli.main(["train", str(path)])
    err = capsys.readouterr().err
    assert status == 1
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    for key in ("train.batch_size (now 4)", "data.max_length (now 32)", "train.gradient_checkpointing = true", 'optimizer = "adamw8bit"',
                "train.gradient_accumulation_steps"):
        assert key in line
    assert "Tried to allocate 2.00 GiB" in line and "Traceback" not in err


def test_stalled_training_loss_is_flagged_with_advice(tmp_path, capsys):
    run_recipe(tiny_recipe(tmp_path / "stuck", train={"learning_rate": 1e-9, "max_steps": 8}))
    out = capsys.readouterr().out
    (line,) = [l for l in out.splitlines() if "training loss has not moved" in l]
    assert line.startswith("warning:") and "train.learning_rate = 1e-09" in line and "data.train" in line
    run_recipe(tiny_recipe(tmp_path / "moving", train={"learning_rate": 1e-2, "max_steps": 8}))
    assert "has not moved" not in capsys.readouterr().out


def test_loss_watch_waits_for_warmup():
    from engine.advice import LossWatch

    watch = LossWatch(total_steps=100, tolerance=0.01)  # window 5
    lrs = [0.1 * s for s in range(1, 11)] + [1.0] * 90  # warmup ends at step 11 (lr stops rising)
    notes = [watch.update(s, 5.0, lrs[s - 1], 1.0) for s in range(1, 101)]
    flagged = [s for s, n in enumerate(notes, 1) if n]
    assert flagged == [16] and "after warmup ended at step 11" in notes[15]
    watch = LossWatch(total_steps=100)
    assert not any(watch.update(s, 5.0 - 0.1 * s, 1.0, 1.0) for s in range(1, 101))


# ------------------------------------------------------------------ done when
class CaptureAll(CaptureWeights):
    """Keeps every weight of the model the run ends with."""

    @hookimpl
    def on_train_end(self, context, summary):
        model = context.accelerator.unwrap_model(context.model)
        CaptureWeights.captured = {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.slow
def test_done_when_recipe_with_every_kind_of_plugin_on_shakespeare(shared_data, tiny_model_dir, tmp_path, offline_wandb, capsys):
    """word_swap + adamw8bit + cosine + patience + jsonl + wandb (offline) + sampling, on tinyshakespeare:
    stops once the validation loss turns, ends with the best weights (equal to best/), and generates text."""
    from safetensors.torch import load_file

    # small cuts of the files, so that the model overfits (and the validation loss turns) within seconds
    train = tmp_path / "train.txt"
    train.write_text((shared_data / "tinyshakespeare-train.txt").read_text(encoding="utf-8")[:5000], encoding="utf-8")
    val = tmp_path / "val.txt"
    val.write_text((shared_data / "tinyshakespeare-val.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    out = tmp_path / "run"
    overrides = [
        f"model.base={tiny_model_dir}", "model.config={}", f"data.train={train}", f"data.val={val}", "data.max_length=64",
        f"train.output_dir={out}", "train.batch_size=8", "train.max_steps=60", "train.eval_every_steps=3",
        "train.log_every_steps=3", "train.learning_rate=1e-2", "patience.patience=2", 'sinks=["jsonl", "wandb"]',
        'callbacks=["capture_all"]', "train.sample_prompt=ROMEO:", "sampling.max_new_tokens=20",
    ]
    with inline_plugin("callback", "capture_all", CaptureAll):
        recipe = recipe_mod.load(REPO / "recipes" / "shakespeare_plugins.toml", overrides)
        assert [s.name for s in recipe.plugins if s.kind != "callback"] == [
            "word_swap", "adamw8bit", "cosine", "patience", "jsonl", "wandb", "sampling", "text"]
        summary = loop.train(recipe)
    evals = [e["val_loss"] for e in jsonl(out, "eval")]
    best = min(range(len(evals)), key=evals.__getitem__)
    assert summary["stopped_early"] and summary["steps"] < 60
    assert 0 < best < len(evals) - 1 and evals[best] < evals[0]  # it improved, then turned
    assert evals[-1] > evals[best] and summary["best_val_loss"] == pytest.approx(evals[best])
    saved = load_file(out / "best" / "model.safetensors")
    restored = CaptureWeights.captured
    assert saved and all(torch.equal(saved[k], restored[k]) for k in saved)
    final = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(final[k], saved[k]) for k in saved)
    offline_wandb()
    _, _, history = wandb_run(tmp_path)
    assert [h["eval/val_loss"] for _, h in sorted(history.items()) if "eval/val_loss" in h] == pytest.approx(evals)
    sample = capsys.readouterr().out.split("sample: ROMEO:", 1)
    assert len(sample) == 2 and len(sample[1].strip()) > 5


@pytest.mark.slow
def test_patience_stops_every_process_at_the_same_step(tmp_path):
    """Two processes (torchrun, CPU, gloo): evaluation metrics are reduced, so both ranks decide alike."""
    import os
    import subprocess
    import sys

    from engine import tomlfile
    from tests.test_plugins import fake_package

    root = fake_package(tmp_path / "site", "rankpkg", {"callback.rankend": "rankmod:RankEnd"}, {"rankmod": '''
        import json
        from engine import hookimpl

        class RankEnd:
            """Writes where each process stopped."""
            @hookimpl
            def on_train_end(self, context, summary):
                rank, s = context.accelerator.process_index, context.state
                (context.output_dir / f"rank{rank}.json").write_text(json.dumps(
                    {"step": s.step, "best_step": s.best_step, "reason": context.stop_reason}))
    '''})
    recipe = tiny_recipe(tmp_path, early_stopping="patience", patience={"patience": 1}, callbacks=["rankend"],
                         scheduler="constant", constant={"warmup_steps": 0},
                         train={"learning_rate": 0.05, "max_steps": 30, "eval_every_steps": 1, "batch_size": 2})
    path = tmp_path / "r.toml"
    path.write_text(tomlfile.dumps(recipe))
    # ACCELERATE_USE_CPU: on a host without GPUs, Accelerate only forms a CPU (gloo) process group when told to
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "engine", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(root), "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["processes"] == 2 and summary["stopped_early"] and summary["steps"] < 30
    assert ranks[0] == ranks[1] and ranks[0]["step"] == summary["steps"] and "patience" in ranks[0]["reason"]
