"""The plugin contract: every hook a plugin may implement.

A plugin is a class. The engine builds one instance per selected plugin, passing its validated
options (`self.options`), and registers it with pluggy. Implement a hook by defining a method of
the same name decorated with `engine.hookimpl`.

Kind hooks serve the slot a recipe selected the plugin for (`optimizer = "adamw"`). Only the
selected plugins are registered, so a firstresult hook is answered by the one plugin in its slot.
Hooks marked "called per plugin" are called on each plugin of a list slot in recipe order, each
call seeing the previous one's output. Lifecycle hooks may be implemented by any plugin of any kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # only for annotations; importing this module stays cheap
    import random

    import torch

    from engine.context import EarlyStopDecision, TrainContext
    from engine.formats import Segment

PROJECT = "tunesmith"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------- kind: augmentation
@hookspec
def augment_document(text: str, rng: "random.Random", vocabulary: list[str]) -> str:
    """Return an augmented copy of one training document.

    text: the document (after the previous augmentation in recipe order).
    rng: a random.Random seeded from train.seed; use only it, so the same seed gives the same data.
    vocabulary: the distinct words of the training corpus, sorted (for insertions).
    Returns the new text. Called per plugin, in recipe order. Never called for validation data.
    """


# ---------------------------------------------------------------- kind: format
@hookspec(firstresult=True)
def format_example(example: dict[str, Any], data: Any, tokenizer: Any) -> list["Segment"]:
    """Turn one example of the data into segments of text, each marked as a target or not.

    example: one row of the data as a dict (a .jsonl line, a .csv row, a dataset row; a .txt
    document is {data.text_field: text}).
    data: the recipe's data section (data.prompt_field, data.completion_field, data.messages_field,
    data.text_field, data.last_turn_only, ...).
    tokenizer: the run's tokenizer (eos_token, apply_chat_template).
    Returns a list of engine.formats.Segment(text, target) (an empty list skips the example): the engine tokenizes each segment
    separately (special tokens in the text are recognized), concatenates them and computes the
    loss on target tokens only (data.train_on_prompt makes every token a target). End the answer
    with a target end-of-answer token (tokenizer.eos_token or the template's end of turn) so the
    model learns to stop. Raise engine.formats.FormatError(field, problem) for bad data: the engine
    adds the file and line. The first non-None result wins.
    """


@hookspec(firstresult=True)
def format_prompt(messages: list[dict[str, str]], data: Any, tokenizer: Any) -> str:
    """The text a model trained with this format continues to answer the conversation.

    messages: OpenAI-style turns [{"role": "user", "content": ...}, ...] ending with a user turn
    (python -m engine generate --prompt TEXT gives one user turn; python -m engine chat the whole
    conversation so far).
    data: the recipe's data section, as in format_example.
    tokenizer: the run's tokenizer.
    Returns the prompt text exactly as it appears (not a target) before an answer in training.
    The first non-None result wins; a format without it generates from the raw text.
    """


@hookspec(firstresult=True)
def prepare_tokenizer(tokenizer: Any, data: Any) -> list[str]:
    """Adjust the tokenizer before the model is built: add special tokens, set a chat template.

    tokenizer: the run's tokenizer, changed in place; it is saved with the run (final/, best/).
    data: the recipe's data section.
    Returns the special tokens added (the engine grows the embeddings to fit and, under LoRA,
    trains and saves their rows with the adapter), or an empty list. The first non-None result wins.
    """


# ---------------------------------------------------------------- kind: optimizer
@hookspec(firstresult=True)
def create_optimizer(
    param_groups: list[dict[str, Any]], learning_rate: float, device: "torch.device"
) -> "torch.optim.Optimizer":
    """Build the optimizer.

    param_groups: torch parameter groups; each already has "params" and "weight_decay"
    (biases and norms get 0).
    learning_rate: the peak learning rate (train.learning_rate).
    device: where the parameters live (a plugin can pick a fused kernel on CUDA).
    Returns a torch optimizer. The first non-None result wins.
    """


# ---------------------------------------------------------------- kind: scheduler
@hookspec(firstresult=True)
def create_scheduler(optimizer: "torch.optim.Optimizer", total_steps: int) -> Any:
    """Build the learning-rate scheduler.

    optimizer: the optimizer from create_optimizer.
    total_steps: the number of optimizer steps the run will take.
    Returns a torch LRScheduler, stepped once after every optimizer step (not after a step the
    optimizer skipped: an fp16 overflow, or a non-finite loss with train.on_nan = "skip"); the logged
    lr is its rate after that step.
    The first non-None result wins.
    """


# ---------------------------------------------------------------- kind: early_stopping
@hookspec(firstresult=True)
def early_stopping_check(metrics: dict[str, float], step: int) -> "EarlyStopDecision":
    """Judge one evaluation.

    metrics: everything logged at this evaluation (the eval keys under "Metrics by phase", plus any
    a plugin added in on_evaluate).
    step: the optimizer step of the evaluation.
    Returns EarlyStopDecision(improved, stop): improved makes this the best model so far (saved as
    best/ and restored at the end); stop ends training on every process.
    The first non-None result wins.
    """


# ---------------------------------------------------------------- kind: sink
@hookspec
def log_metrics(metrics: dict[str, float], step: int, phase: str) -> None:
    """Record metrics.

    metrics: names to values; the keys of each phase are listed under "Metrics by phase" below.
    step: the optimizer step they belong to.
    phase: "train" for a training log (every train.log_every_steps steps and at the last step),
    "eval" for an evaluation, "summary" once at the end (the contents of metrics.json: numbers, and
    stop_reason a string, best_val_loss None without evaluations).
    Returns nothing; every sink is called. Called on the main process only.
    """


@hookspec
def log_samples(samples: list[dict[str, Any]], step: int) -> None:
    """Record sample generations (train.sample_prompts), made at each evaluation.

    samples: one dict per prompt: "step" (int), "prompt" (str) and "text" (the continuation,
    without the prompt); the engine has already appended them to samples.jsonl in the run folder.
    step: the optimizer step of the evaluation.
    Returns nothing; every sink that implements it is called (a wandb sink shows them as a table).
    Called on the main process only.
    """


# ---------------------------------------------------------------- kind: decoding
@hookspec(firstresult=True)
def generation_kwargs(tokenizer: Any) -> dict[str, Any]:
    """Keyword arguments for transformers' `model.generate` (do_sample, temperature, num_beams...).

    tokenizer: the model's tokenizer (for pad or eos ids).
    Returns a dict. The first non-None result wins. Samples made by a training run
    (train.sample_prompt, train.sample_prompts) use train.sample_max_new_tokens instead of any
    max_new_tokens given here; `python -m engine generate` uses the plugin's own.
    """


@hookspec
def logits_processors(tokenizer: Any) -> list[Any]:
    """Extra transformers LogitsProcessor objects to apply while generating.

    tokenizer: the model's tokenizer.
    Returns a list (possibly empty); the lists of all plugins are joined.
    """


# ---------------------------------------------------------------- lifecycle: any plugin
@hookspec
def on_train_start(context: "TrainContext") -> None:
    """Training is about to start: model, optimizer, data and run folder are ready.

    context: the TrainContext (see "TrainContext" below); on a resume context.resumed is true and
    context.state holds the checkpoint's counters.
    Returns nothing. Called on every process.
    """


@hookspec
def on_step_end(context: "TrainContext", metrics: dict[str, float]) -> None:
    """An optimizer step finished.

    context: the TrainContext; context.state.step is the step just taken.
    metrics: this step's numbers: the step keys under "Metrics by phase" (loss of this step alone).
    Returns nothing. Call context.request_stop(reason) to end training after this step.
    Called on every process. Handing over floats makes the engine read the step's loss and gradient
    norm back from the GPU every step (a host-device sync); a plugin that does not need them each
    step sets the class attribute step_metrics_on_device = True, and then gets them as 0-dim device
    tensors on the steps that neither log, evaluate nor checkpoint, and the GPU never waits for it.
    """


@hookspec
def on_evaluate(context: "TrainContext", metrics: dict[str, float]) -> None:
    """An evaluation finished.

    context: the TrainContext.
    metrics: the eval keys under "Metrics by phase" (a plugin may add keys for early stopping).
    Returns nothing. Called on every process, for each evaluation during training (not for the
    final measurement of a run stopped between evaluations, which only goes to log_metrics).
    """


@hookspec
def on_train_end(context: "TrainContext", summary: dict[str, Any]) -> None:
    """Training finished and final/ is written.

    context: the TrainContext.
    summary: the contents of metrics.json.
    Returns nothing. Called on every process.
    """


# ---------------------------------------------------------------- state: any plugin
@hookspec
def plugin_state() -> dict[str, Any]:
    """State to keep in a checkpoint (an early-stopping counter, a running average).

    Returns a dict of plain values or tensors, or None for a stateless plugin. Called per plugin.
    """


@hookspec
def load_plugin_state(state: dict[str, Any]) -> None:
    """Restore what plugin_state returned, when a run resumes from a checkpoint.

    state: the dict this plugin returned from plugin_state (saved in the checkpoint).
    Returns nothing. Called per plugin, after on_train_start.
    """
