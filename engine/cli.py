"""Command line: `python -m engine [train|check|plugins|generate] ...`.

    python -m engine                                   train with engine.CONFIG on ./data/*.txt (the original design)
    python -m engine RECIPE [key=value ...]            train (same as `train RECIPE`)
    python -m engine check RECIPE [key=value ...]      validate, print the resolved recipe and plugins
    python -m engine plugins [NAME]                    list installed plugins, or one plugin's options
    python -m engine generate RUN_DIR --prompt TEXT [--raw] [key=value ...]
    python -m engine chat RUN_DIR [key=value ...]          one user turn per line of stdin (works in a pipe)
    python -m engine eval RUN_DIR|MODEL_DIR --data PATH [--json]   loss, perplexity, bits/char of a text
    python -m engine merge RUN_DIR OUT_DIR [--dtype D]        LoRA adapter + base -> standalone model
    python -m engine runs DIR... [--plot FILE.png]            finished runs side by side
    python -m engine bench RECIPE [key=value ...] [--steps N] [--json PATH]
    python -m engine push RUN_DIR|MODEL_DIR --repo-id USER/NAME [--private] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from engine.errors import Interrupted, RunFailed, UserError

COMMANDS = ("train", "check", "plugins", "generate", "chat", "eval", "merge", "runs", "bench", "push")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="Fine-tune causal language models from TOML recipes.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (("train", "train from a recipe"), ("check", "validate a recipe and print it resolved")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("recipe", help="path of a TOML recipe")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides with TOML values")
    pl = sub.add_parser("plugins", help="list installed plugins (built-in and third-party), or show one plugin's options")
    pl.add_argument("name", nargs="?", default=None, help="a plugin name: show its options, defaults and package")
    g = sub.add_parser("generate", help="continue a prompt with a trained run")
    g.add_argument("run_dir", help="a run folder (uses final/), or a model folder")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--model", default="final", help="which model of the run: final (default), best, or a path")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--raw", action="store_true", help="continue the prompt as plain text, without the run's data.format (chat template, prompt layout)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="decoding overrides, e.g. decoding=greedy sampling.temperature=0.9")
    c = sub.add_parser("chat", help="talk with a run trained on chats or prompt/completion pairs (one message per line of stdin)")
    c.add_argument("run_dir", help="a run folder (uses final/)")
    c.add_argument("--model", default="final", help="which model of the run: final (default), best, or a path")
    c.add_argument("--seed", type=int, default=None, help="seed for sampling")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="decoding overrides, e.g. decoding=greedy")
    e = sub.add_parser("eval", help="loss, perplexity and bits per character of a model on a text file or dataset")
    e.add_argument("model", metavar="RUN_DIR|MODEL_DIR", help="a run folder (uses final/), or a model or adapter folder (final/, best/, a checkpoint)")
    e.add_argument("--data", required=True, help="a text file, glob, folder or datasets name (as data.train takes)")
    e.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    e.add_argument("--max-length", type=int, default=0, help="tokens per block (default: the run's data.max_length, else the model's context up to 1024)")
    e.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (default 8)")
    e.add_argument("--generate", type=int, default=0, metavar="N", help="also generate answers to the first N examples and report exact-match accuracy (runs trained with an instruction format)")
    m = sub.add_parser("merge", help="merge a run's LoRA adapter into its base model and save a standalone model")
    m.add_argument("run_dir", help="a LoRA run folder (uses final/), or an adapter folder")
    m.add_argument("out_dir", help="a new or empty folder for the merged model")
    m.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="dtype of the merged weights (a quantized base is dequantized to it; default fp32)")
    r = sub.add_parser("runs", help="compare finished runs: key metrics and the recipe keys that differ")
    r.add_argument("run_dirs", nargs="+", metavar="DIR", help="run folders (each with metrics.json)")
    r.add_argument("--plot", metavar="FILE.png", help="also draw their validation loss curves into this PNG file")
    b = sub.add_parser("bench", help="measure tokens/s and peak memory of a recipe for a few steps; writes no run")
    b.add_argument("recipe", help="path of a TOML recipe")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides with TOML values")
    b.add_argument("--steps", type=int, default=20, help="optimizer steps to time (default 20; the first is warm-up)")
    b.add_argument("--json", default=None, help="also write the results as JSON to this path")
    u = sub.add_parser("push", help="upload a run's model (final/, with its model card) to the Hugging Face Hub")
    u.add_argument("run_dir", help="a run folder (uploads final/), or a model folder (best/, merge's output)")
    u.add_argument("--repo-id", required=True, help="the hub repository, user/model-name (created if missing)")
    u.add_argument("--private", action="store_true", help="create the repository private")
    u.add_argument("--dry-run", action="store_true", help="list the folder and files that would be uploaded; send nothing")
    return p


def quiet_progress_bars_off_terminal() -> None:
    """Progress bars of the Hugging Face libraries (downloads, dataset building, shard loading) and any
    other tqdm bar are carriage-return garbage in a log file: turn them off when stderr is not a terminal."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_progress_bars_off_terminal()
    from engine import quiet

    quiet.install()  # known third-party warnings the engine has dealt with: off the screen, into the run's warnings.log
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
            return cmd_default()
        if args.command == "check":
            return cmd_check(args.recipe, args.overrides)
        if args.command == "train":
            return cmd_train(args.recipe, args.overrides)
        if args.command == "plugins":
            return cmd_plugins(args.name)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "merge":
            return cmd_merge(args)
        if args.command == "runs":
            return cmd_runs(args)
        if args.command == "bench":
            if args.steps < 2:
                raise UserError(f"--steps: {args.steps}; bench needs at least 2 steps (the first is warm-up)")
            from engine import bench

            return bench.main(args.recipe, args.overrides, args.steps, args.json)
        if args.command == "push":
            from engine import push

            print(push.push(args.run_dir, args.repo_id, args.private, args.dry_run))
    except UserError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_status
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except Interrupted as exc:  # SIGTERM: 143, Ctrl-C: 130, after writing a checkpoint
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        print("interrupted: stopped at once by a second Ctrl-C; no checkpoint written for the current step", file=sys.stderr)
        return 130
    return 0


