"""Batches prepared ahead (engine/feed.py): the same order and exact resume, host-side token counts, fixed
shapes for train.compile, and masks left out only where that changes nothing."""

from __future__ import annotations

import torch

from engine import data as data_mod
from engine import feed


def blocks(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 50, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g) for _ in range(n)]


def walk(feeder, start_step, epoch, step_in_epoch, total, per_epoch):
    """The positions the loop asks for, and what it gets."""
    feeder.start(start_step, epoch, step_in_epoch)
    got = []
    for _ in range(start_step, total):
        if step_in_epoch >= per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        ready = feeder.get(epoch, step_in_epoch)
        got.append((epoch, step_in_epoch, [b["input_ids"].tolist() for b in ready.batches], ready.tokens))
        step_in_epoch += 1
    feeder.close()
    return got


def test_the_feeder_gives_the_loops_batches_in_the_same_order_and_resumes_exactly():
    data, per_epoch, total = blocks(), 23 // 4, 12  # 5 steps per epoch of 4 blocks; 12 steps cross two epoch ends
    make = lambda: feed.Feeder(data, 7, per_epoch, total, 2, 2, 0, 1, pad_id=0)  # noqa: E731
    ahead = walk(make(), 0, 0, 0, total, per_epoch)
    # what the loop computed inline before: data.step_batches + collate, step by step
    inline, epoch, k = [], 0, 0
    for _ in range(total):
        if k >= per_epoch:
            epoch, k = epoch + 1, 0
        micro = data_mod.step_batches(len(data), 7, epoch, k, 2, 2, 0, 1)
        batches = [data_mod.collate([data[i] for i in ids], 0) for ids in micro]
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        inline.append((epoch, k, [b["input_ids"].tolist() for b in batches], tokens))
        k += 1
    assert ahead == inline
    # resumed at step 7 (epoch 1, step 2 of it): the very next batches
    assert walk(make(), 7, 1, 2, total, per_epoch) == inline[7:]
    # resumed from a checkpoint written at an epoch end (step_in_epoch == per_epoch)
    assert walk(make(), 5, 0, 5, total, per_epoch) == inline[5:]


def test_step_tokens_are_counted_for_every_process_on_the_host():
    data = blocks()
    per_rank = [feed.Feeder(data, 3, 2, 2, 2, 1, rank, 2, pad_id=0).prepare(0, 1) for rank in (0, 1)]
    mine = [sum(int((b["labels"][:, 1:] != -100).sum()) for b in p.batches) for p in per_rank]
    assert per_rank[0].tokens == per_rank[1].tokens == sum(mine)


def test_fixed_width_batches_have_one_shape_and_no_mask():
    data = blocks()
    feeder = feed.Feeder(data, 3, 5, 5, 4, 1, 0, 1, pad_id=0, fixed_width=16)
    shapes = {tuple(b["input_ids"].shape) for k in range(5) for b in feeder.prepare(0, k).batches}
    assert shapes == {(4, 16)}
    assert all("attention_mask" not in b for k in range(5) for b in feeder.prepare(0, k).batches)
    eager = feed.Feeder(data, 3, 5, 5, 4, 1, 0, 1, pad_id=0).prepare(0, 0)
    assert feeder.prepare(0, 0).tokens == eager.tokens  # padding adds no targets
    assert "attention_mask" in eager.batches[0]  # padded and not fixed: the mask is kept


def test_a_right_padded_batch_without_its_mask_gives_the_same_loss_and_gradients():
    """Why fixed-width batches may leave the mask out: a causal model never looks right of a token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.loss import token_loss_sum

    data = blocks(4)
    batch, _ = feed.host_batch(data, pad_id=0, fixed_width=12)
    masked = data_mod.collate(data, 0)
    masked = {k: torch.nn.functional.pad(v, (0, 12 - v.shape[1]), value={"input_ids": 0, "attention_mask": 0, "labels": -100}[k])
              for k, v in masked.items()}
    results = []
    for b in (masked, batch):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=64, bos_token_id=0,
                                           eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        loss, _ = token_loss_sum(model, b, "plain")
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
