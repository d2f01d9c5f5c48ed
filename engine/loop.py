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
import json
import time
from pathlib import Path
from typing import Any

import torch

from engine import advice
from engine import autobatch
from engine import checkpoint
from engine import data as data_mod
from engine import distributed
from engine import feed
from engine import interrupts
from engine.evaluation import evaluate
from engine import loss as loss_mod
from engine.loss import token_loss_sum
from engine import model as model_mod
from engine import chat, formats, packing, tokcache
from engine.context import EarlyStopDecision, TrainContext, TrainState
from engine.errors import Interrupted, RunFailed, UserError
from engine.manager import Plugins
from engine.recipe import Recipe
from engine import modelcard, quant, quiet, report, tomlfile
from engine import step as step_mod
from engine.runfolder import check_output_dir, clear_run_files, mark_as_run, save_model
from engine.samples import sample_at_evaluation


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
    # SIGTERM and Ctrl-C: checkpoint at the next step boundary, then exit; `cleanup` stops the batch feeder
    with interrupts.Watch() as signals, contextlib.ExitStack() as cleanup:
        return _train(recipe, signals, cleanup, write_run)


def _train(recipe: Recipe, signals: interrupts.Watch, cleanup: contextlib.ExitStack, write_run: bool = True) -> dict[str, Any]:
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
        mixed_precision=quant.precision_of(cfg.precision), dynamo_backend="no",  # train.compile: engine/step.py
        **distributed.accelerator_options(),
    )
    distributed.check_started(recipe.model, accelerator)
    step_mod.check_options(cfg, accelerator.device)
    set_seed(cfg.seed)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)

    # 1. documents, checked before any model loads
    plugins = Plugins(recipe.plugins)
    rows = formats.run_rows(recipe, plugins)  # split, then augment the training rows (engine/formats.py)

    # 2. tokenizer, blocks, model
    cache = tokcache.cache_root(recipe.data)
    tokenizer = model_mod.load_tokenizer(recipe.model, formats.row_texts(rows.train), cache)
    added_tokens = formats.prepare_tokenizer(plugins, tokenizer, recipe.data)  # e.g. a chat template's tokens
    model = model_mod.load_model(recipe.model, tokenizer, accelerator.mixed_precision)
    added_ids = chat.fit_model(model, tokenizer, added_tokens)
    if recipe.model.fused_activations:
        model_mod.use_fused_activations(model)
    model_mod.skip_padding_check(model)  # it reads the batch back from the GPU on every forward
    limit = model_mod.context_length(model)
    if limit is not None and recipe.data.max_length > limit:
        raise UserError(f"data.max_length: {recipe.data.max_length} is longer than the model's context ({limit}); set it to {limit} or less")
    train_blocks, val_blocks, val_chars = packing.run_blocks(recipe, plugins, rows, tokenizer, cache, log)
    if recipe.lora.enabled:
        if recipe.model.config:
            raise UserError("lora.enabled: a model built from model.config starts from random weights; train it fully with lora.enabled = false")
        model = model_mod.apply_lora(model, recipe.lora, trainable_tokens=added_ids)
    if cfg.gradient_checkpointing:
        model_mod.enable_gradient_checkpointing(model, cfg.checkpoint_every)
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
    identity = checkpoint.identity(recipe, world, train_blocks, total_steps)
    if note := advice.too_many_steps(total_steps, per_epoch, len(train_blocks), cfg.max_steps):
        log(note)

    # 3. optimizer, scheduler, Accelerate
    optimizer = plugins.hook.create_optimizer(
        param_groups=model_mod.param_groups(model, cfg.weight_decay), learning_rate=cfg.learning_rate, device=accelerator.device
    )
    scheduler = plugins.hook.create_scheduler(optimizer=optimizer, total_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    batch_size, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
    half = accelerator.mixed_precision in ("fp16", "bf16")

    def loss_way(micro: int) -> tuple[str, str]:  # train.chunked_loss: fused, plain or chunked, and why
        return loss_mod.choose(cfg.chunked_loss, model, accelerator.device, micro, recipe.data.max_length, half)

    if cfg.auto_batch_size:  # same global batch: a larger micro-batch with less accumulation, or the reverse
        batch_size, accumulation = autobatch.choose(
            model, lambda m, b: token_loss_sum(m, b, loss_way(b["input_ids"].shape[0])[0]), accelerator, batch_size, accumulation,
            recipe.data.max_length, len(tokenizer), log, optimizer,
        )
    loss_name, why = loss_way(batch_size)
    log(f"loss: {why}")
    parts = checkpoint.register(accelerator, model, optimizer, scheduler)
    restored = checkpoint.load(resume_from, parts, identity) if resume_from is not None else None

    if accelerator.is_main_process and write_run:
        if recipe.train.overwrite or (cfg.resume and restored is None):
            clear_run_files(out, cfg.final_dir)
        if restored is not None:
            checkpoint.rewind_run_folder(out, restored)
        out.mkdir(parents=True, exist_ok=True)
        mark_as_run(out)
        (out / "recipe.toml").write_text(tomlfile.dumps(recipe.resolved()), encoding="utf-8")
        quiet.keep_in(out / quiet.LOG_FILE, append=restored is not None)  # library noise kept off the screen
    accelerator.wait_for_everyone()

    context = TrainContext(recipe, accelerator, model, tokenizer, optimizer, scheduler, out, total_steps, TrainState())
    state = context.state
    for line in report.start_lines(recipe, accelerator, trainable, total, len(train_blocks), len(val_blocks), total_steps, out):
        log(line)
    best_weights: dict[str, torch.Tensor] | None = None
    last_eval: dict[str, float] = {}
    train_seconds, window_tokens, window_start = 0.0, 0, time.perf_counter()
    loss_window: list[float] = []
    loss, grad_norm, last_checkpoint = float("nan"), 0.0, None
    if restored is not None:
        restore_trainable(accelerator.unwrap_model(model), restored.weights)
        state.__dict__.update(restored.state)
        context.resumed, context.resumed_from_step = True, state.step
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
    if restored is not None:
        loss_watch.load_state(restored.progress.get("loss_watch"))

    def run_evaluation() -> bool:
        """Evaluate, track the best model; returns True when training should stop."""
        nonlocal best_weights, last_eval
        settle()
        metrics = evaluate(model, accelerator, val_blocks, batch_size, tokenizer.pad_token_id, val_chars, loss_name)
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
        settle()
        progress = {"loss_window": loss_window, "window_tokens": window_tokens, "last_loss": loss, "last_eval": last_eval, "train_seconds": train_seconds,
                    "loss_watch": loss_watch.state()}
        return checkpoint.write(
            out, parts, state, lambda: trainable_state(accelerator.unwrap_model(model)), best_weights,
            plugins.states(), progress, identity, cfg.keep_checkpoints,
        )

    def nan_message(bad_step: int, bad_loss: float, bad_norm: float | None) -> str:
        kept = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
        return (f"training loss is {bad_loss} (gradient norm {bad_norm if bad_norm is not None else 'not computed'}) at step {bad_step}; "
                f"the weights were not updated from then on{kept}. Lower train.learning_rate, check the data, or set train.on_nan=\"skip\"")

    # 4. the loop
    pad_id = tokenizer.pad_token_id
    step = step_mod.OptimizerStep(model, optimizer, scheduler, accelerator, lambda m, b: token_loss_sum(m, b, loss_name)[0],
                                  cfg.max_grad_norm, cfg.on_nan, cfg.compile, cfg.cuda_graphs)
    unread = step_mod.Unread()
    # on_step_end gets floats: read every step when a plugin implements it, unless it asked for device tensors
    floats_each_step = any(not getattr(impl.plugin, "step_metrics_on_device", False) for impl in plugins.hook.on_step_end.get_hookimpls())

    def settle() -> None:
        """Read the device metrics of the steps since the last read (one sync): losses, skipped steps, train.on_nan."""
        nonlocal loss, grad_norm
        for record in unread.read():
            if not record.finite and cfg.on_nan == "stop":
                raise RunFailed(nan_message(record.step, record.loss, record.grad_norm))
            if record.finite:
                loss_window.append(record.loss)
            else:
                state.skipped_steps += 1  # train.on_nan = "skip": no update; counted in the logs and metrics.json
            loss, grad_norm = record.loss, record.grad_norm if record.grad_norm is not None else 0.0
            note = loss_watch.update(record.step, record.loss, record.lr, cfg.learning_rate)
            if note:
                log(note)

    feeder = cleanup.enter_context(feed.Feeder(
        train_blocks, cfg.seed, per_epoch, total_steps, batch_size, accumulation, rank, world, pad_id,
        pin=accelerator.device.type == "cuda", fixed_width=recipe.data.max_length if cfg.compile else None))
    feeder.start(state.step, state.epoch, state.step_in_epoch)
    first_step = state.step
    stop = False
    agreement = distributed.StepAgreement(accelerator)  # every process, here: stop and signals agreed on the host
    signals.arm()
    while state.step < total_steps and not stop:
        if state.step_in_epoch >= per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        ready = feeder.get(state.epoch, state.step_in_epoch)  # collated ahead on the host; tokens counted there
        batches, step_tokens = feed.to_device(ready.batches, accelerator.device), ready.tokens
        t0 = time.perf_counter()
        try:
            done = step(batches, step_tokens)  # metrics stay on the device until settle() reads them
        except step_mod.NonFiniteStep as bad:  # an optimizer that cannot skip by itself checks every step
            raise RunFailed(nan_message(state.step + 1, bad.loss, bad.grad_norm)) from None
        state.step += 1
        state.step_in_epoch += 1
        state.tokens_seen += step_tokens
        window_tokens += step_tokens
        unread.add(state.step, done, scheduler.get_last_lr()[0])
        epoch_end = state.step_in_epoch >= per_epoch
        log_due = state.step % cfg.log_every_steps == 0 or state.step == total_steps
        eval_due = write_run and (epoch_end or (cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0) or state.step == total_steps)
        save_due = write_run and (epoch_end or (cfg.save_every_steps and state.step % cfg.save_every_steps == 0))
        if log_due or eval_due or save_due or floats_each_step:
            settle()
        train_seconds += time.perf_counter() - t0
        if cfg.compile and state.step == first_step + 1:
            log(f"train.compile: the first step took {time.perf_counter() - t0:.1f} s (compiling the step; later steps reuse it)")
        metrics = {  # on steps that read nothing, loss and grad_norm are 0-dim device tensors
            "loss": done.loss if unread.items else loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": (done.grad_norm if done.grad_norm is not None else 0.0) if unread.items else grad_norm,
            "tokens_seen": state.tokens_seen,
            "epoch": state.epoch + state.step_in_epoch / per_epoch,
            "skipped_steps": state.skipped_steps,
        }
        if log_due:
            now = time.perf_counter()
            emit({**metrics, "loss": sum(loss_window) / len(loss_window) if loss_window else float("nan"),
                  "tokens_per_second": window_tokens / max(1e-9, now - window_start)}, "train")  # on_step_end keeps the step's loss
            loss_window, window_tokens, window_start = [], 0, now
        plugins.hook.on_step_end(context=context, metrics=metrics)
        if eval_due:
            stop = run_evaluation() or stop
        asked, signum = agreement.agree(context, signals.received)  # any process asked or got a signal: all stop after this step
        stop = stop or asked
        if save_due or (write_run and signum):
            last_checkpoint = save_checkpoint()
        if signum:
            saved = f"; checkpoint {last_checkpoint} written. Continue with train.resume=auto" if write_run else ""
            raise Interrupted(f"stopped by {interrupts.name(signum)} after step {state.step}{saved}", signum)

    settle()

    # 5. the run folder
    unwrapped = accelerator.unwrap_model(model)
    if not write_run:
        accelerator.end_training()
        return {"steps": state.step, "tokens_seen": state.tokens_seen, "train_loss": loss, "batch_size": batch_size,
                "gradient_accumulation_steps": accumulation, "train_seconds": train_seconds, "trainable_params": trainable,
                "total_params": total, "device": str(accelerator.device), "precision": accelerator.mixed_precision}
    if last_eval.get("step") != state.step:  # stopped between evaluations: measure the final weights
        last_eval = evaluate(model, accelerator, val_blocks, batch_size, pad_id, val_chars, loss_name)
        last_eval.update(epoch=state.epoch, step=state.step, tokens_seen=state.tokens_seen)  # the keys of every evaluation
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
        modelcard.write_run_cards(recipe, summary, out, {"train_documents": len(rows.train), "val_documents": len(rows.val), "val_characters": val_chars})
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

