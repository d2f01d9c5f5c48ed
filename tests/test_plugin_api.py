"""The public API plugins use: `engine.__all__`, the run folder rules for a plugin's files, resume."""

import ast
import csv
import json
import os
import signal
import subprocess
import sys

import pytest

import engine
from engine import UserError, hookimpl, inline_plugin, run_recipe, tiny_recipe
from engine.errors import Interrupted
from tests.conftest import REPO

EXAMPLE = REPO / "tests" / "example_plugin" / "tunesmith_example.py"


def test_every_name_in_all_imports_from_engine():
    assert len(set(engine.__all__)) == len(engine.__all__)
    for name in engine.__all__:
        assert getattr(engine, name) is not None, name
        namespace: dict = {}
        exec(f"from engine import {name}", namespace)
        assert namespace[name] is getattr(engine, name)
    assert set(engine.__all__) <= set(dir(engine))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        engine.nope  # noqa: B018


def test_import_engine_loads_neither_torch_nor_transformers():
    """`python -m engine check` stays fast: the public API names torch-heavy things lazily."""
    code = "import sys, engine; print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def engine_imports(path):
    """(how, name) for every import of engine or one of its modules in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "engine":
            found.extend((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((alias.name, "") for alias in node.names if alias.name.split(".")[0] == "engine")
    return found


@pytest.mark.parametrize("path", [EXAMPLE, REPO / "plugins" / "tensorboard_sink.py", REPO / "plugins" / "mlflow_sink.py"],
                         ids=lambda p: p.name)
def test_example_package_and_new_sinks_use_only_the_public_api(path):
    imports = engine_imports(path)
    assert imports, "imports nothing from engine?"
    for module, name in imports:
        assert module == "engine" and name in engine.__all__, f"{path.name}: {module} {name} is not engine's public API"


# ------------------------------------------------------------------ a plugin's files in the run folder
def test_run_file_resolves_inside_the_run_folder_and_refuses_to_leave_it(tmp_path):
    from engine.runfolder import inside

    out = tmp_path / "run"
    assert inside(out, "metrics.csv") == out / "metrics.csv"
    assert inside(out, "tb/./events") == out / "tb" / "events"
    for bad in ("../x.csv", "/etc/passwd", "", ".", "a/../../x"):
        with pytest.raises(UserError, match="inside the run folder|file name inside"):
            inside(out, bad)


class Interrupt:
    """Sends this process SIGTERM after step `at`: the run writes a checkpoint and stops (exit 143)."""

    at = 0

    @hookimpl
    def on_step_end(self, context, metrics):
        if context.state.step == Interrupt.at:
            os.kill(os.getpid(), signal.SIGTERM)


class Resumed:
    """Records what on_train_start sees about a resume."""

    seen: list = []

    @hookimpl
    def on_train_start(self, context):
        Resumed.seen.append((context.resumed, context.resumed_from_step, context.state.step))


def example_module():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import tunesmith_example
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return tunesmith_example


@pytest.mark.slow
def test_readme_csv_example_keeps_its_rows_through_a_resume(tmp_path):
    """The example sink appends on resume: rows before the interruption survive, none is doubled."""
    CsvMetrics = example_module().CsvMetrics
    recipe = tiny_recipe(tmp_path, sinks=["jsonl", "csv_metrics"], callbacks=["interrupt", "resumed"],
                         csv_metrics={"columns": ["loss", "val_loss"]}, train={"max_steps": 8, "eval_every_steps": 4})
    run = tmp_path / "run"
    Resumed.seen = []
    with inline_plugin("sink", "csv_metrics", CsvMetrics), inline_plugin("callback", "interrupt", Interrupt), \
            inline_plugin("callback", "resumed", Resumed):
        Interrupt.at = 5
        with pytest.raises(Interrupted):
            run_recipe(recipe)
        before = list(csv.reader((run / "metrics.csv").open()))
        assert [r[1] for r in before[1:]] == ["1", "2", "3", "4", "4", "5"]  # train 1-4, eval 4, train 5
        Interrupt.at = 0
        run_recipe({**recipe, "train": {**recipe["train"], "resume": "auto"}})
    assert Resumed.seen == [(False, 0, 0), (True, 5, 5)]
    rows = list(csv.reader((run / "metrics.csv").open()))
    assert rows[: len(before)] == before  # what was written before the resume is still there
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [[r["phase"], str(r["step"]), str(r.get("loss", "")), str(r.get("val_loss", ""))]
                for r in jsonl if r["phase"] in ("train", "eval")]
    assert rows == [["phase", "step", "loss", "val_loss"], *expected]
    assert [r[1] for r in rows[1:]] == ["1", "2", "3", "4", "4", "5", "6", "7", "8", "8"]


@pytest.mark.slow
def test_overwrite_removes_files_plugins_wrote_through_run_file(tmp_path):
    class Notes:
        """Writes notes/steps.txt and a bare file."""

        @hookimpl
        def on_train_start(self, context):
            if context.is_main_process:
                folder = context.run_file("notes")
                folder.mkdir()
                (folder / "steps.txt").write_text("hello")
                context.run_file("plain.dat").write_text("x")

    class Escape:
        """Asks for a file outside the run folder."""

        @hookimpl
        def on_train_start(self, context):
            context.run_file("../outside.txt")

    recipe = tiny_recipe(tmp_path, callbacks=["notes"], train={"max_steps": 2})
    run = tmp_path / "run"
    with inline_plugin("callback", "notes", Notes), inline_plugin("callback", "escape", Escape):
        run_recipe(recipe)
        assert (run / "notes" / "steps.txt").exists() and (run / "plain.dat").exists()
        (run / "mine.txt").write_text("a file the user put there")
        run_recipe({**recipe, "callbacks": [], "train": {**recipe["train"], "overwrite": True}})
        assert not (run / "notes").exists() and not (run / "plain.dat").exists()
        assert (run / "mine.txt").read_text() == "a file the user put there"  # not a plugin's: kept
        with pytest.raises(UserError, match="'../outside.txt': a plugin's files go inside the run folder"):
            run_recipe({**recipe, "callbacks": ["escape"], "train": {**recipe["train"], "overwrite": True}})
    assert not (tmp_path / "outside.txt").exists()


# ------------------------------------------------------------------ options: optional and required
def test_optional_and_required_options_are_validated_documented_and_round_trip(tmp_path):
    from dataclasses import dataclass

    from engine import opt, tomlfile
    from engine.recipe import from_dict
    from engine.schema import option_rows

    class Tagger:
        """Has an optional and a required option."""

        @dataclass(kw_only=True)
        class Options:
            weight_decay: float | None = opt(None, "decay; not set: train.weight_decay")
            project: str = opt(help="where to log")
            steps: list[int] = opt([1], "steps")

        def __init__(self, options):
            self.options = options

    def load(**table):
        return from_dict(tiny_recipe(tmp_path, callbacks=["tagger"], tagger=table), "r.toml")

    with inline_plugin("callback", "tagger", Tagger):
        with pytest.raises(UserError) as info:
            load(weight_decay="lots")
        inline = " (an option of plugin 'tagger' from package (inline))"
        assert str(info.value).splitlines() == [
            "r.toml: tagger.weight_decay: expected a number (optional), got 'lots'" + inline,
            "r.toml: tagger.project: required option is missing (where to log)" + inline,
        ]
        recipe = load(project="p")
        assert recipe.plugin("callback").options.weight_decay is None
        assert recipe.resolved()["tagger"] == {"project": "p", "steps": [1]}  # not set: left out of recipe.toml
        assert load(project="p", weight_decay=1).plugin("callback").options.weight_decay == 1.0
        again = from_dict(tomlfile.loads(tomlfile.dumps(recipe.resolved())), "recipe.toml")
        assert again.resolved() == recipe.resolved() and again.plugin("callback").options.weight_decay is None
    assert option_rows(Tagger.Options) == [
        ("weight_decay", "a number (optional)", "(not set)", "decay; not set: train.weight_decay"),
        ("project", "a string", "(required)", "where to log"),
        ("steps", "a list of integers", "[1]", "steps"),
    ]


def test_an_options_class_defaulting_to_none_without_allowing_it_is_the_authors_error(tmp_path):
    from dataclasses import dataclass

    from engine import opt
    from engine.recipe import from_dict

    class Sloppy:
        """weight_decay = None as a sentinel, but typed float."""

        @dataclass
        class Options:
            weight_decay: float = opt(None, "decay")

        def __init__(self, options):
            self.options = options

    with inline_plugin("callback", "sloppy", Sloppy):
        with pytest.raises(UserError, match=r"callbacks\[0\]: plugin 'sloppy' from package \(inline\): option 'weight_decay' "
                                            r"defaults to None but its type a number does not allow it; declare it "
                                            r"`weight_decay: float \| None = opt\(None, ...\)`"):
            from_dict(tiny_recipe(tmp_path, callbacks=["sloppy"]), "r.toml")


# ------------------------------------------------------------------ errors: typos, first cause only
def test_did_you_mean_counts_swapped_letters_as_one_edit():
    from engine.schema import did_you_mean

    assert did_you_mean("cvs", ["curves", "csv", "console"]) == " (did you mean csv?)"
    assert did_you_mean("adamww", ["adamw", "adamw8bit", "sgd"]) == " (did you mean adamw?)"
    assert did_you_mean("learnng_rate", ["learning_rate", "weight_decay"], "train.") == " (did you mean train.learning_rate?)"
    assert did_you_mean("wramup_ratio", ["warmup_ratio", "warmup_steps"]) == " (did you mean warmup_ratio?)"
    assert did_you_mean("zzzz", ["csv", "curves"]) == ""


def test_unknown_plugin_is_reported_once_with_the_swap_suggested(tmp_path):
    from engine.recipe import from_dict

    class Csv:
        """A sink called csv."""

        @hookimpl
        def log_metrics(self, metrics, step, phase):
            pass

    with inline_plugin("sink", "csv", Csv):
        with pytest.raises(UserError) as info:
            from_dict(tiny_recipe(tmp_path, sinks=["jsonl", "cvs"], cvs={"x": 1}), "r.toml")
        (line,) = info.value.lines
        assert line.startswith("r.toml: sinks[1]: unknown plugin 'cvs' (did you mean csv?) (available: ")
    with pytest.raises(UserError) as info:
        from_dict(tiny_recipe(tmp_path, scheduler="cosin", cosine={"warmup_ratio": 0.2}), "r.toml")
    assert info.value.lines == ["r.toml: scheduler: unknown plugin 'cosin' (did you mean cosine?) "
                                "(available: constant, cosine, cosine_restarts, linear)"]


# ------------------------------------------------------------------ extends and plugin tables
def test_extends_drops_an_inherited_table_of_an_unselected_plugin_but_not_the_recipes_own(tmp_path):
    from engine.recipe import load

    (tmp_path / "data.txt").write_text("some text\n")
    (tmp_path / "base.toml").write_text(
        'scheduler = "cosine"\n[data]\ntrain = "data.txt"\n[cosine]\nwarmup_ratio = 0.05\n[patience]\npatience = 2\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nscheduler = "linear"\n')
    recipe = load(tmp_path / "child.toml")
    assert recipe.plugin("scheduler").name == "linear"
    assert "cosine" not in recipe.resolved() and "patience" not in recipe.resolved()

    # the parent's table, still selected: kept, and the child may change one of its options
    (tmp_path / "keeps.toml").write_text('extends = "base.toml"\n[cosine]\nmin_lr_ratio = 0.1\n')
    assert load(tmp_path / "keeps.toml").resolved()["cosine"]["warmup_ratio"] == 0.05

    # the recipe's own table (or one key of it), or the command line's, for an unselected plugin: an error
    with pytest.raises(UserError) as info:
        load(tmp_path / "child.toml", ["cosine.warmup_ratio=0.2"])
    assert info.value.lines == ["command line: cosine: options for plugin 'cosine', which this recipe does not select "
                                "(add it to scheduler or remove the table)"]
    (tmp_path / "own.toml").write_text('extends = "base.toml"\nscheduler = "linear"\n[cosine]\nmin_lr_ratio = 0.1\n')
    with pytest.raises(UserError, match="options for plugin 'cosine', which this recipe does not select"):
        load(tmp_path / "own.toml")


def test_plugins_command_shows_one_plugins_options_defaults_and_package():
    from tests.conftest import run_cli

    result = run_cli("plugins", "cosine")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == 'cosine: a scheduler plugin; select it with  scheduler = "cosine"'
    assert out[1].startswith("package: tunesmith 0.1.0  (engine.plugins.cosine:Cosine)")
    row = next(line.split(None, 3) for line in out if line.strip().startswith("cosine.warmup_ratio"))
    assert row[:3] == ["cosine.warmup_ratio", "a", "number"] and "0.1" in row[3]
    bad = run_cli("plugins", "cvs")
    assert bad.returncode == 2 and bad.stderr.startswith("error: plugins: unknown plugin 'cvs'")
    assert "Traceback" not in bad.stderr


# ------------------------------------------------------------------ the documented contract
class Contract:
    """Records the metric keys and values every hook receives."""

    calls: list = []

    @hookimpl
    def log_metrics(self, metrics, step, phase):
        Contract.calls.append((phase, step, dict(metrics)))

    @hookimpl
    def on_step_end(self, context, metrics):
        Contract.calls.append(("step", context.state.step, dict(metrics)))
        if context.state.step == 5:
            context.request_stop("enough")  # stops between evaluations: the final measurement is sent too

    @hookimpl
    def on_evaluate(self, context, metrics):
        Contract.calls.append(("on_evaluate", context.state.step, dict(metrics)))

    @hookimpl
    def on_train_start(self, context):
        from accelerate.optimizer import AcceleratedOptimizer

        Contract.calls.append(("start", 0, {
            "wrapped": isinstance(context.optimizer, AcceleratedOptimizer),
            "inner": type(context.optimizer.optimizer).__name__, "total_steps": context.total_steps,
            "scheduler_lr": context.scheduler.get_last_lr()[0], "resumed": context.resumed,
        }))


@pytest.mark.slow
def test_the_documented_metric_keys_are_the_keys_sent_and_lr_and_grad_norm_mean_what_they_say(tmp_path):
    from engine.context import METRICS

    Contract.calls = []
    with inline_plugin("sink", "contract", Contract):
        run_recipe(tiny_recipe(tmp_path, sinks=["contract"], scheduler="constant", constant={"warmup_steps": 4},
                               train={"max_steps": 8, "log_every_steps": 2, "eval_every_steps": 4,
                                      "max_grad_norm": 0.01, "learning_rate": 1e-3}))
    seen = {}
    for phase, step, metrics in Contract.calls:
        seen.setdefault(phase, []).append((step, metrics))
    assert seen["start"] == [(0, {"wrapped": True, "inner": "AdamW", "total_steps": 8, "scheduler_lr": 0.0, "resumed": False})]
    assert [s for s, _ in seen["step"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in seen["train"]] == [2, 4]
    assert [s for s, _ in seen["eval"]] == [4, 5] and [s for s, _ in seen["on_evaluate"]] == [4]
    for phase, documented in (("step", "step"), ("train", "train"), ("eval", "eval"), ("on_evaluate", "eval"), ("summary", "summary")):
        for step, metrics in seen[phase]:
            assert set(metrics) == set(METRICS[documented]), (phase, step)
    # lr is the rate after the scheduler stepped: 1/4 of the peak after the first of 4 warmup steps
    assert [m["lr"] for _, m in seen["step"]] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    # grad_norm is measured before clipping to 0.01
    assert all(m["grad_norm"] > 0.05 for _, m in seen["step"])
    # a training log's loss is the mean of the steps' losses since the previous log; on_step_end has the step's
    step_loss = {s: m["loss"] for s, m in seen["step"]}
    assert seen["train"][1][1]["loss"] == pytest.approx((step_loss[3] + step_loss[4]) / 2)
    summary = seen["summary"][0][1]
    assert summary["stopped_early"] is True and summary["stop_reason"] == "enough" and summary["steps"] == 5
