"""Speed features: chunked cross-entropy, vocabulary padding, tokenization cache, micro-batch sizing, bench."""

import json

import pytest
import torch

from engine import loss as loss_mod
from engine.testing import run_recipe, tiny_recipe
from tests.conftest import run_cli


def _tiny_gpt2(vocab=300, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(config).double()


def _batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, loss_mod.IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, fn):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_loss_equals_plain_loss_and_gradients(lora):
    vocab = 300
    model = _tiny_gpt2(vocab)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False))
    assert loss_mod.output_layer(model) is not None
    batch = _batch(vocab)
    # a chunk budget of 7 rows of logits: the 117 targets go through 17 chunks
    chunked = lambda m, b: loss_mod.chunked_loss_sum(m, b, chunk_elements=7 * vocab)  # noqa: E731
    plain_loss, plain_grads = _loss_and_grads(model, batch, loss_mod.plain_loss_sum)
    chunk_loss, chunk_grads = _loss_and_grads(model, batch, chunked)
    assert plain_grads.keys() == chunk_grads.keys() and len(plain_grads) > 0
    if lora:
        assert all("lora_" in n for n in plain_grads)
    torch.testing.assert_close(chunk_loss.double(), plain_loss.double(), rtol=1e-6, atol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(chunk_grads[name], plain_grads[name], rtol=1e-6, atol=1e-6, msg=name)
    # the identity swap is undone: the model returns real logits again
    assert model(input_ids=batch["input_ids"]).logits.shape[-1] == vocab


def test_chunked_loss_never_holds_full_logits():
    """Largest tensor saved for backward: the plain loss keeps fp32 logits of the whole batch, the chunked one does not."""
    vocab = 4096
    model = _tiny_gpt2(vocab).float()
    batch = _batch(vocab)

    def saved_bytes(fn):
        sizes = [0]
        params = {p.data_ptr() for p in model.parameters()}

        def pack(t):
            if t.data_ptr() not in params:  # weights are saved either way
                sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(model, batch)
        return max(sizes)

    full_logits = batch["labels"][:, 1:].numel() * vocab * 4  # fp32 logits of every target
    assert saved_bytes(loss_mod.plain_loss_sum) >= full_logits
    chunked = lambda m, b: loss_mod.chunked_loss_sum(m, b, chunk_elements=16 * vocab)  # noqa: E731
    assert saved_bytes(chunked) < full_logits / 4
