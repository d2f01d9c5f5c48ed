"""The plugin system: entry points, selection, option validation, inline (test) plugins, broken packages."""

import json
import textwrap
from dataclasses import dataclass

import pytest

from engine import hookimpl
from engine.errors import UserError
from engine.schema import opt
from engine.testing import inline_plugin, run_recipe, tiny_recipe
from tests.conftest import fake_package, run_cli


@pytest.mark.slow
def test_plugins_command_lists_builtins_with_package_and_summary():
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["kind", "name", "package", "summary"]
    adamw = next(l for l in lines if " adamw " in l)
    assert adamw.startswith("optimizer") and "tunesmith 0.1.0" in adamw and "AdamW from torch" in adamw
    for kind, name in (("scheduler", "cosine"), ("sink", "console"), ("sink", "jsonl"), ("decoding", "sampling")):
        assert any(l.split()[:2] == [kind, name] for l in lines), name


def test_inline_plugin_is_selected_configured_and_called(tmp_path):
    calls = []

    class Recorder:
        """Records every log call."""

        @dataclass
        class Options:
            tag: str = opt("x", "a tag")

        def __init__(self, options):
            self.options = options

        @hookimpl
        def log_metrics(self, metrics, step, phase):
            calls.append((self.options.tag, phase, step))

        @hookimpl
        def on_train_end(self, context, summary):
            calls.append(("end", summary["steps"]))

    with inline_plugin("sink", "recorder", Recorder):
        run_recipe(tiny_recipe(tmp_path, sinks=["recorder"], recorder={"tag": "t"}))
    assert ("t", "train", 1) in calls and ("t", "eval", 8) in calls and ("t", "summary", 8) in calls
    assert calls[-1] == ("end", 8)
    with pytest.raises(UserError, match="unknown plugin 'recorder'"):
        run_recipe(tiny_recipe(tmp_path / "again", sinks=["recorder"]))  # gone after the with-block


def test_inline_plugin_may_not_shadow_an_installed_one():
    class Impostor:
        """Would replace the built-in early stopping."""

    from engine import manager

    with pytest.raises(ValueError, match="plugin name 'patience' is taken by the installed plugin early_stopping.patience from tunesmith"):
        with inline_plugin("early_stopping", "patience", Impostor):
            pass
    assert manager.discover()[0]["patience"].package == "tunesmith"  # the built-in is still the one selected


def test_wrong_kind_and_missing_hook_are_clear_errors(tmp_path):
    class NotAnOptimizer:
        """Has no create_optimizer."""

    with inline_plugin("optimizer", "hollow", NotAnOptimizer):
        with pytest.raises(UserError) as info:
            run_recipe(tiny_recipe(tmp_path, optimizer="hollow", scheduler="jsonl"))
    text = str(info.value)
    assert "does not implement the hook create_optimizer()" in text
    assert "scheduler: 'jsonl' is a sink plugin, not a scheduler" in text


def test_hookimpl_with_wrong_signature_names_the_plugin(tmp_path):
    class Bad:
        """Wrong argument name."""

        @hookimpl
        def log_metrics(self, metrics, stepp, phase):
            pass

    with inline_plugin("sink", "badsig", Bad):
        with pytest.raises(UserError, match="plugin 'badsig'"):
            run_recipe(tiny_recipe(tmp_path, sinks=["badsig"]))


@pytest.mark.slow
def test_broken_third_party_plugin_breaks_only_recipes_selecting_it(tmp_path):
    root = fake_package(
        tmp_path / "site", "brokenpkg",
        {"sink.broken": "brokenmod:Broken", "sink.console": "brokenmod:Broken"},
        {"brokenmod": "raise RuntimeError('boom at import')\n"},
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text('sinks = ["broken"]\n[data]\ntrain = "a.txt"\n')
    env = {"PYTHONPATH": str(root)}
    result = run_cli("check", str(recipe), env=env)
    assert result.returncode == 2
    assert "plugin 'broken' (sink) from package brokenpkg failed to import" in result.stderr
    assert "boom at import" in result.stderr and "Traceback" not in result.stderr
    # the clash with the built-in console sink is named when a recipe selects that name
    result = run_cli("check", str(recipe), 'sinks=["console"]', env=env)
    assert result.returncode == 2
    assert "package brokenpkg: plugin name 'console' clashes with the sink 'console' from package tunesmith" in result.stderr
    # a recipe that selects neither is unaffected
    result = run_cli("check", str(recipe), 'sinks=["jsonl"]', env=env)
    assert result.returncode == 0, result.stderr
    listing = run_cli("plugins", env=env)
    assert "brokenpkg 1.2.3" in listing.stdout and "fails to import" in listing.stdout


@pytest.mark.slow
def test_third_party_hook_with_wrong_signature_names_its_package(tmp_path):
    root = fake_package(
        tmp_path / "site", "sigpkg", {"sink.badsig": "sigmod:BadSig"},
        {"sigmod": """
            from engine import hookimpl

            class BadSig:
                \"\"\"log_metrics with an argument the hook does not have.\"\"\"
                @hookimpl
                def log_metrics(self, metrics, step, phase, colour):
                    pass
        """},
    )
    recipe = tmp_path / "r.toml"
    out = tmp_path / "run"
    recipe.write_text(f'sinks = ["badsig"]\n[data]\ntrain = "a.txt"\n[train]\noutput_dir = "{out}"\n')
    result = run_cli(str(recipe), env={"PYTHONPATH": str(root)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: plugin 'badsig' from package sigpkg: " in result.stderr and "colour" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_third_party_plugin_from_entry_point_runs(tmp_path):
    root = fake_package(
        tmp_path / "site", "countpkg", {"callback.counter": "countmod:Counter"},
        {"countmod": '''
            import json
            from dataclasses import dataclass
            from engine import hookimpl
            from engine.schema import opt

            class Counter:
                """Counts optimizer steps into a file."""
                @dataclass
                class Options:
                    filename: str = opt("count.json", "where to write")
                def __init__(self, options):
                    self.options, self.steps = options, 0
                @hookimpl
                def on_step_end(self, context, metrics):
                    self.steps += 1
                @hookimpl
                def on_train_end(self, context, summary):
                    (context.output_dir / self.options.filename).write_text(json.dumps({"steps": self.steps}))
        '''},
    )
    from engine import tomlfile

    recipe = tiny_recipe(tmp_path, callbacks=["counter"], counter={"filename": "n.json"})
    path = tmp_path / "r.toml"
    path.write_text(tomlfile.dumps(recipe))
    result = run_cli(str(path), env={"PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "n.json").read_text()) == {"steps": 8}


def test_hookimpl_that_is_no_hook_and_broken_constructor_name_the_package(tmp_path):
    class Typo:
        """A misspelled hook."""

        @hookimpl
        def on_step_ends(self, context, metrics):
            pass

    class Explodes:
        """Fails in __init__."""

        def __init__(self):
            raise RuntimeError("no licence key")

    with inline_plugin("callback", "typo", Typo), inline_plugin("callback", "explodes", Explodes):
        with pytest.raises(UserError) as info:
            run_recipe(tiny_recipe(tmp_path, callbacks=["typo"]))
        assert str(info.value) == (
            "plugin 'typo' from package (inline): method on_step_ends() is marked @hookimpl but there is no hook "
            "on_step_ends (did you mean on_step_end?)"
        )
        with pytest.raises(UserError, match=r"plugin 'explodes' from package \(inline\) failed to start: RuntimeError: no licence key"):
            run_recipe(tiny_recipe(tmp_path / "b", callbacks=["explodes"]))
