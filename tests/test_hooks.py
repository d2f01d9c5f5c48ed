"""Every hook specification is called by the engine: one test per hook, named test_hook_<hook>.

One tiny run selects a recording plugin in every slot; each test checks the calls of its hook and
their effect. The meta-test at the end fails when a hook is added to engine/hookspecs.py without a
test here or without its signature in docs/writing-plugins.md.
"""

import random
import re
from contextlib import ExitStack

import pytest
import torch

from engine import docs, hookimpl
from engine.context import EarlyStopDecision
from engine.formats import Segment
from engine.manager import Plugins
from engine.testing import inline_plugin, run_recipe, tiny_recipe
from tests.conftest import REPO

CALLS: dict[str, list[dict]] = {}


def record(hook, **kwargs):
    CALLS.setdefault(hook, []).append(kwargs)


class RecAugment:
    @hookimpl
    def augment_document(self, text, rng, vocabulary):
        record("augment_document", text=text, rng=rng, vocabulary=vocabulary)
        return text.upper()


class CountingSGD(torch.optim.SGD):
    """SGD that counts its steps: shows the engine steps the optimizer the plugin returned."""

    steps = 0

    def step(self, closure=None):
        CountingSGD.steps += 1
        return super().step(closure)


class RecOptimizer:
    @hookimpl
    def create_optimizer(self, param_groups, learning_rate, device):
        optimizer = CountingSGD(param_groups, lr=learning_rate)
        record("create_optimizer", param_groups=param_groups, learning_rate=learning_rate, device=device, result=optimizer)
        return optimizer


class RecScheduler:
    @hookimpl
    def create_scheduler(self, optimizer, total_steps):
        record("create_scheduler", optimizer=optimizer, total_steps=total_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)


class RecEarlyStop:
    @hookimpl
    def early_stopping_check(self, metrics, step):
        record("early_stopping_check", metrics=dict(metrics), step=step)
        return EarlyStopDecision(improved=step in (2, 4), stop=step >= 6, reason="recorded stop")


class RecSink:
    @hookimpl
    def log_metrics(self, metrics, step, phase):
        record("log_metrics", metrics=dict(metrics), step=step, phase=phase)


ONLY_TOKEN = " the"


class RecDecoding:
    @hookimpl
    def generation_kwargs(self, tokenizer):
        record("generation_kwargs", tokenizer=tokenizer)
        keep = tokenizer(ONLY_TOKEN)["input_ids"][-1]  # every other token is suppressed: generate must see this
        return {"do_sample": False, "min_new_tokens": 5, "suppress_tokens": [i for i in range(4 * len(tokenizer)) if i != keep]}  # padded vocabulary ids too

    @hookimpl
    def logits_processors(self, tokenizer):
        def processor(input_ids, scores):
            record("logits_processor_applied", length=input_ids.shape[1], last=int(input_ids[0, -1]))
            return scores

        record("logits_processors", tokenizer=tokenizer)
        return [processor]


class RecFormat:
    @hookimpl
    def prepare_tokenizer(self, tokenizer, data):
        tokenizer.add_tokens(["<|rec|>"], special_tokens=True)
        record("prepare_tokenizer", size=len(tokenizer), text_field=data.text_field)
        return ["<|rec|>"]

    @hookimpl
    def format_example(self, example, data, tokenizer):
        record("format_example", example=dict(example), field=data.text_field)
        first, _, rest = example[data.text_field].partition(" ")
        return [Segment(first + " ", False), Segment(rest, True), Segment(tokenizer.eos_token, True)]

    @hookimpl
    def format_prompt(self, messages, data, tokenizer):
        record("format_prompt", messages=list(messages))
        return "<|rec|>" + messages[-1]["content"]


class RecCallback:
    def __init__(self):
        self.steps = 0

    @hookimpl
    def on_train_start(self, context):
        record("on_train_start", step=context.state.step, total_steps=context.total_steps, main=context.is_main_process)

    @hookimpl
    def on_step_end(self, context, metrics):
        self.steps += 1
        record("on_step_end", step=context.state.step, metrics=dict(metrics))

    @hookimpl
    def on_evaluate(self, context, metrics):
        record("on_evaluate", step=context.state.step, metrics=dict(metrics))

    @hookimpl
    def on_train_end(self, context, summary):
        record("on_train_end", summary=dict(summary), final_written=(context.output_dir / "final").is_dir())

    @hookimpl
    def plugin_state(self):
        record("plugin_state")
        return {"steps": self.steps}

    @hookimpl
    def load_plugin_state(self, state):
        record("load_plugin_state", state=state)
        self.steps = state["steps"]


