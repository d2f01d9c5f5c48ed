"""Finding, selecting and registering plugins.

All plugins, built-in or third-party, come from one entry-point group, `tunesmith`. An entry
point's name is "<kind>.<plugin name>" and its value points at the plugin class, e.g.
`"sink.jsonl" = "engine.plugins.jsonl:JsonLines"`. Listing plugins reads names only; a plugin's
module is imported when a recipe selects it (or when `python -m engine plugins` lists summaries).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator

import pluggy

from engine import hookspecs, schema
from engine.errors import UserError

ENTRY_POINT_GROUP = "tunesmith"


@dataclass(frozen=True)
class Kind:
    """A slot a recipe fills: its top-level recipe key, whether it takes a list, its required hook."""

    slot: str
    many: bool
    required_hook: str | None
    default: Any


KINDS: dict[str, Kind] = {
    "augmentation": Kind("augmentations", True, "augment_document", []),
    "optimizer": Kind("optimizer", False, "create_optimizer", "adamw"),
    "scheduler": Kind("scheduler", False, "create_scheduler", "cosine"),
    "early_stopping": Kind("early_stopping", False, "early_stopping_check", ""),
    "sink": Kind("sinks", True, "log_metrics", ["console", "jsonl", "curves"]),
    "decoding": Kind("decoding", False, "generation_kwargs", "sampling"),
    "callback": Kind("callbacks", True, None, []),
    "format": Kind("data.format", False, "format_example", "text"),  # a key inside [data]
}
SLOT_TO_KIND = {k.slot: name for name, k in KINDS.items()}


@dataclass
class PluginInfo:
    """An installed plugin, known by name before its module is imported."""

    kind: str
    name: str
    target: str
    package: str
    version: str
    entry_point: importlib.metadata.EntryPoint | None = None
    cls: type | None = None

    def load(self) -> type:
        if self.cls is None:
            try:
                self.cls = self.entry_point.load()  # type: ignore[union-attr]
            except Exception as exc:  # any import-time failure of somebody else's code
                raise UserError(
                    f"plugin '{self.name}' ({self.kind}) from package {self.package} failed to import "
                    f"({self.target}): {type(exc).__name__}: {exc}. Fix or uninstall {self.package}, "
                    f"or choose another {self.kind}."
                ) from None
        return self.cls

    @property
    def summary(self) -> str:
        doc = (self.load().__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @property
    def options_schema(self) -> type | None:
        return getattr(self.load(), "Options", None)


# Plugins registered from code for the duration of a test (engine.testing.inline_plugin).
_inline: dict[str, PluginInfo] = {}


def register_inline(kind: str, name: str, cls: type, package: str = "(inline)") -> PluginInfo:
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name.partition(".")[2] == name:  # an inline plugin must never silently replace an installed one
            owner = ep.dist.metadata["Name"] if getattr(ep, "dist", None) is not None else "an installed package"
            raise ValueError(f"plugin name {name!r} is taken by the installed plugin {ep.name} from {owner}; "
                             f"give the inline plugin another name")
    info = PluginInfo(kind, name, f"{cls.__module__}:{cls.__qualname__}", package, "", cls=cls)
    _inline[name] = info
    return info


def unregister_inline(name: str) -> None:
    _inline.pop(name, None)


BUILTIN_PACKAGE = "tunesmith"


def discover() -> tuple[dict[str, PluginInfo], dict[str, str]]:
    """Every installed plugin by name, and problems keyed by plugin name (bad entry points, clashes).

    A problem only matters to a recipe that selects that name, so one broken package cannot break
    other recipes. On a clash the built-in keeps the name.
    """
    found: dict[str, PluginInfo] = {}
    problems: dict[str, str] = {}
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "(unknown package)"
        version = dist.version if dist is not None else ""
        kind, _, name = ep.name.partition(".")
        if kind not in KINDS or not name:
            problems[name or ep.name] = (
                f"package {package}: entry point '{ep.name}' in group '{ENTRY_POINT_GROUP}' must be named "
                f"'<kind>.<name>' with kind one of {', '.join(KINDS)}"
            )
            continue
        info = PluginInfo(kind, name, ep.value, package, version, entry_point=ep)
        if name in found and found[name].package != package:
            keep, clash = (info, found[name]) if info.package == BUILTIN_PACKAGE else (found[name], info)
            problems[name] = (
                f"package {clash.package}: plugin name '{name}' clashes with the {keep.kind} '{name}' from "
                f"package {keep.package}; rename the plugin in {clash.package}'s entry points "
                f"(plugin names are unique across kinds)"
            )
            found[name] = keep
            continue
        found[name] = info
    for name, info in _inline.items():
        found[name] = info
    return found, problems


def _required_hook_problem(info: PluginInfo, cls: type) -> str | None:
    hook = KINDS[info.kind].required_hook
    if hook and not callable(getattr(cls, hook, None)):
        return (
            f"plugin '{info.name}' from package {info.package} is a {info.kind} plugin but does not "
            f"implement the hook {hook}()"
        )
    return None


@dataclass
class Selected:
    info: PluginInfo
    options: Any
    instance: Any = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def kind(self) -> str:
        return self.info.kind


@dataclass
class Plugins:
    """The plugins one run uses, registered with a fresh pluggy PluginManager."""

    selected: list[Selected]
    pm: pluggy.PluginManager = field(init=False)

    def __post_init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._callers: dict[tuple[str, str], Any] = {}
        for sel in self.selected:
            cls = sel.info.load()
            where = f"plugin '{sel.name}' from package {sel.info.package}"
            try:
                sel.instance = cls(sel.options) if getattr(cls, "Options", None) is not None else cls()
            except UserError as exc:  # the plugin says what the user should do (a missing extra)
                raise UserError(*(f"{where}: {line}" for line in exc.lines)) from None
            except Exception as exc:  # somebody else's constructor
                raise UserError(f"{where} failed to start: {type(exc).__name__}: {exc}") from None
            try:
                self.pm.register(sel.instance, name=sel.name)
            except pluggy.PluginValidationError as exc:
                raise UserError(f"{where}: {exc}") from None
            hooks = [n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), f"{hookspecs.PROJECT}_spec")]
            unknown = [n for n in dir(type(sel.instance))
                       if n not in hooks and self.pm.parse_hookimpl_opts(sel.instance, n) is not None]
            if unknown:
                raise UserError(*(f"{where}: method {n}() is marked @hookimpl but there is no hook {n}"
                                  f"{schema.did_you_mean(n, hooks)}" for n in unknown))

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def of_kind(self, kind: str) -> list[Selected]:
        return [s for s in self.selected if s.kind == kind]

    def call_one(self, sel: Selected, hook_name: str, **kwargs: Any) -> Any:
        """Call one hook on one plugin only (list slots in recipe order, per-plugin state)."""
        key = (sel.name, hook_name)
        if key not in self._callers:
            others = [s.instance for s in self.selected if s is not sel]
            self._callers[key] = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
        results = self._callers[key](**kwargs)
        return results[0] if results else None

    def implements(self, sel: Selected, hook_name: str) -> bool:
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        return any(impl.plugin is sel.instance for impl in impls)

    def augment(self, text: str, rng: Any, vocabulary: list[str]) -> str:
        for sel in self.of_kind("augmentation"):
            text = self.call_one(sel, "augment_document", text=text, rng=rng, vocabulary=vocabulary)
        return text

    def states(self) -> dict[str, Any]:
        out = {}
        for sel in self.selected:
            if self.implements(sel, "plugin_state"):
                state = self.call_one(sel, "plugin_state")
                if state is not None:
                    out[sel.name] = state
        return out

    def load_states(self, states: dict[str, Any]) -> list[str]:
        """Restore plugin states; returns the names of selected stateful plugins with no saved state."""
        missing = []
        for sel in self.selected:
            if not self.implements(sel, "load_plugin_state"):
                continue
            if sel.name in states:
                self.call_one(sel, "load_plugin_state", state=states[sel.name])
            else:
                missing.append(sel.name)
        return missing

    def __iter__(self) -> Iterator[Selected]:
        return iter(self.selected)


def select(
    slots: dict[str, Any], tables: dict[str, Any], origin_of: Any, inherited: Collection[str] = ()
) -> tuple[list[Selected], list[str]]:
    """Resolve the recipe's slot keys to installed plugins and validate each one's option table.

    slots: slot key -> plugin name or list of names (already type-checked).
    tables: plugin name -> its option table from the recipe (may be missing).
    origin_of: callable giving the file a dotted key came from.
    inherited: names of tables that come only from a recipe this one extends: when their plugin is
    not selected they are dropped silently (a recipe may pick another scheduler than its parent's).
    A table of an unselected plugin is otherwise an error, unless the slot of its kind already has
    one (an unknown plugin name: the first cause is the one reported).
    Returns (selected plugins in slot order, errors).
    """
    from engine import schema

    available, problems = discover()
    errors: list[str] = []
    chosen: list[Selected] = []
    seen: set[str] = set()
    failed_kinds: set[str] = set()  # a slot naming an unknown plugin: its kind's tables say nothing more
    for kind_name, kind in KINDS.items():
        value = slots.get(kind.slot, kind.default)
        names = value if kind.many else ([value] if value else [])
        for i, name in enumerate(names):
            key = f"{kind.slot}[{i}]" if kind.many else kind.slot
            info = available.get(name)
            if name in problems:
                failed_kinds.add(kind_name)
                errors.append(f"{origin_of(kind.slot)}: {key}: {problems[name]}")
                continue
            if info is None or info.kind != kind_name:
                failed_kinds.add(kind_name)
                valid = sorted(n for n, p in available.items() if p.kind == kind_name)
                hint = schema.did_you_mean(name, valid)
                what = f"'{name}' is a {info.kind} plugin, not a {kind_name}" if info else f"unknown plugin '{name}'"
                errors.append(
                    f"{origin_of(kind.slot)}: {key}: {what}{hint} (available: {', '.join(valid) or 'none installed'})"
                )
                continue
            if name in seen:
                errors.append(f"{origin_of(kind.slot)}: {key}: plugin '{name}' is selected twice")
                continue
            seen.add(name)
            try:
                cls = info.load()
            except UserError as exc:
                errors.extend(f"{origin_of(kind.slot)}: {key}: {line}" for line in exc.lines)
                continue
            problem = _required_hook_problem(info, cls)
            if problem:
                errors.append(f"{origin_of(kind.slot)}: {key}: {problem}")
                continue
            options_schema = getattr(cls, "Options", None)
            table = tables.get(name, {})
            if options_schema is None:
                if table:
                    errors.append(f"{origin_of(name)}: {name}: plugin '{name}' takes no options")
                chosen.append(Selected(info, None))
                continue
            if not dataclasses.is_dataclass(options_schema):
                errors.append(f"{origin_of(kind.slot)}: {key}: plugin '{name}' from package {info.package}: its Options is not a dataclass; decorate it with @dataclass")
                continue
            schema_errors = schema.schema_problems(options_schema)
            if schema_errors:
                errors.extend(f"{origin_of(kind.slot)}: {key}: plugin '{name}' from package {info.package}: {p}" for p in schema_errors)
                continue
            options, option_errors = schema.validate(table, options_schema, f"{name}.", origin_of(name))
            if info.package != BUILTIN_PACKAGE:
                option_errors = [f"{e} (an option of plugin '{name}' from package {info.package})" for e in option_errors]
            errors.extend(option_errors)
            chosen.append(Selected(info, options))
    for name in tables:
        if name in seen:
            continue
        info = available.get(name)
        if info is not None and info.kind not in failed_kinds and name not in inherited:
            errors.append(
                f"{origin_of(name)}: {name}: options for plugin '{name}', which this recipe does not select "
                f"(add it to {KINDS[info.kind].slot} or remove the table)"
            )
    return chosen, errors


def resolved_options(sel: Selected) -> dict[str, Any]:
    """The plugin's options as run; an optional option that is not set (None) is left out (TOML has no null)."""
    if sel.options is None:
        return {}
    return {k: v for k, v in dataclasses.asdict(sel.options).items() if v is not None}
