"""Known third-party warnings stay off the screen and go to the run's warnings.log; nothing else is hidden."""

import subprocess
import sys

import pytest

from engine import quiet
from engine.testing import tiny_recipe, write_recipe
from tests.conftest import REPO, run_cli

# every message filtered, as the libraries print it (the test fails when NOISE changes without this list)
FILTERED = {
    ("bitsandbytes", "logging", "bitsandbytes.backends.cpu.ops"):
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure you "
        "already `pip install kernels` and the kernels >= 0.11.1",
    ("peft", "warnings", "UserWarning"):
        "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
    ("transformers", "warnings", "FutureWarning"):
        "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead.",
}


def test_the_filtered_warnings_are_exactly_these():
    assert {(n.library, n.channel, n.source) for n in quiet.NOISE} == set(FILTERED)
    for (library, channel, source), message in FILTERED.items():
        assert quiet.matches(channel, source, message).library == library
        assert quiet.matches(channel, source, "something else: " + message) is None  # only the known message
    assert quiet.matches("warnings", "UserWarning", "data.train: your file is odd") is None


EMIT = """
import logging, sys, warnings
from pathlib import Path
from engine import quiet
quiet.install()
warnings.simplefilter("always")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning({bnb!r})
warnings.warn({peft!r}, UserWarning)
quiet.keep_in(Path(sys.argv[1]))
warnings.warn({tf!r}, FutureWarning)
warnings.warn("a warning nobody handled", UserWarning)
logging.getLogger("bitsandbytes.other").warning("another library line")
"""


def test_filtered_messages_go_to_the_log_file_and_others_stay_on_screen(tmp_path):
    msgs = list(FILTERED.values())
    code = EMIT.format(bnb=msgs[0], peft=msgs[1], tf=msgs[2])
    log = tmp_path / "warnings.log"
    result = subprocess.run([sys.executable, "-c", code, str(log)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for message in msgs:
        assert message not in result.stderr
        assert message in log.read_text()
    assert "a warning nobody handled" in result.stderr and "another library line" in result.stderr
    quiet_run = subprocess.run([sys.executable, "-c", "from engine import quiet; quiet.install(); quiet.keep_in(__import__('pathlib').Path(r'%s'))" % (tmp_path / "none.log")],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    assert quiet_run.returncode == 0 and not (tmp_path / "none.log").exists()  # nothing diverted: no file
    shown = subprocess.run([sys.executable, "-c", code, str(log)], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "TUNESMITH_SHOW_LIBRARY_WARNINGS": "1"})
    assert all(message in shown.stderr for message in msgs)


@pytest.mark.slow
def test_a_lora_run_prints_no_library_warning(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["model"] = {"base": str(tiny_model_dir)}
    recipe["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    recipe["train"]["max_steps"] = 2
    result = run_cli(str(write_recipe(recipe, tmp_path / "r.toml")))
    assert result.returncode == 0, result.stderr
    screen = result.stdout + result.stderr
    assert "Warning" not in screen and "warnings.warn" not in screen and "fan_in_fan_out" not in screen
    assert "fan_in_fan_out is set to False" in (tmp_path / "run" / "warnings.log").read_text()