def cmd_default() -> int:
    """`python -m engine` alone: what the original `python language_model.py` did, with engine.CONFIG."""
    from engine.api import CONFIG, LanguageModelTrainer, check_data_dir

    print(
        f"No recipe given: training like the original language_model.py with engine.CONFIG: base model "
        f"{CONFIG['base_model']}, training text = the .txt files in ./{CONFIG['data_dir']}/, results in "
        f"./{CONFIG['model_dir']}/final_model/. For recipes and other commands: python -m engine --help",
        flush=True,
    )
    check_data_dir(CONFIG["data_dir"])
    summary = LanguageModelTrainer().train()
    print(f"done: {summary['steps']} steps, val_loss {summary['val_loss']:.4f}, perplexity {summary['perplexity']:.2f}. "
          f"Model: {CONFIG['model_dir']}/final_model")
    return 0


def cmd_check(path: str, overrides: list[str]) -> int:
    from engine import recipe as recipe_mod
    from engine import tomlfile

    from engine import runfolder

    recipe = recipe_mod.load(path, overrides)
    runfolder.check_can_write(recipe)
    print(tomlfile.dumps(recipe.resolved()))
    print("# plugins")
    for sel in recipe.plugins:
        print(f"#   {recipe_mod.slot_for(sel.kind):<15} {sel.name:<18} from {sel.info.package} {sel.info.version}".rstrip())
    print(f"# {path}: OK")
    return 0


def cmd_train(path: str, overrides: list[str]) -> int:
    from engine import loop
    from engine import recipe as recipe_mod
    from engine.advice import explain_out_of_memory

    recipe = recipe_mod.load(path, overrides)
    with explain_out_of_memory(recipe):
        summary = loop.train(recipe)
    if os.environ.get("RANK", "0") == "0":  # the main process of the whole run prints the summary
        from engine.report import summary_table

        print("\n" + summary_table(summary, Path(recipe.train.output_dir), recipe.train.final_dir))
    return 0


def cmd_plugins(name: str | None = None) -> int:
    from engine.manager import KINDS, discover

    available, problems = discover()
    if name is not None:
        return show_plugin(name, available, problems)
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


def show_plugin(name: str, available: dict, problems: dict[str, str]) -> int:
    """`python -m engine plugins NAME`: what the plugin is, where it comes from, its options table."""
    import inspect

    from engine import schema
    from engine.manager import KINDS

    if name in problems and name not in available:
        raise UserError(problems[name])
    info = available.get(name)
    if info is None:
        raise UserError(f"plugins: unknown plugin '{name}'{schema.did_you_mean(name, available)}; python -m engine plugins lists them")
    cls = info.load()
    kind = KINDS[info.kind]
    select = f'{kind.slot} = ["{name}"]' if kind.many else f'{kind.slot} = "{name}"'
    lines = [f"{name}: a {info.kind.replace('_', ' ')} plugin; select it with  {select}",
             f"package: {info.package} {info.version}".rstrip() + f"  ({info.target})", ""]
    doc = inspect.cleandoc(cls.__doc__ or "").strip()
    lines += [doc, ""] if doc else []
    options = getattr(cls, "Options", None)
    if options is None:
        lines.append("No options.")
    else:
        rows = [(f"{name}.{n}", t, d, h) for n, t, d, h in schema.option_rows(options)]
        header = ("option", "type", "default", "meaning")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
        lines.append(f"options (a [{name}] table in the recipe, or {name}.OPTION=VALUE on the command line):")
        for r in [header, *rows]:
            lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip())
    if name in problems:
        lines.append(f"warning: {problems[name]}")
    print("\n".join(lines))
    return 0


