"""Generates the reference sections of the pages in docs/ from the code, so they cannot drift.

    python -m engine.docs          # rewrite the generated sections of every page in PAGES
    python -m engine.docs --check  # exit 1 if a page is out of date (the test suite does this)

Sections: the recipe keys (from engine.recipe's section schemas) in docs/recipe-keys.md, the built-in
plugins with their options (from each plugin's Options) in docs/plugins.md, and the hooks (from
engine.hookspecs) in docs/writing-plugins.md. Each section sits between
`<!-- BEGIN generated:NAME -->` and `<!-- END generated:NAME -->` markers in its page.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from engine import hookspecs, schema
from engine.manager import KINDS, discover
from engine.recipe import SECTIONS

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _table(rows: list[tuple[str, str, str, str]], prefix: str) -> list[str]:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, typ, default, help_text in rows:
        shown = default if default.startswith("(") else f"`{default}`"  # (required), (not set)
        lines.append(f"| `{prefix}{name}` | {typ} | {shown} | {help_text.replace('|', '/')} |")
    return lines


def recipe_reference() -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines.append("| `extends` | a string | | another recipe (path relative to this one) to deep-merge over |")
    for kind_name, kind in KINDS.items():
        typ = "a list of plugin names" if kind.many else "a plugin name"
        default = kind.default if kind.default != "" else ""
        lines.append(f"| `{kind.slot}` | {typ} | `{default}` | the {kind_name.replace('_', ' ')} plugin{'s, in order' if kind.many else ''} |".replace('`[]`', '`[]`').replace("'", '"'))
    for section, section_schema in SECTIONS.items():
        lines.extend(_table(schema.option_rows(section_schema), f"{section}.")[2:])
    lines.append("| `<plugin name>.<option>` | | | options of a selected plugin, e.g. `[cosine] warmup_ratio = 0.05` |")
    return "\n".join(lines)


def plugin_reference() -> str:
    available, _ = discover()
    out: list[str] = []
    for kind_name, kind in KINDS.items():
        builtins = sorted((n, p) for n, p in available.items() if p.kind == kind_name and p.package == "tunesmith")
        for name, info in builtins:
            out.append(f"### `{name}` ({kind_name.replace('_', ' ')}, `{kind.slot}`)")
            out.append("")
            out.append(info.summary)
            out.append("")
            rows = schema.option_rows(info.options_schema) if info.options_schema else []
            if rows:
                out.extend(_table(rows, f"{name}."))
            else:
                out.append("No options.")
            out.append("")
    return "\n".join(out).rstrip()


def hook_signatures() -> list[tuple[str, str, str]]:
    """(name, signature, docstring) of every hook, in file order."""
    hooks = []
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(fn, f"{hookspecs.PROJECT}_spec"):
            sig = str(inspect.signature(fn)).replace("'", "")
            hooks.append((inspect.getsourcelines(fn)[1], name, sig, inspect.getdoc(fn) or ""))
    return [(n, s, d) for _, n, s, d in sorted(hooks)]


def hook_reference() -> str:
    out = []
    for name, sig, doc in hook_signatures():
        out.append(f"```python\n{name}{sig}\n```\n")
        out.append(doc.replace("\n", "  \n") + "\n")
    out.append(context_reference())
    return "\n".join(out).rstrip()


def context_reference() -> str:
    """TrainContext's attributes and methods, and the metric keys of each phase (engine.context)."""
    from engine.context import METRICS, TrainContext

    doc = inspect.getdoc(TrainContext) or ""
    *intro, attributes = doc.split("\n\n")
    items = re.split(r"\n(?=\w+: )", attributes.strip())
    out = ["### TrainContext", "", f"`from engine import TrainContext`. {' '.join(' '.join(intro).split())}", "",
           "| attribute | what it holds |", "| --- | --- |"]
    for item in items:
        name, _, text = item.partition(": ")
        out.append(f"| `context.{name}` | {' '.join(text.split())} |")
    for name in ("request_stop", "run_file", "is_main_process"):
        member = getattr(TrainContext, name)
        text = inspect.getdoc(member.fget if isinstance(member, property) else member) or ""
        call = name if isinstance(member, property) else name + str(inspect.signature(member)).replace("self, ", "").replace("'", "").split(" ->")[0]
        out.append(f"| `context.{call}` | {' '.join(text.split())} |")
    out += ["", "### Metrics by phase", "",
            "The keys each hook's `metrics` holds (`tests/test_plugin_api.py` checks that exactly these are sent):", ""]
    where = {"step": "`on_step_end`, every step", "train": '`log_metrics(phase="train")`',
             "eval": '`log_metrics(phase="eval")` and `on_evaluate`', "summary": '`log_metrics(phase="summary")` and metrics.json'}
    for phase, keys in METRICS.items():
        out += [f"{where[phase]}:", "", "| key | meaning |", "| --- | --- |"]
        out += [f"| `{k}` | {v} |" for k, v in keys.items()] + [""]
    return "\n".join(out)


SECTIONS_BY_NAME = {"recipe": recipe_reference, "plugins": plugin_reference, "hooks": hook_reference}

# the page (relative to the repository) that holds each generated section
PAGES = {"recipe": "docs/recipe-keys.md", "plugins": "docs/plugins.md", "hooks": "docs/writing-plugins.md"}


def render(text: str, names: list[str] | None = None) -> str:
    """`text` with the generated sections `names` (default: all) rewritten between their markers."""
    for name in names if names is not None else list(SECTIONS_BY_NAME):
        make = SECTIONS_BY_NAME[name]
        pattern = re.compile(rf"(<!-- BEGIN generated:{name} -->).*?(<!-- END generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{PAGES[name]} has no generated:{name} markers")
        text = pattern.sub(lambda m: m.group(1) + "\n" + make() + "\n" + m.group(2), text)
    return text


def pages() -> dict[Path, list[str]]:
    """Each page that holds generated sections, with the names of its sections."""
    out: dict[Path, list[str]] = {}
    for name, page in PAGES.items():
        out.setdefault(REPO / page, []).append(name)
    return out


def main(argv: list[str]) -> int:
    stale = []
    for path, names in pages().items():
        current = path.read_text(encoding="utf-8")
        fresh = render(current, names)
        if fresh == current:
            continue
        if "--check" in argv:
            stale.append(path.relative_to(REPO).as_posix())
        else:
            path.write_text(fresh, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)}: run python -m engine.docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
