"""Recipes: TOML files with `extends`, `key=value` overrides, and strict validation.

Loading a recipe never touches a model or data: every problem in it (unknown keys, wrong types,
values out of range, unknown plugins, bad plugin options) is collected and raised together as one
UserError, each line naming the file and the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from engine import schema, tomlfile
from engine.errors import UserError
from engine.manager import KINDS, SLOT_TO_KIND, Selected, resolved_options, select
from engine.schema import opt


@dataclass
class ModelSection:
    base: str = opt("distilgpt2", "hub id or local folder of the base model (from_pretrained)")
    config: dict = opt({}, "build a new model from this config table instead (e.g. model_type = \"gpt2\", n_layer = 2)")
    tokenizer: str = opt("", "hub id or folder of the tokenizer; default: the base model's, or one trained on data.train when model.config is set")
    tokenizer_vocab_size: int = opt(4096, "vocabulary size of the BPE tokenizer trained for a model built from model.config", min=256)
    trust_remote_code: bool = opt(False, "allow custom model code from the hub (off unless you trust it)")
    attention: Literal["sdpa", "eager"] = opt("sdpa", "attention implementation")
    device_map: Literal["", "auto"] = opt("", "\"auto\": one process spreads a model.base too large for one GPU over every GPU it sees (from_pretrained's device_map); not with several processes")
    fused_activations: bool = opt(True, "run tanh-approximate GELUs written out in Python (transformers' gelu_new, gelu_fast: GPT-2 and others) as PyTorch's one fused kernel; the same function up to float rounding, fewer and faster kernels")
    quantization: Literal["none", "4bit", "8bit"] = opt("none", "load model.base with its linear layers quantized by bitsandbytes and frozen; \"4bit\" with a LoRA adapter is QLoRA. Needs lora.enabled = true; the compute dtype follows train.precision")
    quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type (model.quantization = \"4bit\"): nf4 (NormalFloat, QLoRA's) or fp4")
    double_quant: bool = opt(True, "also quantize the 4-bit blocks' scales (model.quantization = \"4bit\"): about 0.37 bits per weight saved")
    pad_vocab_multiple: int = opt(64, "round the vocabulary of a model built from model.config up to a multiple of this (faster matmuls; padded ids are never targets and never generated); 1: off", min=1)


@dataclass
class DataSection:
    train: str = opt(help="training text: a file, a glob, or a datasets name (.txt, .jsonl/.json, .csv, .parquet)")
    val: str = opt("", "validation text (same forms as data.train); empty: split data.val_split off the training documents")
    val_split: float = opt(0.1, "share of training documents held out for validation when data.val is empty", gt=0.0, lt=1.0)
    max_length: int = opt(512, "tokens per training block", min=2)
    text_field: str = opt("text", "column holding the text in .jsonl/.json/.csv/.parquet files and datasets")
    txt_documents: Literal["paragraph", "line", "file"] = opt("paragraph", "what one document is in a .txt file: blank-line-separated paragraphs, single lines, or the whole file")
    packing: bool | Literal["isolated", "concat"] = opt(True, "pack examples into full max_length blocks. true or \"isolated\": each example attends only to itself and its positions restart at 0; \"concat\": examples see the ones before them in the block (the old behaviour); false: one padded block per example")
    prompt_field: str = opt("prompt", "data.format = \"prompt_completion\": the field holding the prompt")
    completion_field: str = opt("completion", "data.format = \"prompt_completion\": the field holding the answer")
    messages_field: str = opt("messages", "data.format = \"chat\": the field holding the list of {role, content} turns")
    train_on_prompt: bool = opt(False, "compute the loss on every token, prompts and user turns included (default: answers only)")
    last_turn_only: bool = opt(False, "data.format = \"chat\": train on the last assistant turn of each chat only")
    too_long: Literal["auto", "split", "truncate", "drop"] = opt("auto", "an example longer than data.max_length: split across blocks, truncate its prompt from the left, or drop it; auto: split plain text, truncate examples with a prompt")
    augment_copies: int = opt(1, "augmented copies added per training document when augmentations are selected (1 doubles the data)", min=0)
    encoding_errors: Literal["strict", "replace"] = opt("strict", "bytes that are not UTF-8: stop with an error naming file and line, or replace them")
    cache: bool = opt(True, "keep tokenized documents (and a tokenizer trained on data.train) in data.cache_dir, keyed by text and tokenizer, and reuse them")
    cache_dir: str = opt("", "folder of the tokenization cache; empty: $TUNESMITH_CACHE, else ~/.cache/tunesmith")


@dataclass
class TrainSection:
    output_dir: str = opt("runs/latest", "run folder (relative to the folder you run from)")
    epochs: int = opt(3, "passes over the training data", min=1)
    max_steps: int = opt(0, "optimizer steps to take; wins over epochs when > 0", min=0)
    batch_size: int = opt(4, "sequences per micro-batch on each process", min=1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", min=1)
    learning_rate: float = opt(5e-5, "peak learning rate", gt=0.0)
    weight_decay: float = opt(0.01, "decoupled weight decay (not applied to biases and norms)", min=0.0)
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this; 0 turns clipping off", min=0.0)
    seed: int = opt(42, "seed for weights, data order, dropout and augmentation", min=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt("auto", "auto: bf16 where supported, fp16 on other GPUs, fp32 on CPU")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    checkpoint_every: int = opt(1, "with gradient_checkpointing: recompute the activations of every k-th transformer block only (1: all; 2: every other one): less recomputation, less memory saved", min=1)
    chunked_loss: Literal["auto", "fused", "plain", "chunked"] = opt("auto", "how the cross-entropy is computed: fused (liger-kernel's fused linear cross-entropy, CUDA, pip install 'tunesmith[gpu]'), plain (full logits: fast, most memory), chunked (logits in chunks, recomputed in backward: least memory, slower); auto: fused where it can, else plain when the logits take at most a quarter of the device's memory, else chunked; reported at start")
    compile: bool = opt(False, "torch.compile the model's forward and the loss as one graph, with batches padded to data.max_length so it compiles once (the first step takes a while: reported; pays off on long GPU runs)")
    cuda_graphs: bool = opt(False, "with compile: also record the compiled step as CUDA graphs (torch.compile mode \"reduce-overhead\"; fewer kernel launches, for small batches); CUDA only")
    auto_batch_size: bool = opt(False, "on GPU, use the largest micro-batch that fits (probed) and keep the global batch by lowering accumulation; on CPU the recipe's batch is kept")
    eval_every_steps: int = opt(0, "evaluate every N optimizer steps as well as at each epoch end (0: epoch ends only)", min=0)
    log_every_steps: int = opt(10, "send training metrics to the sinks every N optimizer steps", min=1)
    overwrite: bool = opt(False, "allow replacing a finished or unfinished run in output_dir")
    save_every_steps: int = opt(0, "also write a checkpoint every N optimizer steps (one is always written at each epoch end); 0: epoch ends only", min=0)
    keep_checkpoints: int = opt(2, "complete checkpoints to keep: the newest N, and the best one as well", min=1)
    resume: str = opt("", "continue from a checkpoint: \"auto\" (the newest complete one in output_dir) or a checkpoint folder; empty: start fresh")
    on_nan: Literal["stop", "skip"] = opt("stop", "a NaN or infinite loss: stop naming the step (exit 1), or skip the step without an update and count it in skipped_steps")
    final_dir: str = opt("final", "folder inside output_dir for the final model (the Python API names it final_model)")
    sample_prompt: str = opt("", "after training, generate from this prompt and print it (empty: no sample)")
    sample_prompts: list[str] = opt([], "at each evaluation, generate from each of these prompts: appended to samples.jsonl in the run folder and sent to the sinks")
    sample_max_new_tokens: int = opt(60, "tokens to generate for each sample (sample_prompt and sample_prompts); wins over the decoding plugin's max_new_tokens", min=1)


@dataclass
class LoraSection:
    enabled: bool = opt(True, "train a LoRA adapter (peft); false: full fine-tuning")
    r: int = opt(16, "LoRA rank", min=1)
    alpha: int = opt(32, "LoRA alpha (scale = alpha / r)", min=1)
    dropout: float = opt(0.1, "dropout on the LoRA path", min=0.0, lt=1.0)
    target_modules: Union[list[str], Literal["all-linear"]] = opt([], "module names to adapt, or \"all-linear\" (every linear layer but the output head); empty: peft's default for the architecture (c_attn for GPT-2)")
    use_dora: bool = opt(False, "DoRA: a trained magnitude per output feature besides the low-rank direction update (peft use_dora)")
    use_rslora: bool = opt(False, "rank-stabilized LoRA: scale the update by alpha / sqrt(r) instead of alpha / r")
    modules_to_save: list[str] = opt([], "modules trained fully and saved with the adapter (e.g. [\"wte\", \"lm_head\"] after adding tokens); not quantized layers")
    init: Literal["default", "gaussian", "orthogonal"] = opt("default", "adapter initialization (peft init_lora_weights): default (B = 0), gaussian, or orthogonal (needs an even r). pissa, olora and loftq rewrite the base weights and eva, corda need data passes: not offered")
    bias: Literal["none", "all", "lora_only"] = opt("none", "train biases as well: none, all of them, or those of the adapted layers (peft bias)")


SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "train": TrainSection, "lora": LoraSection}
SLOT_TYPES: dict[str, Any] = {k.slot: (list[str] if k.many else str) for k in KINDS.values()}


@dataclass
class Recipe:
    path: str
    model: ModelSection
    data: DataSection
    train: TrainSection
    lora: LoraSection
    plugins: list[Selected]
    base_dir: Path

    def resolved(self) -> dict[str, Any]:
        """The whole recipe as run: every key, defaults filled in, plugin options included."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        for kind in KINDS.values():
            names = [s.name for s in self.plugins if KINDS[s.kind] is kind]
            section, _, key = kind.slot.rpartition(".")
            (out[section] if section else out)[key] = names if kind.many else (names[0] if names else "")
        for sel in self.plugins:
            out[sel.name] = resolved_options(sel)
        return out

    def plugin(self, kind: str) -> Selected | None:
        found = [s for s in self.plugins if s.kind == kind]
        return found[0] if found else None