def _load_for_generation(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(model, tokenizer, plugins, data section or None) of a run (or model folder) for generate and chat."""
    from engine import from_checkpoint, recipe as recipe_mod, tomlfile
    from engine.manager import Plugins

    run = Path(args.run_dir)
    recipe_path = run / "recipe.toml"
    data = tomlfile.loads(recipe_path.read_text(encoding="utf-8")) if recipe_path.exists() else {"data": {"train": "-"}}
    final_dir = data.get("train", {}).get("final_dir", "final")
    model_dir = Path(args.model) if args.model not in ("final", "best") else run / (final_dir if args.model == "final" else "best")
    is_model_folder = (run / "config.json").exists() or (run / "adapter_config.json").exists() or (run / "weights.safetensors").exists()
    if not recipe_path.exists() and is_model_folder:
        model_dir = run  # a model folder given directly
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model folder; is '{run}' a finished run?")
    origins: dict[str, str] = {}
    for text in args.overrides:
        parts, value = recipe_mod.parse_override(text)
        if parts == ["decoding"] and data.get("decoding") and data.get("decoding") != value:
            data.pop(data["decoding"], None)  # the old strategy's options do not apply to the new one
    data = recipe_mod.apply_overrides(data, args.overrides, origins)
    recipe = recipe_mod.from_dict(data, str(recipe_path), origins)
    formatted = recipe_path.exists() and not getattr(args, "raw", False)
    plugins = Plugins([s for s in recipe.plugins if s.kind == "decoding" or (formatted and s.kind == "format")])
    model, tokenizer, _ = from_checkpoint.load_any(model_dir)  # a model, an adapter or a checkpoint
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    return model, tokenizer, plugins, recipe.data if formatted else None


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from engine import generate

    if not args.prompt:
        raise UserError("--prompt: empty; give the text to continue (e.g. --prompt 'Once upon a time')")
    model, tokenizer, plugins, data_cfg = _load_for_generation(args)
    formatted = generate.formatted_prompt(plugins, data_cfg, tokenizer, [{"role": "user", "content": args.prompt}])
    if formatted is None or formatted == args.prompt:
        print(args.prompt, end="", flush=True)  # a continuation: show it after its prompt
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate.generate_answer(model, tokenizer, plugins, data_cfg, args.prompt, streamer=streamer)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A conversation with a run trained with data.format = "chat" (or prompt_completion): one user turn per line of stdin."""
    from transformers import TextStreamer

    from engine import generate

    model, tokenizer, plugins, data_cfg = _load_for_generation(args)
    if data_cfg is None or not plugins.of_kind("format") or plugins.of_kind("format")[0].name == "text":
        raise UserError(f"{args.run_dir}: chat needs a run trained with an instruction format (data.format = \"chat\" or "
                        f"\"prompt_completion\"); for plain text use python -m engine generate RUN --prompt TEXT")
    interactive = sys.stdin.isatty()
    history: list[dict[str, str]] = []
    if interactive:
        print("Type a message and press Enter; an empty line or Ctrl-D ends the chat.", flush=True)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or (interactive and not line.strip()):
            return 0
        message = line.rstrip("\n")
        if not message.strip():
            continue
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        answer = generate.generate_answer(model, tokenizer, plugins, data_cfg, message, streamer=streamer, history=history)
        sys.stdout.flush()
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer.strip()}]


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from engine import evaluation

    if args.max_length < 0 or args.max_length == 1 or args.batch_size < 1:
        raise UserError("--max-length must be 2 or more (0: the default) and --batch-size 1 or more")
    if args.generate < 0:
        raise UserError(f"--generate: {args.generate}; give the number of examples to answer (0: none)")
    result = evaluation.evaluate_text(args.model, args.data, args.max_length, args.batch_size, args.generate)
    print(json.dumps(result, indent=2) if args.json else evaluation.result_table(result))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from engine import merge

    adapter = merge.merge(args.run_dir, args.out_dir, args.dtype)
    print(f"merged {adapter} into its base model: {args.out_dir} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from engine import runs

    print(runs.compare(args.run_dirs))
    if args.plot:
        runs.plot(args.run_dirs, args.plot)
        print(f"validation curves: {args.plot}")
    return 0
