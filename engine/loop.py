"""The training loop: recipe in, run folder out. Reads top to bottom.

1. check the run folder, read and split the documents (before any model loads)
2. tokenizer, token blocks, model (LoRA, gradient checkpointing)
3. optimizer and scheduler from the selected plugins; Accelerate prepares model and optimizer
4. for each optimizer step: this process's micro-batches, a token-weighted loss over all of them
   (and over all processes), backward, clip, step, schedule; log; evaluate when due
   at each epoch end and every train.save_every_steps, and on SIGTERM or Ctrl-C, a checkpoint
   (engine/checkpoint.py); train.resume continues from one with the very next batch
5. final/ (model or adapter + tokenizer), best/ when early stopping is on, metrics.json
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from engine import advice
from engine import autobatch
from engine import checkpoint
from engine import data as data_mod
from engine import distributed
from engine import interrupts
from engine.evaluation import evaluate, token_loss_sum  # noqa: F401  (also imported from here)
from engine import model as model_mod
from engine import chat, formats, packing, tokcache
from engine.context import EarlyStopDecision, TrainContext, TrainState
from engine.errors import Interrupted, RunFailed, UserError
from engine.manager import Plugins
from engine.recipe import Recipe
from engine import report, tomlfile
from engine.samples import sample_at_evaluation

RUN_FILES = ("recipe.toml", "metrics.jsonl", "metrics.json", "final", "best", "checkpoints", "samples.txt", "samples.jsonl", "curves.png")


# ------------------------------------------------------------------ run folder
def check_output_dir(recipe: Recipe) -> Path:
    """Refuse to replace a finished or unfinished run unless train.overwrite or train.resume is set."""
    out = Path(recipe.train.output_dir)
    final_dir = recipe.train.final_dir
    if not final_dir or Path(final_dir).name != final_dir or final_dir in (".", "..", "best", "checkpoints"):
        raise UserError(f"train.final_dir: '{final_dir}' must be a plain folder name other than best or checkpoints (e.g. final)")
    finished = (out / "metrics.json").exists()
    if finished and not (recipe.train.overwrite or recipe.train.resume):
        raise UserError(
            f"train.output_dir: '{out}' holds a finished run (metrics.json); choose another folder, "
            f"add train.overwrite=true to replace it, or train.resume=auto to continue it"
        )
    unfinished = checkpoint.unfinished_run_problem(out)
    if unfinished and not (recipe.train.overwrite or recipe.train.resume):
        raise UserError(unfinished)
    return out


def clear_run_files(out: Path, final_dir: str = "final") -> None:
    for name in {*RUN_FILES, final_dir}:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def choose_precision(requested: str) -> str:
    """Accelerate's mixed_precision value for train.precision."""
    if requested == "fp32":
        return "no"
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# ------------------------------------------------------------------ loss and evaluation (engine/evaluation.py)
def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable weights (the adapter for LoRA, everything for full training)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


# ------------------------------------------------------------------ the run
def train(recipe: Recipe, write_run: bool = True) -> dict[str, Any]:
    """Train from a recipe. write_run=False (python -m engine bench) writes no run folder and never evaluates."""
    with interrupts.Watch() as signals:  # SIGTERM and Ctrl-C: checkpoint at the next step boundary, then exit
        return _train(recipe, signals, write_run)


