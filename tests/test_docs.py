"""The README's generated sections match the code (recipe keys, plugin options, hooks)."""

import inspect

from engine import docs, hookspecs
from tests.conftest import REPO


def test_readme_reference_sections_are_up_to_date():
    current = (REPO / "README.md").read_text(encoding="utf-8")
    assert docs.render(current) == current, "README.md is out of date: run python -m engine.docs"


def test_every_hook_is_documented_in_readme_with_its_signature():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name, sig, _ in docs.hook_signatures():
        assert f"{name}{sig}" in readme, name


def test_every_hook_docstring_says_arguments_return_and_firstresult():
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        opts = getattr(fn, "tunesmith_spec", None)
        if opts is None:
            continue
        doc = inspect.getdoc(fn) or ""
        assert "Returns" in doc, name
        for param in inspect.signature(fn).parameters:
            assert f"{param}:" in doc, f"{name}: argument {param} undocumented"
        if opts.get("firstresult"):
            assert "first non-None result wins" in doc, name


def test_ci_runs_the_readme_test_command():
    import subprocess

    script = (REPO / ".ci" / "run").read_text()
    assert "test-command" in script
    extracted = subprocess.run(
        ["awk", '/<!-- test-command -->/{found=1; next} found && /^```bash/{grab=1; next} grab && /^```/{exit} grab{print}', "README.md"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted.startswith("python3 -m venv .venv") and "pytest" in extracted