# ------------------------------------------------------------------ loading
def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a recipe file; give the path of a .toml file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: recipe is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return tomlfile.loads(text)
    except tomlfile.TOMLDecodeError as exc:
        # tomllib puts the position at the end of the message: "Invalid value (at line 2, column 10)"
        msg, _, where = str(exc).rpartition(" (at ")
        where = where.rstrip(")") if msg else ""
        raise UserError(f"{path}: not valid TOML at {where}: {msg}" if where else f"{path}: not valid TOML: {exc}") from None


def _merge(base: dict, over: dict, origins: dict[str, str], origin: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "config":
            out[key] = _merge(out[key], value, origins, origin, f"{dotted}.")
        else:
            out[key] = copy.deepcopy(value)
            _mark(origins, dotted, value, origin)
    return out


def _mark(origins: dict[str, str], dotted: str, value: Any, origin: str) -> None:
    origins[dotted] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(origins, f"{dotted}.{k}", v, origin)


def load_file(path: Path, origins: dict[str, str], chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one recipe, following `extends` (relative to the recipe) and deep-merging over it."""
    path = path.resolve() if chain else path
    real = path.resolve()
    if real in chain:
        loop = " -> ".join(str(p) for p in (*chain, real))
        raise UserError(f"{path}: extends loops back to itself ({loop}); remove one of the extends keys")
    data = _read(path)
    parent = data.pop("extends", None)
    if parent is None:
        _mark_all(origins, data, str(path))
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: expected a string (path of another recipe), got {parent!r}")
    parent_path = (real.parent / parent)
    if not parent_path.exists():
        raise UserError(f"{path}: extends: no recipe at {parent_path}")
    if parent_path.is_dir():
        raise UserError(f"{path}: extends: {parent_path} is a folder, not a recipe file")
    base = load_file(parent_path, origins, (*chain, real))
    return _merge(base, data, origins, str(path))


def _mark_all(origins: dict[str, str], data: dict, origin: str) -> None:
    for k, v in data.items():
        _mark(origins, k, v, origin)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is TOML, or a plain string if it is not valid TOML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"command line: '{text}': overrides look like dotted.key=value (e.g. train.learning_rate=1e-4)")
    try:
        value = tomlfile.loads(f"v = {raw}")["v"]
    except tomlfile.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], origins: dict[str, str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides. A table value (`train={epochs=2}`) is merged into the recipe's table,
    as `extends` merges, so the keys it does not name keep their values."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        last, dotted = parts[-1], ".".join(parts)
        if isinstance(value, dict) and isinstance(node.get(last), dict) and last != "config":
            node[last] = _merge(node[last], value, origins, "command line", f"{dotted}.")
        else:
            node[last] = value
            _mark(origins, dotted, value, "command line")
    return data


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge, override and validate a recipe. Raises UserError listing every problem."""
    path = Path(path)
    origins: dict[str, str] = {}
    data = load_file(path, origins)
    data = apply_overrides(data, list(overrides or []), origins)
    return from_dict(data, str(path), origins, base_dir=path.resolve().parent)


def from_dict(
    data: dict[str, Any], origin: str, origins: dict[str, str] | None = None, base_dir: Path | None = None
) -> Recipe:
    origins = dict(origins or {})

    def origin_of(dotted: str) -> str:
        return origins.get(dotted, origin)

    errors: list[str] = []
    sections: dict[str, Any] = {}
    slot_values = section_slots(data)
    for name, section_schema in SECTIONS.items():
        table = data.get(name, {})
        if isinstance(table, dict):  # a slot inside a section (data.format) is a plugin name, not a section key
            table = {k: v for k, v in table.items() if f"{name}.{k}" not in SLOT_TYPES}
        value, section_errors = schema.validate(table, section_schema, f"{name}.", origin_of(name))
        # Name the file each bad key came from (a recipe it extends, or the command line).
        errors.extend(_reattribute(e, origin_of(name), origins) for e in section_errors)
        sections[name] = value

    slots: dict[str, Any] = {}
    for slot, slot_type in SLOT_TYPES.items():
        if slot not in slot_values:
            continue
        ok, value = schema._check_value(slot_values[slot], slot_type)
        if not ok:
            errors.append(f"{origin_of(slot)}: {slot}: expected {schema.describe_type(slot_type)} (plugin names), got {slot_values[slot]!r}")
        else:
            slots[slot] = value

    plugin_tables = {k: v for k, v in data.items() if k not in SECTIONS and k not in SLOT_TYPES}
    from engine.manager import discover

    installed, _ = discover()
    known_top = [*SECTIONS, *SLOT_TYPES, "extends"]
    named = {n for v in slots.values() for n in (v if isinstance(v, list) else [v])}
    for key, value in list(plugin_tables.items()):
        if key not in installed and key in named:
            del plugin_tables[key]  # the slot's "unknown plugin" error says it all
        elif key not in installed:
            errors.append(f"{origin_of(key)}: {key}: unknown key{schema.did_you_mean(key, [*known_top, *installed])}")
            del plugin_tables[key]
        elif not isinstance(value, dict):
            errors.append(f"{origin_of(key)}: {key}: expected a table of options for plugin '{key}', got {value!r}")
            del plugin_tables[key]

    # A table only a recipe this one extends has (no key of it set here or on the command line).
    own = {origin, "command line"}
    inherited = {
        name for name in plugin_tables
        if not any(where in own for key, where in origins.items() if key == name or key.startswith(name + "."))
        and name in origins
    }
    for name in set(plugin_tables) - inherited:  # an inherited table changed here: errors about it point here
        if origins.get(name, origin) not in own:
            origins[name] = next(where for key, where in origins.items() if key.startswith(name + ".") and where in own)
    if sections["model"] is not None:
        _absolute_local_folders(sections["model"])
    selected, plugin_errors = select(
        {s: v for s, v in slots.items()}, plugin_tables, origin_of, inherited
    )
    errors.extend(_reattribute(e, None, origins) for e in plugin_errors)
    if sections["model"] is not None and sections["lora"] is not None:
        from engine import quant

        errors.extend(quant.problems(sections["model"], sections["lora"], origin_of))
    if errors:
        raise UserError(*errors)
    return Recipe(origin, sections["model"], sections["data"], sections["train"], sections["lora"], selected, base_dir or Path.cwd())


def section_slots(data: dict[str, Any]) -> dict[str, Any]:
    """The slot values a recipe dict sets: top-level keys (optimizer) and keys inside a section (data.format)."""
    out = {}
    for slot in SLOT_TYPES:
        section, _, key = slot.rpartition(".")
        table = data.get(section, {}) if section else data
        if isinstance(table, dict) and key in table:
            out[slot] = table[key]
    return out


def data_section(table: dict[str, Any]) -> dict[str, Any]:
    """A [data] table without its plugin slot (data.format), for validating it against DataSection alone."""
    return {k: v for k, v in table.items() if f"data.{k}" not in SLOT_TYPES}


def _absolute_local_folders(model: ModelSection) -> None:
    """model.base and model.tokenizer that name a local folder (relative to the folder you run from) become
    absolute, so the recipe.toml of the run, and the adapter's base_model_name_or_path, work from anywhere."""
    for key in ("base", "tokenizer"):
        value = getattr(model, key)
        if value and not Path(value).is_absolute() and Path(value).is_dir():
            setattr(model, key, str(Path(value).resolve()))


def _reattribute(error: str, default_origin: str | None, origins: dict[str, str]) -> str:
    """Point an error at the file that set its key (useful with extends and overrides)."""
    head, sep, rest = error.partition(": ")
    key, sep2, problem = rest.partition(": ")
    if sep and sep2 and key in origins:
        return f"{origins[key]}: {key}: {problem}"
    return error


def slot_for(kind: str) -> str:
    return KINDS[kind].slot


__all__ = ["Recipe", "load", "from_dict", "SECTIONS", "SLOT_TO_KIND", "parse_override"]
