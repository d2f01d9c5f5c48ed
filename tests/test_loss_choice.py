"""train.chunked_loss: fused, plain or chunked, chosen automatically (engine.loss.choose) and all exact."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from engine import loss as loss_mod
from engine.errors import UserError


def tiny_model(vocab=128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=vocab, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_auto_takes_plain_logits_when_they_fit_and_chunks_when_they_do_not(monkeypatch):
    model, cpu = tiny_model(), torch.device("cpu")
    way, why = loss_mod.choose("auto", model, cpu, 4, 32, half=False)
    assert way == "plain" and "auto" in why and "quarter" in why
    monkeypatch.setattr(loss_mod, "memory_of", lambda device: 4 * loss_mod.logits_bytes(4, 32, 128, False) - 1)
    way, why = loss_mod.choose("auto", model, cpu, 4, 32, half=False)
    assert way == "chunked" and "over a quarter" in why
    assert loss_mod.choose("chunked", model, cpu, 4, 32, half=False)[0] == "chunked"  # asked for: kept
    assert loss_mod.choose("plain", model, cpu, 10**6, 32, half=False)[0] == "plain"


def test_auto_takes_the_fused_kernel_where_it_is_available(monkeypatch):
    monkeypatch.setattr(loss_mod, "fused_available", lambda device: True)
    way, why = loss_mod.choose("auto", tiny_model(), torch.device("cpu"), 4, 32, half=True)
    assert way == "fused" and "liger-kernel" in why


def test_auto_passes_over_a_liger_kernel_too_old_for_mixed_precision(monkeypatch):
    """liger-kernel 0.5.0-0.5.2 raise a dtype error at the first step under bf16/fp16 autocast with fp32 weights
    (its addmm of bf16 logits with fp32 hidden states, liger issue #501, fixed in 0.5.3): auto takes the plain or
    chunked way and says why; "fused" is refused naming the version."""
    cuda = torch.device("cuda")  # only the device type is looked at; memory is stood in for
    monkeypatch.setattr(loss_mod, "memory_of", lambda device: 80 << 30)
    monkeypatch.setattr(loss_mod, "liger_version", lambda: (0, 5, 2))
    way, why = loss_mod.choose("auto", tiny_model(), cuda, 4, 32, half=True)
    assert way == "plain" and "liger-kernel 0.5.2 is installed but too old, 0.5.3 or later is needed" in why
    with pytest.raises(UserError, match=r"the installed liger-kernel 0.5.2 fails under mixed precision, 0.5.3 or later"):
        loss_mod.choose("fused", tiny_model(), cuda, 4, 32, half=True)
    monkeypatch.setattr(loss_mod, "liger_version", lambda: (0, 5, 3))
    assert loss_mod.choose("auto", tiny_model(), cuda, 4, 32, half=True)[0] == "fused"
    monkeypatch.setattr(loss_mod, "liger_version", lambda: None)
    way, why = loss_mod.choose("auto", tiny_model(), cuda, 4, 32, half=True)
    assert way == "plain" and "too old" not in why


def test_fused_without_a_gpu_or_liger_is_refused_naming_the_key():
    with pytest.raises(UserError, match=r'train.chunked_loss: "fused" needs liger-kernel and a CUDA GPU \(this run is on cpu'):
        loss_mod.choose("fused", tiny_model(), torch.device("cpu"), 4, 32, half=False)


def test_recipe_takes_the_choices_and_names_the_key_on_a_bad_one():
    from engine.recipe import from_dict

    base = {"data": {"train": "x.txt"}}
    assert from_dict({**base, "train": {"chunked_loss": "plain"}}, "r.toml").train.chunked_loss == "plain"
    assert from_dict(base, "r.toml").train.chunked_loss == "auto"
    with pytest.raises(UserError, match="r.toml: train.chunked_loss: expected"):
        from_dict({**base, "train": {"chunked_loss": True}}, "r.toml")


def test_a_model_that_cuts_its_padded_vocabulary_after_the_head_uses_the_plain_loss():
    """transformers' Inkling slices logits[..., :config.unpadded_vocab_size] after lm_head. The fused and chunked
    ways apply lm_head themselves to the hidden states and would take the padding rows into the softmax. Stood
    in for by a GPT-2 that slices its logits the same way."""
    from transformers import GPT2LMHeadModel

    class Sliced(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits[..., : self.config.unpadded_vocab_size]
            return out

    torch.manual_seed(0)
    model = Sliced(tiny_model().config)
    model.config.unpadded_vocab_size = 100  # of 128
    b = batch(vocab=100)
    plain = loss_mod.token_loss_sum(model, b, "plain")[0]
    chunked = loss_mod.chunked_loss_sum(model, b, chunk_elements=8 * 128)
    torch.testing.assert_close(chunked, plain)
    assert loss_mod.output_layer(model) is None  # so fused (on CUDA) falls back to plain as well
    assert loss_mod.choose("auto", model, torch.device("cpu"), 3, 16, half=False)[0] == "plain"


def fake_liger(monkeypatch):
    """liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss as plain torch: tests the engine's plumbing
    (hidden states, shift, bias, sum over targets); the real kernel is compared in the gpu-marked test."""
    class Loss(torch.nn.Module):
        def __init__(self, ignore_index=-100, reduction="mean"):
            super().__init__()
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, weight, hidden, target, bias=None):
            logits = torch.nn.functional.linear(hidden, weight, bias).float()
            return torch.nn.functional.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction)

    package = types.ModuleType("liger_kernel")
    sub = types.ModuleType("liger_kernel.transformers")
    sub.LigerFusedLinearCrossEntropyLoss = Loss
    package.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)


def batch(vocab=128):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 16), generator=g)
    labels = ids.clone()
    labels[2, 10:] = -100  # padding is never a target
    return {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}


@pytest.mark.parametrize("way", ["fused", "chunked"])
def test_every_way_gives_the_plain_loss_and_gradients(monkeypatch, way):
    fake_liger(monkeypatch)
    b = batch()
    results = {}
    for name in ("plain", way):
        model = tiny_model()
        loss, n = loss_mod.token_loss_sum(model, b, name)
        loss.backward()
        results[name] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    assert int(n) == 3 * 15 - 6
    torch.testing.assert_close(results[way][0], results["plain"][0], rtol=1e-5, atol=1e-5)
    for key, grad in results["plain"][1].items():
        torch.testing.assert_close(results[way][1][key], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_liger_fused_loss_equals_the_plain_loss_on_cuda(precision):
    """The real kernel against the plain loss: summed over targets (reduction "sum", padding ignored), with
    GPT-2's tied lm_head/embedding gradient, in fp32 and under the bf16/fp16 autocast of a mixed-precision run
    (Accelerate hands the loss fp32 hidden states, convert_outputs_to_fp32; the kernel's matmuls then run
    in the autocast dtype)."""
    pytest.importorskip("liger_kernel")
    b = {k: v.cuda() for k, v in batch().items()}
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    results = {}
    for name in ("plain", "fused"):
        model = tiny_model().cuda()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = loss_mod.token_loss_sum(model, b, name)
        (loss / 100).backward()  # a scale other than 1, as the step applies (liger's backward multiplies by it)
        results[name] = (loss.detach(), model.lm_head.weight.grad.clone(), model.transformer.h[0].attn.c_attn.weight.grad.clone())
    assert results["fused"][0].dtype == torch.float32
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype is None else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(results["fused"][0], results["plain"][0], **tol)
    for i in (1, 2):  # the tied embedding/output weight, and a weight reached through the hidden states
        fused, plain = results["fused"][i], results["plain"][i]
        if dtype is None:
            torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-6)
        else:  # half-precision matmuls in a different order: compare the whole gradient
            assert float((fused - plain).norm() / plain.norm()) < 2e-2
