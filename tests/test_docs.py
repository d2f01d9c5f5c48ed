"""The generated sections of docs/ match the code (recipe keys, plugin options, hooks); the README
guides the first hour and links every docs page."""

import inspect
import re

from engine import docs, hookspecs
from tests.conftest import REPO


def test_docs_reference_sections_are_up_to_date():
    pages = docs.pages()
    assert {name for names in pages.values() for name in names} == set(docs.SECTIONS_BY_NAME)
    for path, names in pages.items():
        current = path.read_text(encoding="utf-8")
        assert docs.render(current, names) == current, f"{path.name} is out of date: run python -m engine.docs"
    assert docs.main(["--check"]) == 0


def test_docs_check_names_a_stale_page(tmp_path, monkeypatch, capsys):
    page = tmp_path / "docs" / "plugins.md"
    page.parent.mkdir()
    page.write_text("# Plugins\n\n<!-- BEGIN generated:plugins -->\nold\n<!-- END generated:plugins -->\n")
    monkeypatch.setattr(docs, "REPO", tmp_path)
    monkeypatch.setattr(docs, "PAGES", {"plugins": "docs/plugins.md"})
    assert docs.main(["--check"]) == 1
    assert "docs/plugins.md" in capsys.readouterr().err
    assert docs.main([]) == 0 and "### `adamw` (optimizer, `optimizer`)" in page.read_text()
    assert docs.main(["--check"]) == 0


def test_every_hook_is_documented_in_writing_plugins_with_its_signature():
    page = (REPO / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    for name, sig, _ in docs.hook_signatures():
        assert f"{name}{sig}" in page, name


def test_readme_links_every_docs_page_and_stays_short():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 300
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme))
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert len(pages) >= 10 and pages <= linked, f"README.md does not link {sorted(pages - linked)}"
    assert linked <= pages, f"README.md links missing pages {sorted(linked - pages)}"


def test_links_between_pages_resolve():
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s:]+\.(?:md|png))(?:#[\w-]+)?\)", text):
            assert (page.parent / target).is_file(), f"{page.name} links {target}, which does not exist"


def test_readme_command_table_has_no_broken_rows():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("| command | what it does |", 1)[1].split("\n\n", 1)[0]
    commands = [row for row in table.splitlines() if row.startswith("| `python -m engine")]
    for name in ("check", "plugins", "generate", "eval", "merge", "runs", "bench", "push"):
        assert any(row.startswith(f"| `python -m engine {name}") for row in commands), name


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
