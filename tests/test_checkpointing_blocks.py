"""train.gradient_checkpointing: non-reentrant, and selective with train.checkpoint_every."""

from __future__ import annotations

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
