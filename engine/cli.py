"""Command line: `python -m engine [train|check|plugins|generate] ...`.

    python -m engine RECIPE [key=value ...]            train (same as `train RECIPE`)
    python -m engine check RECIPE [key=value ...]      validate, print the resolved recipe and plugins
    python -m engine plugins                           list installed plugins
    python -m engine generate RUN_DIR --prompt TEXT [key=value ...]
    python -m engine bench RECIPE [key=value ...] [--steps N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from engine.errors import RunFailed, UserError

COMMANDS = ("train", "check", "plugins", "generate", "bench")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="Fine-tune causal language models from TOML recipes.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (("train", "train from a recipe"), ("check", "validate a recipe and print it resolved")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("recipe", help="path of a TOML recipe")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides with TOML values")
    sub.add_parser("plugins", help="list installed plugins (built-in and third-party)")
    g = sub.add_parser("generate", help="continue a prompt with a trained run")
    g.add_argument("run_dir", help="a run folder (uses final/), or a model folder")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--model", default="final", help="which model of the run: final (default), best, or a path")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="decoding overrides, e.g. decoding=greedy sampling.temperature=0.9")
    b = sub.add_parser("bench", help="measure tokens/s and peak memory of a recipe for a few steps; writes no run")
    b.add_argument("recipe", help="path of a TOML recipe")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides with TOML values")
    b.add_argument("--steps", type=int, default=20, help="optimizer steps to time (default 20; the first is warm-up)")
    b.add_argument("--json", default=None, help="also write the results as JSON to this path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["train", *argv]  # `python -m engine recipe.toml` trains
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (generate RUN --prompt X sampling.top_k=5)
    for item in extra:
        if "=" in item and not item.startswith("-") and hasattr(args, "overrides"):
            args.overrides.append(item)
        else:
            parser.error(f"unrecognized argument: {item}")
    try:
        if args.command is None:
            _parser().print_help()
            return 0
        if args.command == "check":
            return cmd_check(args.recipe, args.overrides)
        if args.command == "train":
            return cmd_train(args.recipe, args.overrides)
        if args.command == "plugins":
            return cmd_plugins()
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "bench":
            if args.steps < 2:
                raise UserError(f"--steps: {args.steps}; bench needs at least 2 steps (the first is warm-up)")
            from engine import bench

            return bench.main(args.recipe, args.overrides, args.steps, args.json)
    except UserError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_status
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    return 0


def cmd_check(path: str, overrides: list[str]) -> int:
    from engine import recipe as recipe_mod
    from engine import tomlfile

    recipe = recipe_mod.load(path, overrides)
    print(tomlfile.dumps(recipe.resolved()))
    print("# plugins")
    for sel in recipe.plugins:
        print(f"#   {recipe_mod.slot_for(sel.kind):<15} {sel.name:<18} from {sel.info.package} {sel.info.version}".rstrip())
    print(f"# {path}: OK")
    return 0


def cmd_train(path: str, overrides: list[str]) -> int:
    from engine import loop
    from engine import recipe as recipe_mod

    recipe = recipe_mod.load(path, overrides)
    summary = loop.train(recipe)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        out = recipe.train.output_dir
        print(
            f"done: {summary['steps']} steps, val_loss {summary['val_loss']:.4f}, perplexity {summary['perplexity']:.2f}, "
            f"{summary['val_bpc']:.3f} bits/char, {summary['tokens_per_second']:,.0f} tokens/s, "
            f"{summary['wall_seconds']:.1f} s. Model: {out}/final, metrics: {out}/metrics.json"
        )
    return 0


def cmd_plugins() -> int:
    from engine.manager import KINDS, discover

    available, problems = discover()
    rows = []
    for name, info in sorted(available.items(), key=lambda kv: (list(KINDS).index(kv[1].kind), kv[0])):
        try:
            summary = info.summary
        except UserError as exc:
            summary = f"(fails to import: {exc.lines[0]})"
        rows.append((info.kind, name, f"{info.package} {info.version}".strip(), summary))
    widths = [max(len(r[i]) for r in rows + [("kind", "name", "package", "")]) for i in range(3)]
    print(f"{'kind':<{widths[0]}}  {'name':<{widths[1]}}  {'package':<{widths[2]}}  summary")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    for problem in problems.values():
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer, set_seed

    from engine import generate, model as model_mod, recipe as recipe_mod, tomlfile
    from engine.manager import Plugins

    run = Path(args.run_dir)
    model_dir = Path(args.model) if args.model not in ("final", "best") else run / args.model
    is_model_folder = (run / "config.json").exists() or (run / "adapter_config.json").exists()
    if not (run / "recipe.toml").exists() and is_model_folder:
        model_dir = run  # a model folder given directly
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model folder; is '{run}' a finished run?")
    recipe_path = run / "recipe.toml"
    data = tomlfile.loads(recipe_path.read_text(encoding="utf-8")) if recipe_path.exists() else {"data": {"train": "-"}}
    origins: dict[str, str] = {}
    for text in args.overrides:
        parts, value = recipe_mod.parse_override(text)
        if parts == ["decoding"] and data.get("decoding") and data.get("decoding") != value:
            data.pop(data["decoding"], None)  # the old strategy's options do not apply to the new one
    data = recipe_mod.apply_overrides(data, args.overrides, origins)
    recipe = recipe_mod.from_dict(data, str(recipe_path), origins)
    plugins = Plugins([s for s in recipe.plugins if s.kind == "decoding"])
    model, tokenizer = model_mod.load_trained(model_dir)
    if args.seed is not None:
        set_seed(args.seed)
    print(args.prompt, end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate.generate_text(model, tokenizer, plugins, args.prompt, streamer=streamer)
    return 0
