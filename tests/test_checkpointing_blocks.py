"""train.gradient_checkpointing: non-reentrant, and selective with train.checkpoint_every."""

from __future__ import annotations

import json

import pytest
import torch

from engine import model as model_mod


def four_block_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_head=2, n_embd=32, n_positions=32, vocab_size=64, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def grads_and_saved_bytes(model):
    """Gradients of one step, and the bytes autograd keeps for backward (what checkpointing saves)."""
    from engine.benchmarks.memory import saved_activation_bytes

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 32), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    model.train()
    saved = saved_activation_bytes(model, batch, False)
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, saved


@pytest.mark.parametrize("every, flags", [(1, [True] * 4), (2, [True, False, True, False]), (3, [True, False, False, True])])
def test_checkpoint_every_k_th_block_non_reentrant_with_the_same_gradients(every, flags):
    plain_grads, plain_saved = grads_and_saved_bytes(four_block_model())
    model = four_block_model()
    model_mod.enable_gradient_checkpointing(model, every)
    assert model_mod.checkpointed_blocks(model) == flags
    layer = model.transformer.h[0]
    assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
    grads, saved = grads_and_saved_bytes(model)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)
    assert saved < plain_saved  # checkpointed blocks keep only their inputs
    if every > 1:
        _, all_saved = grads_and_saved_bytes(_checkpointed(1))
        assert all_saved < saved  # fewer checkpointed blocks: more kept, less recomputed


def _checkpointed(every):
    model = four_block_model()
    model_mod.enable_gradient_checkpointing(model, every)
    return model


def test_checkpoint_every_is_a_recipe_key_with_a_lower_bound():
    from engine.errors import UserError
    from engine.recipe import from_dict

    base = {"data": {"train": "x.txt"}}
    assert from_dict({**base, "train": {"checkpoint_every": 2}}, "r.toml").train.checkpoint_every == 2
    with pytest.raises(UserError, match="r.toml: train.checkpoint_every"):
        from_dict({**base, "train": {"checkpoint_every": 0}}, "r.toml")


@pytest.mark.slow  # two runs, ~14 s on a shared CPU
def test_gradient_checkpointing_through_the_engine_gives_the_same_run(tmp_path):
    """train.gradient_checkpointing = true in a real run: the model checkpoints while training, and (fp32,
    dropout 0) the losses and the saved weights equal those of the same run without it."""
    from safetensors.torch import load_file

    from engine import hookimpl
    from engine.testing import inline_plugin, run_recipe, tiny_recipe

    seen = []

    class Watch:
        @hookimpl
        def on_step_end(self, context, metrics):
            model = context.model
            seen.append((model.training, model.is_gradient_checkpointing))

        @hookimpl
        def log_metrics(self, metrics, step, phase):
            pass

    no_dropout = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64,
                  "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}

    def run(folder, checkpointing):
        recipe = tiny_recipe(tmp_path / folder, sinks=["jsonl", "watch"], train={"max_steps": 4, "gradient_checkpointing": checkpointing})
        recipe["model"]["config"] = no_dropout
        with inline_plugin("sink", "watch", Watch):
            run_recipe(recipe)
        run_dir = tmp_path / folder / "run"
        losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        return losses, load_file(run_dir / "final" / "model.safetensors")

    plain_losses, plain_weights = run("plain", False)
    assert seen and not any(flag for _, flag in seen)
    seen.clear()
    losses, weights = run("checkpointed", True)
    assert seen and all(training and flag for training, flag in seen)  # checkpointing on during training
    assert len(losses) == 4
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-6)
    assert weights.keys() == plain_weights.keys()
    for name, value in plain_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6)