def _train(recipe: Recipe, signals: interrupts.Watch, write_run: bool = True) -> dict[str, Any]:
    import transformers
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    transformers.utils.logging.disable_progress_bar()

    t_start = time.perf_counter()
    cfg = recipe.train
    out = check_output_dir(recipe) if write_run else Path(cfg.output_dir)
    resume_from = checkpoint.resume_point(cfg, out) if write_run else None
    distributed.check_before_start(recipe.model)
    # Accelerate keeps precision and compile settings in a process-wide singleton: forget the previous
    # run's (Python API, tests), else a second run in one process silently reuses them or is refused.
    # The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=choose_precision(cfg.precision), dynamo_backend="inductor" if cfg.compile else "no",
        **distributed.accelerator_options(),
    )
    distributed.check_started(recipe.model, accelerator)
    set_seed(cfg.seed)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)

    # 1. documents, checked before any model loads
    plugins = Plugins(recipe.plugins)
    rows = formats.run_rows(recipe, plugins)  # split, then augment the training rows (engine/formats.py)

    # 2. tokenizer, blocks, model
    cache = tokcache.cache_root(recipe.data)
    tokenizer = model_mod.load_tokenizer(recipe.model, formats.row_texts(rows.train), cache)
    added_tokens = formats.prepare_tokenizer(plugins, tokenizer, recipe.data)  # e.g. a chat template's tokens
    model = model_mod.load_model(recipe.model, tokenizer)
    added_ids = chat.fit_model(model, tokenizer, added_tokens)
    if recipe.model.fused_activations:
        model_mod.use_fused_activations(model)
    limit = model_mod.context_length(model)
    if limit is not None and recipe.data.max_length > limit:
        raise UserError(f"data.max_length: {recipe.data.max_length} is longer than the model's context ({limit}); set it to {limit} or less")
    train_blocks, val_blocks, val_chars = packing.run_blocks(recipe, plugins, rows, tokenizer, cache, log)
    if recipe.lora.enabled:
        if recipe.model.config:
            raise UserError("lora.enabled: a model built from model.config starts from random weights; train it fully with lora.enabled = false")
        model = model_mod.apply_lora(model, recipe.lora, trainable_tokens=added_ids)
    if cfg.gradient_checkpointing:
        model_mod.enable_gradient_checkpointing(model)
    trainable, total = model_mod.parameter_counts(model)

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = world * cfg.batch_size * cfg.gradient_accumulation_steps
    per_epoch = data_mod.steps_per_epoch(len(train_blocks), global_batch)
    if per_epoch == 0:
        raise UserError(
            f"train.batch_size: one optimizer step needs {global_batch} blocks ({world} processes x batch {cfg.batch_size} "
            f"x accumulation {cfg.gradient_accumulation_steps}) but data.train gives {len(train_blocks)}; "
            f"lower train.batch_size or data.max_length, or add data"
        )
    total_steps = cfg.max_steps if cfg.max_steps > 0 else per_epoch * cfg.epochs
    identity = checkpoint.identity(cfg, world, train_blocks, total_steps)

    # 3. optimizer, scheduler, Accelerate
    optimizer = plugins.hook.create_optimizer(
        param_groups=model_mod.param_groups(model, cfg.weight_decay), learning_rate=cfg.learning_rate, device=accelerator.device
    )
    scheduler = plugins.hook.create_scheduler(optimizer=optimizer, total_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    batch_size, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
    if cfg.auto_batch_size:  # same global batch: a larger micro-batch with less accumulation, or the reverse
        batch_size, accumulation = autobatch.choose(
            model, lambda m, b: token_loss_sum(m, b, cfg.chunked_loss), accelerator, batch_size, accumulation,
            recipe.data.max_length, len(tokenizer), log,
        )
    checkpoint.register(accelerator, scheduler)
    restored = None
    if resume_from is not None:
        names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        restored = checkpoint.load(resume_from, accelerator, identity, names)

    if accelerator.is_main_process and write_run:
        if recipe.train.overwrite or (cfg.resume and restored is None):
            clear_run_files(out, cfg.final_dir)
        if restored is not None:
            checkpoint.rewind_run_folder(out, restored)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.toml").write_text(tomlfile.dumps(recipe.resolved()), encoding="utf-8")
    accelerator.wait_for_everyone()

    context = TrainContext(recipe, accelerator, model, tokenizer, optimizer, scheduler, out, total_steps, TrainState())
    state = context.state
    for line in report.start_lines(recipe, accelerator, trainable, total, len(train_blocks), len(val_blocks), total_steps, out):
        log(line)
    best_weights: dict[str, torch.Tensor] | None = None
    last_eval: dict[str, float] = {}
    train_seconds, window_tokens, window_start = 0.0, 0, time.perf_counter()
    loss_window: list[float] = []
    loss, last_checkpoint = float("nan"), None
    if restored is not None:
        restore_trainable(accelerator.unwrap_model(model), restored.weights)
        state.__dict__.update(restored.state)
        best_weights, progress = restored.best_weights, restored.progress
        loss_window, window_tokens, loss = progress["loss_window"], progress["window_tokens"], progress["last_loss"]
        last_eval, train_seconds, last_checkpoint = progress["last_eval"], progress["train_seconds"], restored.path
        log(f"resuming from {restored.path} at step {state.step} (epoch {state.epoch + 1}, step {state.step_in_epoch} of {per_epoch})")
    plugins.hook.on_train_start(context=context)
    if restored is not None:
        for name in plugins.load_states(restored.plugin_states):
            checkpoint.warn(f"plugin '{name}' has no state in {restored.path}; it starts afresh")

    def emit(metrics: dict[str, Any], phase: str) -> None:
        if accelerator.is_main_process:
            plugins.hook.log_metrics(metrics=metrics, step=state.step, phase=phase)

    early_stopping = bool(plugins.of_kind("early_stopping"))
    loss_watch = advice.LossWatch(total_steps)

    def run_evaluation() -> bool:
        """Evaluate, track the best model; returns True when training should stop."""
        nonlocal best_weights, last_eval
        metrics = evaluate(model, accelerator, val_blocks, batch_size, tokenizer.pad_token_id, val_chars, cfg.chunked_loss)
        metrics["epoch"] = state.epoch
        metrics["step"] = state.step
        metrics["tokens_seen"] = state.tokens_seen
        last_eval = metrics
        emit(metrics, "eval")
        plugins.hook.on_evaluate(context=context, metrics=metrics)
        if cfg.sample_prompts and accelerator.is_main_process:
            sample_at_evaluation(context, plugins)
        decision = plugins.hook.early_stopping_check(metrics=metrics, step=state.step) if early_stopping else None
        if decision is None:
            improved = state.best_metric is None or metrics["val_loss"] < state.best_metric
            decision = EarlyStopDecision(improved=improved, stop=False)
        if decision.improved:
            state.best_metric, state.best_step = metrics["val_loss"], state.step
            if early_stopping:
                best_weights = trainable_state(accelerator.unwrap_model(model))
        if decision.stop:
            context.request_stop(decision.reason or "early stopping")
        return decision.stop

    def save_checkpoint() -> Path:
        progress = {"loss_window": loss_window, "window_tokens": window_tokens, "last_loss": loss, "last_eval": last_eval, "train_seconds": train_seconds}
        return checkpoint.write(
            out, accelerator, state, lambda: trainable_state(accelerator.unwrap_model(model)), best_weights,
            plugins.states(), progress, identity, cfg.keep_checkpoints,
        )

    # 4. the loop
    pad_id = tokenizer.pad_token_id
    stop = False
    signals.arm()
    while state.step < total_steps and not stop:
        if state.step_in_epoch >= per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        micro = data_mod.step_batches(
            len(train_blocks), cfg.seed, state.epoch, state.step_in_epoch,
            batch_size, accumulation, rank, world,
        )
        batches = [{k: v.to(accelerator.device) for k, v in data_mod.collate([train_blocks[i] for i in ids], pad_id).items()} for ids in micro]
        local_tokens = sum(int((b["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum()) for b in batches)
        step_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum").item())
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    loss_sum, _ = token_loss_sum(model, batch, cfg.chunked_loss)
                # DDP averages gradients over processes; scaling by world / tokens makes the result the
                # gradient of the token-weighted mean over every micro-batch of every process.
                accelerator.backward(loss_sum * world / step_tokens)
            step_loss += loss_sum.detach().double()
        loss = accelerator.reduce(step_loss, "sum").item() / step_tokens
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        finite = math.isfinite(loss) and (grad_norm is None or accelerator.scaler is not None or math.isfinite(float(grad_norm)))
        if not finite and cfg.on_nan == "stop":
            kept = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
            raise RunFailed(
                f"training loss is {loss} (gradient norm {float(grad_norm) if grad_norm is not None else 'not computed'}) at step {state.step + 1}; "
                f"the weights were not updated{kept}. Lower train.learning_rate, check the data, or set train.on_nan=\"skip\""
            )
        if finite:
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
        else:
            state.skipped_steps += 1  # train.on_nan = "skip": no update; counted in the logs and metrics.json
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0
        state.step += 1
        state.step_in_epoch += 1
        state.tokens_seen += step_tokens
        window_tokens += step_tokens
        if finite:
            loss_window.append(loss)
        metrics = {
            "loss": loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "tokens_seen": state.tokens_seen,
            "epoch": state.epoch + state.step_in_epoch / per_epoch,
            "skipped_steps": state.skipped_steps,
        }
        note = loss_watch.update(state.step, loss, metrics["lr"], cfg.learning_rate)
        if note:
            log(note)
        if state.step % cfg.log_every_steps == 0 or state.step == total_steps:
            now = time.perf_counter()
            metrics["loss"] = sum(loss_window) / len(loss_window) if loss_window else float("nan")
            metrics["tokens_per_second"] = window_tokens / max(1e-9, now - window_start)
            emit(metrics, "train")
            loss_window, window_tokens, window_start = [], 0, now
        plugins.hook.on_step_end(context=context, metrics=metrics)
        epoch_end = state.step_in_epoch >= per_epoch
        due = cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0
        if write_run and (epoch_end or due or state.step == total_steps):
            stop = run_evaluation() or stop
        if distributed.agree_stop(accelerator, context):  # any process asked: all stop after this step
            stop = True
        signum = signals.pending(accelerator)
        if write_run and (epoch_end or (cfg.save_every_steps and state.step % cfg.save_every_steps == 0) or signum):
            last_checkpoint = save_checkpoint()
        if signum:
            saved = f"; checkpoint {last_checkpoint} written. Continue with train.resume=auto" if write_run else ""
            raise Interrupted(f"stopped by {interrupts.name(signum)} after step {state.step}{saved}", signum)

    # 5. the run folder
    unwrapped = accelerator.unwrap_model(model)
    if not write_run:
        accelerator.end_training()
        return {"steps": state.step, "tokens_seen": state.tokens_seen, "train_loss": loss, "batch_size": batch_size,
                "gradient_accumulation_steps": accumulation, "train_seconds": train_seconds, "trainable_params": trainable,
                "total_params": total, "device": str(accelerator.device), "precision": accelerator.mixed_precision}
    if last_eval.get("step") != state.step:  # stopped between evaluations: measure the final weights
        last_eval = evaluate(model, accelerator, val_blocks, batch_size, pad_id, val_chars, cfg.chunked_loss)
        emit(last_eval, "eval")
    accelerator.wait_for_everyone()
    save_model(unwrapped, tokenizer, out / cfg.final_dir, accelerator, model)
    if early_stopping and best_weights is not None:
        restore_trainable(unwrapped, best_weights)  # the run ends holding its best weights
        save_model(unwrapped, tokenizer, out / "best", accelerator, model)
    summary = {
        "val_loss": last_eval.get("val_loss"),
        "perplexity": last_eval.get("perplexity"),
        "val_bpc": last_eval.get("val_bpc"),
        "best_val_loss": state.best_metric,
        "best_step": state.best_step,
        "train_loss": loss,
        "steps": state.step,
        "epochs": round(state.epoch + state.step_in_epoch / per_epoch, 4),
        "tokens_seen": state.tokens_seen,
        "tokens_per_second": state.tokens_seen / max(1e-9, train_seconds),
        "trainable_params": trainable,
        "total_params": total,
        "stopped_early": bool(context.stop_reason),
        "stop_reason": context.stop_reason,
        "skipped_steps": state.skipped_steps,
        "wall_seconds": time.perf_counter() - t_start,
        "processes": world,
    }
    emit(summary, "summary")
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plugins.hook.on_train_end(context=context, summary=summary)
    if cfg.sample_prompt and not distributed.can_generate_alone(accelerator):
        log(f"\nno sample: the weights are sharded (FSDP); run python -m engine generate {out} --prompt ...")
    elif cfg.sample_prompt and accelerator.is_main_process:
        from engine.generate import generate_answer

        text = generate_answer(unwrapped, tokenizer, plugins, recipe.data, cfg.sample_prompt, max_new_tokens=cfg.sample_max_new_tokens)
        log(f"\nsample: {cfg.sample_prompt}{text}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def save_model(model: Any, tokenizer: Any, folder: Path, accelerator: Any, wrapped: Any) -> None:
    """save_pretrained (safetensors) of the model or LoRA adapter, plus the tokenizer, by the main process.

    Called on every process: under FSDP the full weights are gathered from all of them first.
    """
    state_dict = distributed.full_state_dict(accelerator, wrapped)
    if not accelerator.is_main_process:
        return
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