PLUGINS = [
    ("augmentation", "rec_augment", RecAugment), ("optimizer", "rec_optimizer", RecOptimizer),
    ("scheduler", "rec_scheduler", RecScheduler), ("early_stopping", "rec_stop", RecEarlyStop),
    ("sink", "rec_sink", RecSink), ("decoding", "rec_decoding", RecDecoding), ("callback", "rec_callback", RecCallback),
    ("format", "rec_format", RecFormat),
]


def _recipe(folder):
    return tiny_recipe(
        folder, augmentations=["rec_augment"], optimizer="rec_optimizer", scheduler="rec_scheduler",
        early_stopping="rec_stop", sinks=["rec_sink"], decoding="rec_decoding", callbacks=["rec_callback"],
        data={"format": "rec_format"},
        train={"max_steps": 8, "eval_every_steps": 2, "learning_rate": 0.2, "sample_prompt": "The boat",
               "sample_max_new_tokens": 5, "log_every_steps": 1, "save_every_steps": 2, "keep_checkpoints": 3},
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hooks")
    CALLS.clear()
    CountingSGD.steps = 0
    with ExitStack() as stack:
        for kind, name, cls in PLUGINS:
            stack.enter_context(inline_plugin(kind, name, cls))
        summary = run_recipe(_recipe(folder))
    return {"summary": summary, "folder": folder, "calls": {k: list(v) for k, v in CALLS.items()}, "optimizer_steps": CountingSGD.steps}


def test_hook_augment_document(run):
    calls = run["calls"]["augment_document"]
    corpus = (run["folder"] / "corpus.txt").read_text()
    documents = [d for d in corpus.split("\n\n") if d.strip()]
    assert len(calls) == len(documents) - round(len(documents) * 0.1)  # every training document, no validation one
    assert all(c["text"] in corpus and isinstance(c["rng"], random.Random) for c in calls)
    assert calls[0]["vocabulary"] == sorted(set(calls[0]["vocabulary"])) and "harbour" in calls[0]["vocabulary"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run["folder"] / "run" / "final")
    assert any(re.search("[A-Z]{2}", token) for token in tokenizer.get_vocab())  # learned from the upper-case copies
    assert not re.search("[A-Z]{2}", corpus)


def test_hook_create_optimizer(run):
    (call,) = run["calls"]["create_optimizer"]
    assert call["learning_rate"] == 0.2 and call["device"].type == "cpu"
    assert [g["weight_decay"] for g in call["param_groups"]] == [0.01, 0.0]
    assert isinstance(call["result"], CountingSGD) and run["optimizer_steps"] == run["summary"]["steps"] == 6  # it stepped this one


def test_hook_create_scheduler(run):
    (call,) = run["calls"]["create_scheduler"]
    assert call["total_steps"] == 8 and call["optimizer"] is run["calls"]["create_optimizer"][0]["result"]
    assert {m["metrics"]["lr"] for m in run["calls"]["on_step_end"]} == {0.1}  # the plugin's schedule: 0.5 x 0.2


def test_hook_early_stopping_check(run):
    calls = run["calls"]["early_stopping_check"]
    assert [c["step"] for c in calls] == [2, 4, 6] and all("val_loss" in c["metrics"] for c in calls)
    summary = run["summary"]
    assert summary["steps"] == 6 and summary["stopped_early"] and summary["stop_reason"] == "recorded stop"
    assert summary["best_step"] == 4 and (run["folder"] / "run" / "best" / "model.safetensors").exists()


def test_hook_prepare_tokenizer(run):
    (call,) = run["calls"]["prepare_tokenizer"]
    from transformers import AutoConfig, AutoTokenizer

    final = run["folder"] / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert call["text_field"] == "text" and len(tokenizer) == call["size"] and "<|rec|>" in tokenizer.get_vocab()
    assert AutoConfig.from_pretrained(final).vocab_size >= call["size"]  # the model was built with room for it


def test_hook_format_example(run):
    calls = run["calls"]["format_example"]
    corpus = (run["folder"] / "corpus.txt").read_text()
    documents = [d for d in corpus.split("\n\n") if d.strip()]
    assert len(calls) == len(documents) * 2 - round(len(documents) * 0.1)  # training (and their augmented copies) and validation
    assert all(set(c["example"]) == {"text"} and c["field"] == "text" for c in calls)
    # the first word of every document is no target: fewer tokens trained on than the blocks hold
    steps = [c["metrics"]["tokens_seen"] for c in run["calls"]["on_step_end"]]
    assert steps[0] < 4 * 32 - 4


def test_hook_format_prompt(run):
    (call,) = run["calls"]["format_prompt"]
    assert call["messages"] == [{"role": "user", "content": "The boat"}]


def test_hook_log_metrics(run):
    calls = run["calls"]["log_metrics"]
    assert [c["step"] for c in calls if c["phase"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [c["step"] for c in calls if c["phase"] == "eval"] == [2, 4, 6]
    assert calls[-1]["phase"] == "summary" and calls[-1]["metrics"]["steps"] == 6


def test_hook_generation_kwargs(run):
    (call,) = run["calls"]["generation_kwargs"]
    assert call["tokenizer"].eos_token == "<|endoftext|>"
    # the kwargs reached generate: min_new_tokens 5 and only ONLY_TOKEN allowed
    applied = run["calls"]["logits_processor_applied"]
    assert len(applied) == 5
    assert {c["last"] for c in applied[1:]} == {call["tokenizer"](ONLY_TOKEN)["input_ids"][-1]}


def test_hook_logits_processors(run):
    assert len(run["calls"]["logits_processors"]) == 1
    applied = run["calls"]["logits_processor_applied"]
    assert [c["length"] for c in applied] == list(range(applied[0]["length"], applied[0]["length"] + 5))  # once per new token


def test_hook_on_train_start(run):
    assert run["calls"]["on_train_start"] == [{"step": 0, "total_steps": 8, "main": True}]


def test_hook_on_step_end(run):
    calls = run["calls"]["on_step_end"]
    assert [c["step"] for c in calls] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "grad_norm", "tokens_seen"} <= c["metrics"].keys() for c in calls)


def test_hook_on_evaluate(run):
    calls = run["calls"]["on_evaluate"]
    assert [c["step"] for c in calls] == [2, 4, 6]
    assert all({"val_loss", "perplexity", "val_bpc", "val_tokens"} <= c["metrics"].keys() for c in calls)


def test_hook_on_train_end(run):
    (call,) = run["calls"]["on_train_end"]
    assert call["final_written"] and call["summary"] == run["summary"]


def test_hook_log_samples(tmp_path):
    """Sample generations at each evaluation reach the sinks, as written to samples.jsonl."""
    import json

    got = []

    class RecSamples:
        @hookimpl
        def log_metrics(self, metrics, step, phase):
            pass

        @hookimpl
        def log_samples(self, samples, step):
            got.append((step, [dict(s) for s in samples]))

    with inline_plugin("sink", "rec_samples", RecSamples):
        run_recipe(tiny_recipe(tmp_path, sinks=["rec_samples"], train={
            "max_steps": 4, "eval_every_steps": 2, "sample_prompts": ["The boat", "A sea"], "sample_max_new_tokens": 4}))
    assert [step for step, _ in got] == [2, 4]
    assert all([s["prompt"] for s in samples] == ["The boat", "A sea"] for _, samples in got)
    written = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert written == [s for _, samples in got for s in samples]


def test_hook_plugin_state(run):
    """What a checkpoint keeps of each plugin: the plugins file of each real checkpoint."""
    from engine import checkpoint

    saved = {}
    for step in (2, 4, 6):
        folder = run["folder"] / "run" / "checkpoints" / checkpoint.name_for(step)
        saved[step] = torch.load(folder / checkpoint.PLUGINS_FILE, weights_only=True)["rec_callback"]
    assert saved == {2: {"steps": 2}, 4: {"steps": 4}, 6: {"steps": 6}}


class Counter(RecCallback):
    """RecCallback's state without the recording, for a run of its own."""

    @hookimpl
    def on_train_end(self, context, summary):
        Counter.final = self.steps


def test_hook_load_plugin_state(tmp_path, capsys):
    """A resumed run hands each plugin its saved state; a stateful plugin with nothing saved is named in a warning."""
    recipe = tiny_recipe(tmp_path, callbacks=["counter"], train={"max_steps": 4, "save_every_steps": 2})
    with inline_plugin("callback", "counter", Counter):
        run_recipe(recipe)
        assert Counter.final == 4
        resumed = {**recipe, "train": {**recipe["train"], "max_steps": 6, "resume": "auto"}}
        run_recipe(resumed)
        assert Counter.final == 6  # 4 from the checkpoint, 2 more: not 2
        bare = tiny_recipe(tmp_path / "bare", train={"max_steps": 4, "save_every_steps": 2})
        run_recipe(bare)  # a checkpoint without the counter's state
        capsys.readouterr()
        run_recipe({**bare, "callbacks": ["counter"], "train": {**bare["train"], "max_steps": 6, "resume": "auto"}})
        assert Counter.final == 2
    assert "plugin 'counter' has no state in" in capsys.readouterr().err


def test_every_hook_has_a_test_here_and_its_signature_in_the_docs():
    readme = (REPO / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    hooks = docs.hook_signatures()
    assert len(hooks) >= 13
    for name, signature, _ in hooks:
        assert callable(globals().get(f"test_hook_{name}")), f"hook {name} has no test_hook_{name} in tests/test_hooks.py"
        assert f"{name}{signature}" in readme, f"hook {name} is not in docs/writing-plugins.md: run python -m engine.docs"
