"""Recipes: extends, overrides, strict validation with every problem reported at once, `check`."""

import textwrap

import pytest

from engine import recipe as recipe_mod
from engine.errors import UserError
from tests.conftest import run_cli


def write(path, text):
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_extends_deep_merges_and_overrides_take_toml_values(tmp_path):
    write(tmp_path / "base.toml", """
        [data]
        train = "a.txt"
        max_length = 64
        [train]
        epochs = 2
        learning_rate = 1e-3
        [lora]
        target_modules = ["c_attn"]
    """)
    write(tmp_path / "child.toml", """
        extends = "base.toml"
        [train]
        epochs = 5
    """)
    r = recipe_mod.load(tmp_path / "child.toml", ["train.learning_rate=1e-4", 'lora.target_modules=["c_proj", "c_attn"]', "train.output_dir=runs/a"])
    assert r.train.epochs == 5  # child wins
    assert r.data.max_length == 64  # kept from base
    assert r.train.learning_rate == 1e-4  # TOML float from the command line
    assert r.lora.target_modules == ["c_proj", "c_attn"]  # TOML list
    assert r.train.output_dir == "runs/a"  # not TOML: taken as a string
    assert r.train.batch_size == 4  # default


def test_all_problems_reported_together_with_file_key_and_suggestion(tmp_path):
    path = write(tmp_path / "bad.toml", """
        optimizer = "adamww"
        [data]
        train = "a.txt"
        [train]
        learnng_rate = 1e-4
        epochs = "three"
        batch_size = 0
    """)
    with pytest.raises(UserError) as info:
        recipe_mod.load(path)
    lines = info.value.lines
    assert f"{path}: train.learnng_rate: unknown key (did you mean train.learning_rate?)" in lines
    assert f"{path}: train.epochs: expected an integer, got 'three'" in lines
    assert f"{path}: train.batch_size: must be at least 1, got 0" in lines
    assert any(l.startswith(f"{path}: optimizer: unknown plugin 'adamww' (did you mean adamw?)") for l in lines)


@pytest.mark.slow
def test_cli_exit_2_one_message_naming_all_three_problems(tmp_path):
    path = write(tmp_path / "bad.toml", """
        sinks = ["consol"]
        [data]
        train = "a.txt"
        [train]
        epocs = 2
        learning_rate = "fast"
    """)
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    err = result.stderr
    assert "train.epocs: unknown key (did you mean train.epochs?)" in err
    assert "train.learning_rate: expected a number, got 'fast'" in err
    assert "sinks[0]: unknown plugin 'consol' (did you mean console?)" in err
    # Training refuses the same recipe the same way, before any model loads.
    result = run_cli(str(path))
    assert result.returncode == 2 and "train.epocs" in result.stderr and "Traceback" not in result.stderr


def test_error_names_the_file_a_key_came_from(tmp_path):
    write(tmp_path / "base.toml", "[train]\nepochz = 1\n")
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[data]\ntrain = "a.txt"\n')
    with pytest.raises(UserError) as info:
        recipe_mod.load(child, ["lora.rr=3"])
    text = str(info.value)
    assert f"{(tmp_path / 'base.toml').resolve()}: train.epochz: unknown key" in text
    assert "command line: lora.rr: unknown key (did you mean lora.r?)" in text


def test_missing_required_key_and_unknown_top_level_table(tmp_path):
    path = write(tmp_path / "r.toml", "[trian]\nepochs = 1\n")
    with pytest.raises(UserError) as info:
        recipe_mod.load(path)
    text = str(info.value)
    assert "data.train: required option is missing" in text
    assert "trian: unknown key (did you mean train?)" in text


def test_plugin_options_validated_strictly(tmp_path):
    path = write(tmp_path / "r.toml", """
        [data]
        train = "a.txt"
        [cosine]
        warmup_ratio = 1.5
        warmup_stpes = 3
        [adamw]
        beta1 = "x"
    """)
    with pytest.raises(UserError) as info:
        recipe_mod.load(path)
    text = str(info.value)
    assert "cosine.warmup_ratio: must be less than 1.0, got 1.5" in text
    assert "cosine.warmup_stpes: unknown key (did you mean cosine.warmup_steps?)" in text
    assert "adamw.beta1: expected a number, got 'x'" in text


def test_options_for_an_unselected_plugin_are_an_error(tmp_path):
    path = write(tmp_path / "r.toml", '[data]\ntrain = "a.txt"\n[jsonl]\nfilename = "x.jsonl"\n')
    with pytest.raises(UserError) as info:
        recipe_mod.load(path, ['sinks=["console"]'])
    assert "options for plugin 'jsonl', which this recipe does not select" in str(info.value)


def test_invalid_toml_names_line_and_column(tmp_path):
    path = write(tmp_path / "r.toml", "[train]\nepochs = = 3\n")
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert f"{path}: not valid TOML at line 2, column" in result.stderr


def test_extends_loop_is_an_error(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    result = run_cli("check", str(tmp_path / "a.toml"))
    assert result.returncode == 2
    assert "extends loops back to itself" in result.stderr


@pytest.mark.slow
def test_check_prints_resolved_recipe_and_plugins(tmp_path):
    result = run_cli("check", "recipes/quickstart.toml", "train.epochs=1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    from engine import tomlfile

    resolved = tomlfile.loads(out)  # the printed recipe is valid TOML (comments included)
    assert resolved["train"]["epochs"] == 1
    assert resolved["train"]["batch_size"] == 16
    assert resolved["cosine"]["warmup_ratio"] == 0.05
    assert resolved["adamw"]["beta2"] == 0.999  # defaults of plugin options are filled in
    assert "#   optimizer       adamw" in out and "from tunesmith" in out
    assert "#   sinks           console" in out


def test_resolved_recipe_round_trips(tmp_path):
    r = recipe_mod.load("recipes/lora.toml")
    from engine import tomlfile

    again = recipe_mod.from_dict(tomlfile.loads(tomlfile.dumps(r.resolved())), "again")
    assert again.resolved() == r.resolved()
