"""The suite's own rules: missing shared data fails under any truthy CI value; markers are registered."""

import pytest

from tests.conftest import in_ci


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("1", True), ("yes", True), ("True", True), ("github", True),
    ("", False), ("0", False), ("false", False), ("no", False),
])
def test_ci_accepts_any_truthy_value(monkeypatch, value, expected):
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_ci_unset_is_not_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert not in_ci()


def test_slow_and_gpu_markers_are_registered(pytestconfig):
    names = [line.split(":")[0] for line in pytestconfig.getini("markers")]
    assert "slow" in names and "gpu" in names
