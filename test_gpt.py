"""Property tests: gpt.py is what its comments say it is.

Run with:  python -m pytest -q test_gpt.py

The models here are tiny (a few thousand parameters) so that hypothesis can try many shapes
quickly on a CPU. Where an independent reference exists, we compare with it: the written-out
attention against the fused kernel, the KV cache against full recomputation, a checkpoint
against the model that wrote it, and the whole model against Hugging Face's GPT-2.
"""

import contextlib
import copy
import http.server
import io
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import types
import zipfile
from xml.etree import ElementTree
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import gpt

HERE = Path(__file__).parent
SHAKESPEARE = (HERE / "input.txt").read_text(encoding="utf-8")
# Every property test decides the same way in every run: its examples are drawn from a seed made
# from the test itself (derandomize), and the edge cases it exists for are also given as explicit
# @examples, which run first, every time. HYPOTHESIS_PROFILE=explore draws new examples each run.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
quick = settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@st.composite
def configs(draw, max_block=16):
    """Tiny models of both kinds of positions: GPT-2's learned ones and RoPE (even head sizes)."""
    n_head, pos = draw(st.integers(1, 3)), draw(st.sampled_from(["learned", "rope"]))
    return gpt.GPTConfig(
        vocab_size=draw(st.integers(2, 20)),
        block_size=draw(st.integers(2, max_block)),
        n_layer=draw(st.integers(1, 2)),
        n_head=n_head,
        n_embd=n_head * (2 * draw(st.integers(1, 3)) if pos == "rope" else draw(st.integers(2, 6))),
        bias=draw(st.booleans()),
        pos=pos,
    )


def tiny_model(config, seed=0, scale=0.5, dtype=torch.float64):
    """A model with large random weights (LayerNorm gains included), so that any leak of
    information shows up as a large change in the logits, not a rounding-sized one."""
    torch.manual_seed(seed)
    model = gpt.GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model.to(dtype).eval()


def attention(written_out):
    """The written-out attention everywhere inside it, or gpt.py's own choice."""
    return gpt.attention_forced("written out") if written_out else contextlib.nullcontext()


def run_gpt(*args, cwd=None, timeout=120, **kwargs):
    return subprocess.run([sys.executable, str(HERE / "gpt.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, **kwargs)


def train_cfg(tmp_path, text=SHAKESPEARE[:20000], **overrides):
    data = tmp_path / "data.txt"
    data.write_text(text, encoding="utf-8")
    settings_ = dict(data=str(data), out_dir=str(tmp_path / "out"), device="cpu", dtype="float32", n_layer=1,
                     n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=20, eval_interval=10, eval_iters=2,
                     warmup_iters=2, dropout=0.0)  # no dropout unless a test asks: runs compared exactly
    return gpt.TrainConfig(**{**settings_, **overrides})


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small character-level run, trained once for the tests that need a checkpoint."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = train_cfg(tmp, max_iters=30)
    gpt.train(cfg)
    return Path(cfg.out_dir)


def folder_bytes(folder):
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# the model is GPT-2
# ---------------------------------------------------------------------------------------------

def test_gpt2_small_shape_has_exactly_124_439_808_parameters():
    # The figure Hugging Face reports for GPT2LMHeadModel("gpt2"): weights tied, biases in.
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert model.num_parameters() == 124_439_808


def test_parameter_names_follow_the_gpt2_checkpoint():
    names = set(gpt.GPT(gpt.GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=8)).state_dict())
    for layer in range(2):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            assert {f"transformer.h.{layer}.{part}.weight", f"transformer.h.{layer}.{part}.bias"} <= names
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"} <= names


@quick
@given(n_layer=st.integers(1, 8), seed=st.integers(0, 2**16))
@example(n_layer=1, seed=0)  # one block: its two c_proj scaled by 1/sqrt(2)
@example(n_layer=8, seed=1)
def test_initialisation_is_gpt2s(n_layer, seed):
    torch.manual_seed(seed)
    config = gpt.GPTConfig(vocab_size=2000, block_size=512, n_layer=n_layer, n_head=4, n_embd=64)
    model = gpt.GPT(config)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):  # residual projections: 0.02 / sqrt(2 * n_layer)
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(2 * config.n_layer), rel=0.1)
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.1)
            assert abs(p.mean().item()) < 0.002
        elif name.endswith(".bias"):
            assert torch.all(p == 0)
        else:  # LayerNorm gains
            assert torch.all(p == 1)


def test_the_lm_head_is_the_token_embedding():
    model = gpt.GPT(gpt.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        model.transformer.wte.weight[3, 0] = 42.0
    assert model.lm_head.weight[3, 0] == 42.0


# Explicit examples of both kinds of positions, at their smallest and at a full context.
LEARNED = gpt.GPTConfig(vocab_size=7, block_size=5, n_layer=2, n_head=2, n_embd=6, pos="learned")
ROPE = gpt.GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=1, n_embd=4, bias=False, pos="rope")


@quick
@given(config=configs(), batch=st.integers(1, 4), length=st.integers(1, 16))
@example(config=LEARNED, batch=1, length=1)
@example(config=ROPE, batch=3, length=5)  # T = block_size
def test_logits_are_batch_by_time_by_vocab(config, batch, length):
    T = min(length, config.block_size)
    model = tiny_model(config)
    idx = torch.randint(config.vocab_size, (batch, T))
    logits, loss = model(idx)
    assert logits.shape == (batch, T, config.vocab_size) and loss is None
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (batch, T, config.vocab_size) and loss.dim() == 0


@quick
@given(config=configs(), extra=st.integers(1, 5))
@example(config=LEARNED, extra=1)  # one token past the last position
@example(config=ROPE, extra=1)
def test_a_sequence_longer_than_block_size_is_an_error(config, extra):
    model = tiny_model(config)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros((1, config.block_size + extra), dtype=torch.long))


@quick
@given(config=configs(), batch=st.integers(1, 3), length=st.integers(2, 16), position=st.integers(1, 15),
       shift=st.integers(1, 19), path=st.sampled_from(["default", "written_out", "bfloat16 training"]))
@example(config=LEARNED, batch=1, length=5, position=4, shift=1, path="default")  # the last position changes
@example(config=LEARNED, batch=2, length=5, position=1, shift=3, path="written_out")  # the first that can
@example(config=ROPE, batch=1, length=5, position=4, shift=1, path="bfloat16 training")
@example(config=ROPE, batch=1, length=2, position=1, shift=6, path="written_out")
def test_changing_a_future_token_never_changes_past_logits(config, batch, length, position, shift, path):
    assume(config.n_embd >= 4)  # a LayerNorm over 2 channels keeps only a sign: too little to see a change
    T = min(length, config.block_size)
    t = min(position, T - 1)  # the position we change
    model = tiny_model(config, dtype=torch.float32)
    idx = torch.randint(config.vocab_size, (batch, T))
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1 + (shift - 1) % (config.vocab_size - 1)) % config.vocab_size
    if path == "bfloat16 training":  # the path a CPU trains on: autocast, gradients on
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before, after = model(idx)[0], model(changed)[0]
    else:
        with torch.no_grad(), attention(path == "written_out"):
            before, after = model(idx)[0], model(changed)[0]
    assert torch.equal(before[:, :t], after[:, :t])
    assert not torch.equal(before[:, t:], after[:, t:])  # the change is visible from t on


@quick
@given(batch=st.integers(1, 3), n_head=st.integers(1, 4), head_size=st.integers(1, 16), Tk=st.integers(1, 40),
       one_query=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
@example(batch=1, n_head=1, head_size=1, Tk=1, one_query=False, dtype=torch.float64)  # a single position
@example(batch=2, n_head=3, head_size=8, Tk=40, one_query=True, dtype=torch.float32)  # one new token, a long past
@example(batch=2, n_head=3, head_size=8, Tk=40, one_query=False, dtype=torch.float32)
def test_written_out_attention_agrees_with_the_fused_kernel(batch, n_head, head_size, Tk, one_query, dtype):
    Tq = 1 if one_query else Tk  # one new token with a KV cache, or training
    q = torch.randn(batch, n_head, Tq, head_size, dtype=dtype)
    k, v = (torch.randn(batch, n_head, Tk, head_size, dtype=dtype) for _ in range(2))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(gpt.causal_attention_written_out(q, k, v), gpt.causal_attention_fused(q, k, v),
                               atol=tolerance, rtol=tolerance)


@quick
@given(batch=st.integers(1, 3), n_head=st.integers(1, 3), head_size=st.integers(1, 8), Tk=st.integers(2, 30),
       queries=st.integers(1, 30))
@example(batch=1, n_head=1, head_size=2, Tk=30, queries=1)  # one query after many keys
@example(batch=1, n_head=2, head_size=2, Tk=9, queries=8)  # several queries after one key
def test_written_out_attention_for_the_last_queries_equals_the_last_rows_of_full_attention(batch, n_head, head_size,
                                                                                           Tk, queries):
    Tq = min(queries, Tk)
    q, k, v = (torch.randn(batch, n_head, Tk, head_size, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(gpt.causal_attention_written_out(q[:, :, -Tq:], k, v),
                               gpt.causal_attention_written_out(q, k, v)[:, :, -Tq:])
    torch.testing.assert_close(gpt.causal_attention_fused(q[:, :, -Tq:], k, v),
                               gpt.causal_attention_fused(q, k, v)[:, :, -Tq:])


def test_written_out_attention_is_the_textbook_formula():
    # An independent loop over positions: position t averages the values of positions <= t.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64) for _ in range(3))
    expected = torch.empty_like(q)
    for t in range(7):
        weights = torch.softmax(q[:, :, t:t + 1] @ k[:, :, :t + 1].transpose(-1, -2) / 2.0, dim=-1)  # sqrt(4) = 2
        expected[:, :, t] = (weights @ v[:, :, :t + 1])[:, :, 0]
    torch.testing.assert_close(gpt.causal_attention_written_out(q, k, v), expected)


@quick
@given(config=configs(), length=st.integers(1, 16))
@example(config=LEARNED, length=5)
@example(config=ROPE, length=1)
def test_the_model_agrees_with_itself_through_both_attentions(config, length):
    model = tiny_model(config)
    idx = torch.randint(config.vocab_size, (2, min(length, config.block_size)))
    with torch.no_grad():
        fused = model(idx)[0]
        with attention(written_out=True):
            written = model(idx)[0]
    torch.testing.assert_close(fused, written, atol=1e-10, rtol=1e-10)


@quick
@given(vocab_size=st.integers(10, 500), seed=st.integers(0, 2**16))
@example(vocab_size=10, seed=0)
@example(vocab_size=500, seed=1)
def test_the_initial_loss_is_about_ln_vocab_size(vocab_size, seed):
    # GPT-2's small initial weights give nearly uniform predictions: loss = ln(V). (With a
    # handful of tokens the tied embedding favours repeating the input token a little.)
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(vocab_size, (4, 32))
    _, loss = model(idx, targets=torch.randint(vocab_size, (4, 32)))
    assert loss.item() == pytest.approx(math.log(vocab_size), abs=0.1)


def take_step(model, optimizer, micro_batches, grad_clip=1.0, scaler=None):
    """One gpt.train_step over the given micro-batches ((x, y) pairs, in order), without autocast."""
    queue = list(micro_batches)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    return gpt.train_step(model, optimizer, scaler, lambda: queue.pop(0), len(micro_batches),
                          gpt.autocast(torch.device("cpu"), torch.float32), grad_clip)


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = gpt.GPT(config)
    optimizer = gpt.make_optimizer(model, gpt.TrainConfig(lr=3e-3, weight_decay=0.0))
    x, y = torch.randint(20, (4, 16)), torch.randint(20, (4, 16))
    first = None
    for _ in range(300):
        loss = take_step(model, optimizer, [(x, y)])
        first = first if first is not None else loss.item()
    assert first > 2.9 and loss.item() < 0.05  # from ln(20) = 3.0 to memorised


# The training step, against arithmetic done here: plain SGD (w <- w - lr * gradient) makes the
# gradient the optimizer sees readable in the weights, and autograd on a copy of the model
# computes the gradient of the whole batch's mean loss without gpt.train_step. (The loss is
# computed in float32 even for a float64 model, hence tolerances of float32's rounding.)

class RecordingSGD(torch.optim.SGD):
    """SGD that notes the global norm of the gradient it is given at each step."""
    def step(self, closure=None):
        grads = [p.grad.flatten() for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.seen = torch.cat(grads).norm().item()
        return super().step(closure)


def step_model(seed=0, dtype=torch.float64):
    config = gpt.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    return tiny_model(config, seed, scale=0.3, dtype=dtype).train()


def random_batches(count, batch, seed, T=8, vocab=11):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(vocab, (batch, T), generator=generator), torch.randint(vocab, (batch, T), generator=generator))
            for _ in range(count)]


def whole_batch_gradient(model, micro_batches):
    """The gradient of the mean loss over every sequence of the micro-batches (of equal size)."""
    model = copy.deepcopy(model)
    x, y = (torch.cat(parts) for parts in zip(*micro_batches))
    model(x, y)[1].backward()
    return [p.grad for p in model.parameters()]


@quick
@given(grad_accum=st.integers(2, 8), batch=st.integers(1, 3), seed=st.integers(0, 99), clip=st.sampled_from([1e-3, 1e6]))
@example(grad_accum=8, batch=1, seed=0, clip=1e6)  # eight micro-batches of one sequence, never clipped
@example(grad_accum=2, batch=3, seed=1, clip=1e-3)  # clipped: the accumulated gradient, not each micro-batch's
def test_grad_accum_micro_batches_take_the_step_of_one_batch_as_large_as_all_of_them(grad_accum, batch, seed, clip):
    micro_batches = random_batches(grad_accum, batch, seed)
    models = [step_model(seed) for _ in range(2)]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in models]
    accumulated = take_step(models[0], optimizers[0], micro_batches, grad_clip=clip)
    x, y = (torch.cat(parts) for parts in zip(*micro_batches))
    whole = take_step(models[1], optimizers[1], [(x, y)], grad_clip=clip)
    assert accumulated.item() == pytest.approx(whole.item(), rel=1e-6)  # the mean loss of every sequence
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    if clip > 1:  # unclipped, the step is -lr times the gradient of the whole batch
        start = step_model(seed)
        for before, after, grad in zip(start.parameters(), models[0].parameters(), whole_batch_gradient(start, micro_batches)):
            torch.testing.assert_close(after, before - 0.1 * grad, rtol=1e-6, atol=1e-8)


@quick
@given(factor=st.floats(0.05, 3.0), grad_accum=st.integers(1, 3), seed=st.integers(0, 99))
@example(factor=0.5, grad_accum=2, seed=0)  # a gradient twice as long as grad_clip: halved
@example(factor=2.0, grad_accum=1, seed=1)  # shorter than grad_clip: untouched
def test_clipping_bounds_the_gradient_norm_the_optimizer_sees_and_leaves_a_smaller_one_alone(factor, grad_accum,
                                                                                             seed):
    micro_batches = random_batches(grad_accum, 2, seed)
    model = step_model(seed)
    norm = torch.cat([g.flatten() for g in whole_batch_gradient(model, micro_batches)]).norm().item()
    optimizer = RecordingSGD(model.parameters(), lr=0.1)
    take_step(model, optimizer, micro_batches, grad_clip=factor * norm)
    assert optimizer.seen == pytest.approx(min(norm, factor * norm), rel=1e-5)  # clip_grad_norm_ adds 1e-6 to the norm


def test_with_loss_scaling_clipping_and_the_optimizer_see_the_true_gradient():
    # float16 training multiplies the loss by the scaler's factor (65,536 at first); the gradient
    # must be divided back before clipping measures it.
    micro_batches = random_batches(2, 2, seed=3)
    for factor in (0.5, 2.0):  # clipped, and not
        model = step_model(3, dtype=torch.float32)
        norm = torch.cat([g.flatten() for g in whole_batch_gradient(model, micro_batches)]).norm().item()
        optimizer = RecordingSGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=True)
        take_step(model, optimizer, micro_batches, grad_clip=factor * norm, scaler=scaler)
        assert scaler.get_scale() > 1 and optimizer.seen == pytest.approx(min(norm, factor * norm), rel=1e-4)


def test_each_steps_gradient_starts_from_zero():
    first, second = random_batches(2, 2, seed=5)
    model = step_model(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    take_step(model, optimizer, [first], grad_clip=1e6)
    take_step(model, optimizer, [second], grad_clip=1e6)
    expected = step_model(5)  # the same two steps by hand
    for batch in (first, second):
        grads = whole_batch_gradient(expected, [batch])
        with torch.no_grad():
            for p, grad in zip(expected.parameters(), grads):
                p -= 0.1 * grad
    for a, b in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # nothing left for the next step


def test_evaluation_runs_without_dropout_and_gives_the_model_back_in_training_mode():
    config = gpt.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.5)
    model = tiny_model(config, scale=0.3).train()
    batches = random_batches(4, 3, seed=2)
    no_autocast = gpt.autocast(torch.device("cpu"), torch.float32)
    losses = [gpt.estimate_loss(model, batches, no_autocast).item() for _ in range(2)]
    assert model.training
    with torch.no_grad():
        expected = [model.eval()(x, y)[1].item() for x, y in batches]
    assert losses == [pytest.approx(sum(expected) / 4, rel=1e-6)] * 2
    with torch.no_grad():  # with dropout, the same batches would score otherwise
        assert [model.train()(x, y)[1].item() for x, y in batches] != pytest.approx(expected)


@quick
@given(warmup=st.integers(0, 50), decay=st.integers(60, 400), lr=st.floats(1e-4, 1e-2), floor=st.floats(0, 1))
@example(warmup=0, decay=60, lr=1e-3, floor=0.0)  # no warm-up, decay to 0
@example(warmup=50, decay=400, lr=1e-2, floor=1.0)  # min_lr = lr: flat after the warm-up
@example(warmup=10, decay=110, lr=1e-3, floor=0.1)  # an even cosine: its middle is checked
def test_the_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_min_lr(warmup, decay, lr, floor):
    min_lr = lr * floor
    cfg = gpt.TrainConfig(lr=lr, min_lr=min_lr, warmup_iters=warmup, max_iters=decay)
    rates = [gpt.learning_rate(step, cfg) for step in range(decay + 20)]
    for step in range(warmup):  # linear: equal increments, reaching lr at the last warm-up step
        assert rates[step] == pytest.approx(lr * (step + 1) / warmup)
    assert max(rates) == pytest.approx(lr)
    after = rates[warmup:decay]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # never rises after the warm-up
    middle = warmup + (decay - warmup) // 2  # half-way through the cosine: half-way between lr and min_lr
    if (decay - warmup) % 2 == 0:
        assert rates[middle] == pytest.approx((lr + min_lr) / 2)
    assert all(r == pytest.approx(min_lr) for r in rates[decay:])


def test_weight_decay_applies_to_matrices_only():
    model = gpt.GPT(gpt.GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=8))
    optimizer = gpt.make_optimizer(model, gpt.TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (name.endswith(".weight") and ".ln_" not in name and "ln_f" not in name), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# RoPE: rotary position embeddings (the model tests above draw RoPE models too)
# ---------------------------------------------------------------------------------------------

@quick
@given(half=st.integers(1, 16), T=st.integers(1, 20), start=st.integers(0, 10_000), seed=st.integers(0, 99))
@example(half=1, T=1, start=0, seed=0)  # one pair at position 0: no turn at all
@example(half=16, T=20, start=10_000, seed=1)  # far positions, where the slowest pairs still turn
def test_rope_is_a_rotation_of_each_pair_by_its_positions_angle(half, T, start, seed):
    # By hand, as complex numbers: channel j and channel j + hs/2 form z_j, turned by e^(i m theta_j).
    hs, positions = 2 * half, torch.arange(start, start + T)
    x = torch.randn(2, 3, T, hs, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    rotated = gpt.apply_rope(x, *gpt.rope_angles(positions, hs))
    theta = torch.tensor([10000.0 ** (-2 * j / hs) for j in range(half)], dtype=torch.float64)
    turn = torch.polar(torch.ones(T, half, dtype=torch.float64), positions[:, None].double() * theta)  # e^(i m theta)
    z = torch.complex(x[..., :half], x[..., half:]) * turn
    torch.testing.assert_close(rotated, torch.cat([z.real, z.imag], dim=-1))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # lengths are kept


@quick
@given(half=st.integers(1, 16), m=st.integers(0, 4096), n=st.integers(0, 4096), shift=st.integers(0, 4096),
       seed=st.integers(0, 99))
@example(half=1, m=5, n=5, shift=4096, seed=0)  # the same position
@example(half=16, m=0, n=4096, shift=1, seed=1)  # as far apart as drawn
def test_a_rope_score_depends_only_on_how_far_apart_the_two_positions_are(half, m, n, shift, seed):
    hs = 2 * half
    q, k = torch.randn(2, 1, 1, 1, hs, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def score(query_position, key_position):
        rotated_q = gpt.apply_rope(q, *gpt.rope_angles(torch.tensor([query_position]), hs))
        rotated_k = gpt.apply_rope(k, *gpt.rope_angles(torch.tensor([key_position]), hs))
        return (rotated_q * rotated_k).sum().item()
    assert score(m + shift, n + shift) == pytest.approx(score(m, n), rel=1e-9, abs=1e-9)


@quick
@given(config=configs())
@example(config=gpt.GPTConfig(vocab_size=2, block_size=2, n_layer=1, n_head=1, n_embd=1))
def test_a_rope_model_has_the_learned_models_parameters_but_wpe_and_saves_no_angles(config):
    config = gpt.dataclasses.replace(config, n_embd=2 * config.n_embd)  # an even head size, for RoPE
    learned = gpt.GPT(gpt.dataclasses.replace(config, pos="learned"))
    rope = gpt.GPT(gpt.dataclasses.replace(config, pos="rope"))
    assert rope.num_parameters() == learned.num_parameters() - config.block_size * config.n_embd
    assert not any("wpe" in name for name in rope.state_dict())
    rope(torch.zeros((1, 2), dtype=torch.long))  # computes the angles, once
    assert rope.rope_cache and set(rope.state_dict()) == {name for name in learned.state_dict() if "wpe" not in name}


def test_an_odd_head_size_cannot_take_rope():
    with pytest.raises(gpt.GPTError, match="head size.*even"):
        gpt.GPTConfig(n_embd=12, n_head=4, pos="rope")


def test_a_rope_run_saves_resumes_and_samples_with_rope(tmp_path):
    cfg = train_cfg(tmp_path, pos="rope", max_iters=10, eval_interval=5)
    gpt.train(cfg)
    checkpoint = gpt.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert checkpoint["config"]["pos"] == "rope" and checkpoint["train_args"]["pos"] == "rope"
    model, _ = gpt.model_from_checkpoint(checkpoint)
    assert model.config.pos == "rope" and not hasattr(model.transformer, "wpe")
    resumed, saved = gpt.resumed_config({"resume": True, "out_dir": str(tmp_path / "out"), "max_iters": 12})
    assert gpt.train(resumed, saved)["step"] == 12
    assert gpt.load_checkpoint(tmp_path / "out" / "last.pt")["config"]["pos"] == "rope"
    conflicting = run_gpt("train", "--resume", "--out-dir", tmp_path / "out", "--pos", "learned")
    assert conflicting.returncode == 1 and "--pos learned" in conflicting.stderr and "pos rope" in conflicting.stderr
    sampled = run_gpt("sample", "--out-dir", tmp_path / "out", "--prompt", "KING", "--max-new-tokens", 40)
    assert sampled.returncode == 0 and sampled.stdout.startswith("KING"), sampled.stderr


def test_fine_tuning_a_checkpoint_at_a_longer_context_needs_rope(tmp_path):
    for pos in ("rope", "learned"):
        (tmp_path / pos).mkdir()
        gpt.train(train_cfg(tmp_path / pos, pos=pos, max_iters=4, eval_interval=4))  # block_size 16
    data = str(tmp_path / "rope" / "data.txt")
    longer = gpt.train(train_cfg(tmp_path / "rope", out_dir=str(tmp_path / "rope-32"),
                                 init_from=str(tmp_path / "rope" / "out" / "ckpt.pt"), block_size=32, max_iters=4,
                                 eval_interval=2, n_layer=None, n_head=None, n_embd=None))
    tuned = gpt.load_checkpoint(tmp_path / "rope-32" / "last.pt")
    assert tuned["config"]["block_size"] == 32 and tuned["config"]["pos"] == "rope" and longer["step"] == 4
    assert [h["step"] for h in tuned["history"]] == [0, 2, 4]  # a new run, evaluated at 32 before any step
    refused = run_gpt("train", "--init-from", tmp_path / "learned" / "out" / "ckpt.pt", "--data", data,
                      "--out-dir", tmp_path / "learned-32", "--block-size", 32)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--block-size 32" in refused.stderr and "--pos rope" in refused.stderr and "16" in refused.stderr
    assert not (tmp_path / "learned-32").exists()
    gpt.train(train_cfg(tmp_path / "learned", out_dir=str(tmp_path / "learned-8"), block_size=8,
                        init_from=str(tmp_path / "learned" / "out" / "ckpt.pt"), max_iters=1, eval_interval=1,
                        lr=1e-12, min_lr=0.0, n_layer=None, n_head=None, n_embd=None))
    learned = gpt.load_checkpoint(tmp_path / "learned" / "out" / "ckpt.pt")["model_state"]["transformer.wpe.weight"]
    cropped = gpt.load_checkpoint(tmp_path / "learned-8" / "ckpt.pt")["model_state"]["transformer.wpe.weight"]
    assert cropped.shape == (8, 16)  # a shorter context keeps the first positions (the step barely moved them)
    torch.testing.assert_close(cropped, learned[:8], atol=1e-6, rtol=0)
    for folder, block_size in (("learned-8", 4), ("rope-32", 64)):  # a resumed run keeps the shape it was trained at
        refused = run_gpt("train", "--resume", "--out-dir", tmp_path / folder, "--max-iters", 9, "--block-size", block_size)
        assert refused.returncode == 1 and f"--block-size {block_size} does not match" in refused.stderr, refused.stderr


# ---------------------------------------------------------------------------------------------
# tokenizers and data
# ---------------------------------------------------------------------------------------------

@quick
@given(text=st.text(max_size=30), more=st.text(min_size=1, max_size=10))
@example(text="", more="a")  # an empty text
@example(text="é日本🙂\n\r\t\x00", more="\U0010ffff")  # multi-byte characters, control characters
def test_the_char_tokenizer_round_trips_any_text_over_its_vocabulary(text, more):
    tokenizer = gpt.CharTokenizer.from_text(more + text)  # a vocabulary with characters the text does not use
    ids = tokenizer.encode(text)
    assert len(ids) == len(text) and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8") == text


def test_the_char_vocabulary_of_input_txt_is_its_sorted_characters():
    tokenizer = gpt.CharTokenizer.from_text(SHAKESPEARE)
    assert tokenizer.chars == "".join(sorted(set(SHAKESPEARE)))
    assert 60 <= tokenizer.vocab_size <= 80


def test_a_character_outside_the_vocabulary_is_an_error_that_names_it():
    tokenizer = gpt.CharTokenizer.from_text("abc ")
    with pytest.raises(gpt.GPTError, match=r"'Z'.*'é'|'Z', 'é'"):
        tokenizer.encode("a Zé c")


@settings(max_examples=200)
@given(text=st.text())
@example(text="")
@example(text="<|endoftext|>Hello<|endoftext|>")  # the special token, as GPT-2's data holds it
@example(text="🙂 é\r\n  \u00a0 it'll 42")  # multi-byte characters split across byte tokens, whitespace runs
def test_gpt2_bpe_round_trips_any_unicode_string(text):
    tokenizer = gpt.BPETokenizer()
    ids = tokenizer.encode(text)
    assert all(0 <= i < 50257 for i in ids)
    assert tokenizer.decode(ids) == text
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_gpt2_bpe_is_the_real_gpt2_encoding():
    tokenizer = gpt.BPETokenizer()
    assert tokenizer.vocab_size == 50257  # 256 bytes + 50,000 merges + <|endoftext|>
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's ids, as published with its encoder.json
    assert tokenizer.encode("<|endoftext|>") == [50256] == [tokenizer.start_token]


def test_bpe_without_its_files_says_to_set_tiktoken_cache_dir(tmp_path):
    code = "import gpt\ntry:\n    gpt.BPETokenizer()\nexcept gpt.GPTError as e:\n    print(e)"
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}  # an empty cache, and no way to download
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, env=env,
                            timeout=120)
    assert "TIKTOKEN_CACHE_DIR" in result.stdout and "network" in result.stdout


@quick
@given(length=st.integers(200, 400), block_size=st.integers(1, 16), batch=st.integers(1, 8), seed=st.integers(0, 99))
@example(length=200, block_size=1, batch=1, seed=0)
@example(length=17, block_size=16, batch=8, seed=0)  # one window fits: the whole data
def test_a_batch_is_windows_of_the_data_with_targets_shifted_by_one(length, block_size, batch, seed):
    data = torch.arange(length) * 7 % 1000  # distinct values, so a window's place in the data is known
    x, y = gpt.get_batch(data, block_size, batch, torch.Generator().manual_seed(seed))
    assert x.shape == y.shape == (batch, block_size)
    for row_x, row_y in zip(x, y):
        start = (data == row_x[0]).nonzero().item()
        assert torch.equal(row_x, data[start:start + block_size])
        assert torch.equal(row_y, data[start + 1:start + block_size + 1])


@quick
@given(block_size=st.integers(1, 8))
@example(block_size=1)
def test_every_window_of_the_data_can_be_drawn_the_last_included(block_size):
    data = torch.arange(block_size + 3)  # exactly three windows of block_size + 1
    x, _ = gpt.get_batch(data, block_size, 200, torch.Generator().manual_seed(0))
    assert sorted(set(x[:, 0].tolist())) == [0, 1, 2]


def test_the_split_is_the_first_90_and_the_last_10_percent():
    train, val = gpt.split_data(torch.arange(1000), block_size=8)
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(900, 1000))


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------

@st.composite
def logit_rows(draw):
    vocab = draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**16))
    return torch.randn(draw(st.integers(1, 4)), vocab, generator=torch.Generator().manual_seed(seed)) * 3


CLOSE = torch.tensor([[1.0, 0.999, 0.998, 0.997, 0.996]] * 2)  # nearly flat: where a < or a <= decides
PEAKED = torch.tensor([[9.0, 0.0, -1.0, -2.0, -3.0]])  # one token almost certain


@quick
@given(logits=logit_rows(), k=st.integers(1, 40), temperature=st.floats(0.1, 3.0), seed=st.integers(0, 99))
@example(logits=PEAKED, k=1, temperature=3.0, seed=0)
@example(logits=CLOSE, k=2, temperature=1.0, seed=0)
@example(logits=CLOSE, k=4, temperature=3.0, seed=1)
def test_top_k_never_yields_a_token_outside_the_k_most_likely(logits, k, temperature, seed):
    k = min(k, logits.size(1))
    generator = torch.Generator().manual_seed(seed)
    allowed = logits.topk(k, dim=-1).indices  # (B, k)
    for _ in range(20):
        ids = gpt.sample_next_token(logits, temperature=temperature, top_k=k, generator=generator)
        assert (ids == allowed).any(dim=-1).all()


@quick
@given(logits=logit_rows(), p=st.floats(0.01, 1.0), seed=st.integers(0, 99))
@example(logits=PEAKED, p=0.01, seed=0)  # a nucleus of one token
@example(logits=CLOSE, p=0.5, seed=1)  # the first three tokens hold 0.6 of the probability
@example(logits=CLOSE, p=1.0, seed=2)
def test_top_p_never_yields_a_token_outside_the_nucleus(logits, p, seed):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(logits.double(), dim=-1)
    for _ in range(20):
        ids = gpt.sample_next_token(logits, top_p=p, generator=generator)
        for row, i in zip(probs, ids[:, 0]):
            # The nucleus: the most likely tokens, in order, until their probabilities reach p.
            more_likely = row[row > row[i]].sum().item()
            assert more_likely < p + 1e-6


@quick
@given(logits=logit_rows())
@example(logits=CLOSE)
def test_temperature_zero_is_argmax(logits):
    assert torch.equal(gpt.sample_next_token(logits, temperature=0), logits.argmax(dim=-1, keepdim=True))


def test_a_temperature_or_top_p_too_small_for_float32_draws_the_likeliest_token():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 5  # (B, V)
    for settings_ in ({"temperature": 1e-40}, {"temperature": 1e-300}, {"top_p": 1e-50}, {"top_p": 5e-324}):
        ids = gpt.sample_next_token(logits, generator=torch.Generator().manual_seed(1), **settings_)
        assert torch.equal(ids, logits.argmax(dim=-1, keepdim=True)), settings_  # never NaN, never an empty nucleus


def test_sample_with_its_output_closed_writes_nowhere_without_a_traceback(trained, monkeypatch):
    monkeypatch.setattr(sys, "stdout", None)  # as `python gpt.py sample >&-` starts Python
    assert gpt.main(["sample", "--out-dir", str(trained), "--max-new-tokens", "5"]) == 0


def test_sample_with_its_progress_closed_writes_the_text_alone(trained, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", None)  # as `python gpt.py sample 2>&-` starts Python
    assert gpt.main(["sample", "--out-dir", str(trained), "--max-new-tokens", "5", "--prompt", "KING"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("KING") and len(text) == 4 + 5 + 1, text  # the prompt, 5 tokens, a new line: no statistics


@quick
@given(logits=logit_rows(), blocked=st.integers(0, 39), temperature=st.floats(0.05, 5.0), seed=st.integers(0, 99))
@example(logits=PEAKED.clone(), blocked=0, temperature=5.0, seed=0)  # the likeliest token can never come
@example(logits=CLOSE.clone(), blocked=4, temperature=0.05, seed=1)  # the last id
def test_sampled_ids_are_always_within_the_vocabulary(logits, blocked, temperature, seed):
    logits[:, blocked % logits.size(1)] = float("-inf")  # a token that can never come
    generator = torch.Generator().manual_seed(seed)
    for _ in range(20):
        ids = gpt.sample_next_token(logits, temperature=temperature, generator=generator)
        assert ids.shape == (logits.size(0), 1)
        assert ((ids >= 0) & (ids < logits.size(1))).all()
        assert torch.isfinite(logits.gather(1, ids)).all()


IMPOSSIBLE_DRAWS = {  # a faked draw -> (the id it returns, the sampling settings that make it impossible)
    "outside the vocabulary": (4, {}),
    "outside top-k": (3, {"top_k": 2}),
    "outside the nucleus": (2, {"top_p": 0.7}),  # the nucleus of 0.5, 0.3, 0.15, 0.05 at 0.7 is {0, 1}
}


@pytest.mark.parametrize("case", IMPOSSIBLE_DRAWS)
def test_the_sampler_refuses_an_impossible_draw_with_a_clear_error(case, monkeypatch):
    bad_id, sampling = IMPOSSIBLE_DRAWS[case]
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples, generator=None: torch.full((1, 1), bad_id))
    with pytest.raises(gpt.GPTError, match=f"impossible token id {bad_id}, (outside the vocabulary|of probability 0)"):
        gpt.sample_next_token(logits, **sampling)


@pytest.mark.parametrize("draw, flags, words", [
    (lambda probs: torch.full((probs.size(0), 1), probs.size(-1)), [], "outside the vocabulary"),
    (lambda probs: (probs.argmax(-1, keepdim=True) + 1) % probs.size(-1), ["--top-k", "1"], "of probability 0"),
])
def test_an_impossible_draw_stops_sample_with_one_line(draw, flags, words, trained, monkeypatch, capsys):
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples, generator=None: draw(probs))
    assert gpt.main(["sample", "--out-dir", str(trained), "--prompt", "KING", "--max-new-tokens", "5", *flags]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "impossible token id" in captured.err and words in captured.err
    assert captured.out == "KING"  # nothing was written after the prompt


def test_sampling_draws_tokens_with_the_tempered_probabilities():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(4)
    for _ in range(n // 100):
        ids = gpt.sample_next_token(logits.expand(100, 4), temperature=0.5, top_k=3, generator=generator)
        counts += torch.bincount(ids[:, 0], minlength=4)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) ** 2  # temperature 0.5 squares, top-k 3 drops the last
    expected /= expected.sum()
    assert counts[3] == 0
    assert torch.allclose(counts / n, expected, atol=0.015)


def test_top_p_draws_from_the_renormalised_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    for _ in range(200):
        ids = gpt.sample_next_token(logits.expand(100, 4), temperature=1.0, top_p=0.7, generator=generator)
        counts += torch.bincount(ids[:, 0], minlength=4)
    # 0.5 alone is short of 0.7, so the nucleus is {0.5, 0.3}: renormalised, 0.625 and 0.375
    assert counts[2] == counts[3] == 0
    assert torch.allclose(counts / counts.sum(), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)


@pytest.mark.parametrize("top_p, size", [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_a_nucleus_that_reaches_top_p_exactly_ends_there(top_p, size):
    # Four equally likely tokens, 0.25 each (exact in float32): the nucleus holds the fewest that
    # add up to top_p; a token whose more likely ones already reach it is not in.
    ids = gpt.sample_next_token(torch.zeros(4000, 4), top_p=top_p, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(ids[:, 0], minlength=4)
    assert (counts > 0).sum() == size and all(abs(c / 4000 - 1 / size) < 0.05 for c in counts[counts > 0].tolist())


@quick
@given(config=configs(max_block=12), prompt_length=st.integers(1, 12), new_tokens=st.integers(0, 12),
       batch=st.integers(1, 3), greedy=st.booleans(), temperature=st.floats(0.5, 2.0), seed=st.integers(0, 99))
@example(config=LEARNED, prompt_length=1, new_tokens=4, batch=1, greedy=True, temperature=1.0, seed=0)  # fills it
@example(config=ROPE, prompt_length=4, new_tokens=1, batch=3, greedy=False, temperature=2.0, seed=1)
@example(config=LEARNED, prompt_length=5, new_tokens=0, batch=2, greedy=False, temperature=1.0, seed=2)
def test_kv_cache_generation_equals_full_recomputation(config, prompt_length, new_tokens, batch, greedy, temperature,
                                                        seed):
    model = tiny_model(config)
    prompt_length = min(prompt_length, config.block_size)
    new_tokens = min(new_tokens, config.block_size - prompt_length)  # the text fits in block_size
    prompt = torch.randint(config.vocab_size, (batch, prompt_length))
    temperature = 0 if greedy else temperature
    outputs = [gpt.generate(model, prompt, new_tokens, temperature=temperature, kv_cache=kv_cache,
                            generator=torch.Generator().manual_seed(seed)) for kv_cache in (True, False)]
    assert outputs[0].shape == (prompt.size(0), prompt_length + new_tokens)
    assert torch.equal(outputs[0][:, :prompt_length], prompt)
    assert torch.equal(outputs[0], outputs[1])


def test_sampling_with_the_cache_runs_gpt_forward_once_per_token_on_its_one_new_position(monkeypatch):
    model = tiny_model(gpt.GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=1, n_embd=4))
    calls, forward = [], gpt.GPT.forward
    monkeypatch.setattr(gpt.GPT, "forward", lambda self, idx, *args, **kwargs: calls.append(
        (tuple(idx.shape), kwargs.get("kv_cache") is not None)) or forward(self, idx, *args, **kwargs))
    gpt.generate(model, torch.zeros((2, 3), dtype=torch.long), 12)
    # The prompt draws token 1; tokens 2 to 6 fill the cache's 8 positions one each; a refill
    # with the newest 4 draws token 7; 8 to 11 one each; a refill draws token 12.
    one, refill = [((2, 1), True)], [((2, 4), True)]
    assert calls == [((2, 3), True)] + one * 5 + refill + one * 4 + refill


@quick
@given(config=configs(), batch=st.integers(1, 3), past=st.integers(0, 15), written_out=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
@example(config=LEARNED, batch=1, past=0, written_out=False, dtype=torch.bfloat16)  # the first token
@example(config=ROPE, batch=2, past=4, written_out=True, dtype=torch.float32)  # the last position
def test_a_cached_step_gives_the_last_logits_of_a_pass_over_the_whole_context(config, batch, past, dtype,
                                                                               written_out):
    model = tiny_model(config, dtype=dtype)
    past = min(past, config.block_size - 1)
    tokens = torch.randint(config.vocab_size, (batch, past + 1))
    cache = gpt.KVCache(config, batch)
    with torch.inference_mode(), attention(written_out):
        if past:
            model(tokens[:, :past], kv_cache=cache)
        step, _ = model(tokens[:, past:], kv_cache=cache)  # (B, 1, V)
        whole, _ = model(tokens)  # (B, past + 1, V)
    assert step.shape == (batch, 1, config.vocab_size) and step.dtype == dtype and cache.length == past + 1
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(step[:, 0].double(), whole[:, -1].double(), atol=tolerance, rtol=tolerance)


def context_sensitive_model(pos="learned"):
    """A model whose greedy next token depends on which tokens it reads: 16 channels, large weights,
    seeds for which greedy sampling does not fall into repeating one token."""
    config = gpt.GPTConfig(vocab_size=12, block_size=6, n_layer=2, n_head=2, n_embd=16, pos=pos)
    return tiny_model(config, seed={"learned": 5, "rope": 11}[pos], scale=1.0)


def greedy_next(model, window):
    with torch.no_grad():
        return model(torch.tensor([window]))[0][0, -1].argmax().item()


def documented_windows(prompt_length, new_tokens, block):
    """The context the docs promise the cached sampler reads for each new token: the prompt's last
    block_size tokens, growing by one per token; when that would overflow, the newest block // 2."""
    start, windows = max(0, prompt_length - block), []
    for n in range(prompt_length, prompt_length + new_tokens):
        if n - start > block:
            start = n - block // 2
        windows.append((start, n))
    return windows


@quick
@given(config=configs(max_block=10), prompt_length=st.integers(1, 20), new_tokens=st.integers(1, 30))
@example(config=LEARNED, prompt_length=10, new_tokens=15)  # a prompt longer than block_size, several refills
@example(config=gpt.GPTConfig(vocab_size=5, block_size=2, n_layer=1, n_head=1, n_embd=2), prompt_length=1,
         new_tokens=6)  # block_size 2: each refill keeps one token
def test_past_block_size_the_cache_sees_the_context_the_readme_describes(config, prompt_length, new_tokens):
    # Independent of gpt.py's cache: rebuild the context the docs promise and ask the model directly.
    model = tiny_model(config)
    prompt = torch.randint(config.vocab_size, (1, min(prompt_length, 2 * config.block_size)))
    new_tokens = min(new_tokens, 3 * config.block_size)
    out = gpt.generate(model, prompt, new_tokens, temperature=0)[0].tolist()
    for n, (start, end) in enumerate(documented_windows(prompt.size(1), new_tokens, config.block_size), prompt.size(1)):
        assert out[n] == greedy_next(model, out[start:end])


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_past_block_size_the_cache_refills_with_the_newest_half_for_a_model_that_can_tell(pos):
    model, block = context_sensitive_model(pos), 6
    prompt = torch.randint(12, (1, 9), generator=torch.Generator().manual_seed(1))
    out = gpt.generate(model, prompt, 18, temperature=0)[0].tolist()
    windows = documented_windows(9, 18, block)
    assert all(out[n] == greedy_next(model, out[start:end]) for n, (start, end) in enumerate(windows, 9))
    # The test can fail: this model's choice depends on its window. Reading the last block_size
    # tokens (a sliding window), or a window one token longer or shorter, would have chosen
    # otherwise somewhere.
    assert any(out[end] != greedy_next(model, out[end - block:end]) for _, end in windows)
    assert any(out[end] != greedy_next(model, out[start - 1:end]) for start, end in windows
               if start > 0 and end - start < block)
    assert any(out[end] != greedy_next(model, out[start + 1:end]) for start, end in windows if end - start > 1)


def test_generation_gives_the_model_back_in_the_mode_it_had():
    model = tiny_model(gpt.GPTConfig(vocab_size=7, block_size=6, n_layer=1, n_head=1, n_embd=4, dropout=0.5))
    for mode in (True, False):
        model.train(mode)
        out = gpt.generate(model, torch.zeros((1, 1), dtype=torch.long), 10, temperature=0)
        assert model.training == mode
        # greedy and dropout-free: the same tokens whatever mode the model came in
        assert torch.equal(out, gpt.generate(model.eval(), torch.zeros((1, 1), dtype=torch.long), 10, temperature=0))


def test_an_empty_prompt_or_a_full_cache_is_a_clear_error():
    config = gpt.GPTConfig(vocab_size=7, block_size=3, n_layer=1, n_head=1, n_embd=4)
    model = tiny_model(config)
    with pytest.raises(gpt.GPTError, match="start_token"):
        gpt.generate(model, torch.zeros((1, 0), dtype=torch.long), 5)
    # Not token ids of this model: a list, floats, an id past the vocabulary (on CUDA a device-side assert).
    for prompt, words in (([[1, 2]], "got list;"), (torch.ones((1, 2)), "got torch.float32"),
                          (torch.tensor([[3, 7]]), "from 0 to 6: got torch.int64 from 3 to 7"),
                          (torch.tensor([[-1, 2]]), "from -1 to 2")):
        with pytest.raises(gpt.GPTError, match=re.escape(words)):
            gpt.generate(model, prompt, 5)
    cache = gpt.KVCache(config, 1)
    with torch.inference_mode():
        model(torch.zeros((1, 3), dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="4 tokens is longer than block_size 3"):
            model(torch.zeros((1, 1), dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_the_uncached_loop_reads_the_newest_block_size_tokens(pos):
    model, block = context_sensitive_model(pos), 6
    prompt = torch.randint(12, (1, 15), generator=torch.Generator().manual_seed(0))
    out = gpt.generate(model, prompt, 12, temperature=0, kv_cache=False)[0].tolist()
    for n in range(15, 27):
        assert out[n] == greedy_next(model, out[n - block:n])
    # The test can fail: this model's choice depends on its window, so reading the oldest
    # block_size tokens, or a window one token stale, would have chosen otherwise somewhere.
    assert any(out[n] != greedy_next(model, out[:block]) for n in range(15, 27))
    assert any(out[n] != greedy_next(model, out[n - block - 1:n - 1]) for n in range(15, 27))


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def test_save_load_round_trips_weights_config_tokenizer_logits_and_samples(trained, tmp_path):
    path = trained / "ckpt.pt"
    checkpoint = gpt.load_checkpoint(path)
    model, tokenizer = gpt.model_from_checkpoint(checkpoint)
    assert isinstance(checkpoint["config"], dict)
    assert tokenizer.chars == gpt.CharTokenizer.from_text(SHAKESPEARE[:20000]).chars
    # save again and load: everything identical
    gpt.write_atomically(tmp_path / "again.pt", lambda f: torch.save(checkpoint, f))
    again, tokenizer2 = gpt.model_from_checkpoint(gpt.load_checkpoint(tmp_path / "again.pt"))
    assert again.config == model.config and tokenizer2.chars == tokenizer.chars
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert again.lm_head.weight is again.transformer.wte.weight  # still one tensor after loading
    idx = torch.tensor([tokenizer.encode("ROMEO:\nWhat")])
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], again.eval()(idx)[0])
    texts = [tokenizer.decode(gpt.generate(m, idx, 40, generator=torch.Generator().manual_seed(7))[0].tolist())
             for m in (model, again)]
    assert texts[0] == texts[1]


def test_the_best_checkpoint_holds_the_weights_that_scored_its_val_loss(trained):
    checkpoint = gpt.load_checkpoint(trained / "ckpt.pt")
    model, tokenizer = gpt.model_from_checkpoint(checkpoint)
    cfg = gpt.TrainConfig(**checkpoint["train_args"])
    _, val = gpt.split_data(torch.tensor(tokenizer.encode(Path(cfg.data).read_text(encoding="utf-8"))),
                            model.config.block_size)
    generator = torch.Generator().manual_seed(cfg.seed + 2)  # the val loss's own windows, the same at every evaluation
    batches = [gpt.get_batch(val, cfg.block_size, cfg.batch_size, generator) for _ in range(cfg.eval_iters)]
    val_loss = gpt.estimate_loss(model, batches, gpt.autocast(torch.device("cpu"), torch.float32)).item()
    assert val_loss == checkpoint["best_val_loss"] == min(h["val"] for h in checkpoint["history"])


def test_a_checkpoint_holds_what_sampling_and_resuming_need(trained):
    checkpoint = gpt.load_checkpoint(trained / "last.pt")
    assert {"model_state", "config", "step", "loss", "tokenizer", "optimizer_state", "best_val_loss", "train_args",
            "rng", "history", "format"} <= checkpoint.keys()
    assert checkpoint["step"] == 30 and checkpoint["tokenizer"]["kind"] == "char"
    assert checkpoint["best_val_loss"] == min(h["val"] for h in checkpoint["history"])
    assert not any(name.startswith("_orig_mod") for name in checkpoint["model_state"])


def test_resuming_with_more_steps_keeps_the_saved_learning_rate_schedule(trained):
    # trained: 30 steps, its cosine decayed to min_lr at step 30
    longer, _ = gpt.resumed_config({"resume": True, "out_dir": str(trained), "max_iters": 60})
    assert longer.max_iters == 60 and longer.lr_decay_iters == 30
    assert gpt.learning_rate(45, longer) == longer.min_lr  # no climb back up a stretched cosine
    anew, _ = gpt.resumed_config({"resume": True, "out_dir": str(trained), "max_iters": 60, "lr_decay_iters": 60})
    assert anew.lr_decay_iters == 60 and gpt.learning_rate(45, anew) > anew.min_lr
    same, _ = gpt.resumed_config({"resume": True, "out_dir": str(trained)})
    assert same.max_iters == 30 and same.lr_decay_iters is None


def test_compiled_training_saves_the_plain_module(tmp_path, monkeypatch):
    # The "eager" backend wraps the model exactly as inductor does, without minutes of compiling.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="eager"))
    cfg = train_cfg(tmp_path, max_iters=3, compile=True)
    gpt.train(cfg)
    checkpoint = gpt.load_checkpoint(Path(cfg.out_dir) / "ckpt.pt")
    assert set(checkpoint["model_state"]) == set(gpt.GPT(gpt.GPTConfig(**checkpoint["config"])).state_dict())


def test_a_checkpoint_made_on_a_gpu_loads_on_cpu(trained, tmp_path):
    # torch.save records each tensor's device in the file. There is no GPU here, so we write
    # into a CPU checkpoint the record that a CUDA run writes: "cuda:0" in place of "cpu".
    checkpoint = gpt.load_checkpoint(trained / "ckpt.pt")
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    source, out = zipfile.ZipFile(buffer), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data  # pickle's BINUNICODE "cpu"
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(item, data)
    path = tmp_path / "from_gpu.pt"
    path.write_bytes(out.getvalue())
    if not torch.cuda.is_available():  # the file really asks for a GPU
        with pytest.raises(Exception, match="CUDA"):  # a RuntimeError, or in older torch an UnpicklingError
            torch.load(path, weights_only=True)
    moved = gpt.load_checkpoint(path)
    model, _ = gpt.model_from_checkpoint(moved)
    assert all(t.device.type == "cpu" for t in moved["model_state"].values())
    for name, t in checkpoint["model_state"].items():
        assert torch.equal(moved["model_state"][name], t)


# ---------------------------------------------------------------------------------------------
# the command line, end to end
# ---------------------------------------------------------------------------------------------

def test_train_then_sample_end_to_end(tmp_path):
    data = tmp_path / "plays.txt"
    data.write_text(SHAKESPEARE[:30000], encoding="utf-8")
    out = tmp_path / "run"
    trained = run_gpt("train", "--data", data, "--out-dir", out, "--n-layer", 1, "--n-head", 2, "--n-embd", 16,
                      "--block-size", 32, "--batch-size", 4, "--max-iters", 8, "--eval-interval", 4,
                      "--eval-iters", 2, "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout == ""  # progress goes to stderr
    assert "step 8/8" in trained.stderr and "tok/s" in trained.stderr and "ETA" in trained.stderr
    sampled = run_gpt("sample", "--out-dir", out, "--prompt", "KING", "--max-new-tokens", 50, "--seed", 3)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("KING") and len(sampled.stdout) == len("KING") + 50 + 1
    assert set(sampled.stdout) <= set(SHAKESPEARE[:30000]) | {"\n"}
    assert "tokens/s" in sampled.stderr
    again = run_gpt("sample", "--out-dir", out, "--prompt", "KING", "--max-new-tokens", 50, "--seed", 3,
                    "--num-samples", 2)
    assert again.stdout.startswith(sampled.stdout + "-" * 40 + "\n")  # same seed, same text; then a second one
    assert "100 tokens in" in again.stderr


def test_every_setting_is_a_flag_whose_help_shows_its_default(capsys):
    helps = {}
    for command, config_class in (("train", gpt.TrainConfig), ("sample", gpt.SampleConfig), ("bench", gpt.BenchConfig),
                                  ("inspect", gpt.InspectConfig), ("prepare", gpt.PrepareConfig)):
        assert gpt.main([command, "--help"]) == 0
        helps[command] = text = capsys.readouterr().out
        for field in gpt.dataclasses.fields(config_class):
            assert gpt.flag(field.name) in text, (command, field.name)
        assert text.count("(default:") == len(gpt.dataclasses.fields(config_class)), command
    # the names scripts and the README rely on
    for name in ("data", "tokenizer", "out-dir", "device", "dtype", "compile", "seed", "n-layer", "n-head",
                 "n-embd", "block-size", "dropout", "batch-size", "grad-accum", "max-iters", "lr", "min-lr",
                 "warmup-iters", "weight-decay", "eval-interval", "eval-iters", "resume", "init-from"):
        assert f"--{name} " in helps["train"] or f"--{name}\n" in helps["train"], name
    for name in ("out-dir", "device", "prompt", "max-new-tokens", "temperature", "top-k", "top-p", "num-samples",
                 "seed", "no-kv-cache", "init-from"):
        assert f"--{name} " in helps["sample"] or f"--{name}\n" in helps["sample"], name


def test_importing_gpt_has_no_side_effects(tmp_path):
    code = ("import sys\nevents = []\n"
            "sys.addaudithook(lambda e, a: events.append((e, a)) if e.startswith(('socket.', 'urllib')) or "
            "(e == 'open' and isinstance(a[1], str) and any(m in a[1] for m in 'wax+')) else None)\n"
            f"sys.path.insert(0, {str(HERE)!r})\nimport gpt\nprint(events)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.stdout == "[]\n" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# robustness: bad input, damaged or malicious checkpoints, kills, Ctrl-C, divergence
# ---------------------------------------------------------------------------------------------

def unavailable_device():
    for device, available in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())):
        if not available:
            return device
    raise AssertionError("both cuda and mps are available: no unavailable device to test with")


SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--block-size", "8", "--max-iters", "2"]
TRAIN = ["train", "--data", "{tmp}/ok.txt", "--device", "cpu"]
BAD_INPUTS = [  # (what is wrong, the command line, words its one-line error must contain)
    ("data missing", ["train", "--data", "{tmp}/nope.txt"], ["nope.txt", "does not exist"]),
    ("data empty", ["train", "--data", "{tmp}/empty.txt"], ["empty.txt", "empty"]),
    ("data is a folder", ["train", "--data", "{tmp}"], ["directory"]),
    ("data not utf-8", ["train", "--data", "{tmp}/latin1.txt"], ["not UTF-8", "byte 11", "line 2"]),
    ("data too short", ["train", "--data", "{tmp}/short.txt", *SMALL], ["too short", "block_size + 1 = 9"]),
    ("data too short, a new --out-dir", ["train", "--data", "{tmp}/short.txt", *SMALL, "--out-dir", "{tmp}/new/run"],
     ["too short"]),
    ("n_embd % n_head", [*TRAIN, "--n-embd", "10", "--n-head", "3"], ["n_embd (10)", "divisible", "n_head (3)"]),
    ("n_layer 0", [*TRAIN, "--n-layer", "0"], ["n_layer", "positive", "0"]),
    ("n_head negative", [*TRAIN, "--n-head", "-2"], ["n_head", "-2"]),
    ("n_embd 0", [*TRAIN, "--n-embd", "0"], ["n_embd", "0"]),
    ("block_size 0", [*TRAIN, "--block-size", "0"], ["block_size", "0"]),
    ("batch_size 0", [*TRAIN, "--batch-size", "0"], ["--batch-size", "0"]),
    ("max_iters 0", [*TRAIN, "--max-iters", "0"], ["--max-iters", "0"]),
    ("max_iters negative", [*TRAIN, "--max-iters", "-5"], ["--max-iters", "-5"]),
    ("grad_accum 0", [*TRAIN, "--grad-accum", "0"], ["--grad-accum", "0"]),
    ("eval_iters 0", [*TRAIN, "--eval-iters", "0"], ["--eval-iters", "0"]),
    ("eval_interval negative", [*TRAIN, "--eval-interval", "-1"], ["--eval-interval", "-1"]),
    ("lr 0", [*TRAIN, "--lr", "0"], ["--lr", "positive", "0"]),
    ("lr negative", [*TRAIN, "--lr", "-0.001"], ["--lr", "-0.001"]),
    ("min_lr negative", [*TRAIN, "--min-lr", "-1"], ["--min-lr", "-1"]),
    ("warmup negative", [*TRAIN, "--warmup-iters", "-1"], ["--warmup-iters", "-1"]),
    ("max_minutes 0", [*TRAIN, "--max-minutes", "0"], ["--max-minutes", "positive", "0"]),
    ("max_minutes without warm-up", [*TRAIN, "--max-minutes", "1", "--warmup-iters", "2"], ["--warmup-iters", "4"]),
    ("dropout 1", [*TRAIN, "--dropout", "1"], ["dropout", "[0, 1)", "1"]),
    ("dropout negative", [*TRAIN, "--dropout", "-0.1"], ["dropout", "-0.1"]),
    ("not a number", [*TRAIN, "--lr", "fast"], ["--lr", "'fast'"]),
    ("unknown device", [*TRAIN, "--device", "tpu"], ["--device", "'tpu'", "cpu"]),
    ("unavailable device", [*TRAIN, "--device", unavailable_device()], [unavailable_device(), "not available"]),
    ("out_dir not writable", [*TRAIN, *SMALL, "--out-dir", "{tmp}/a_file/out"], ["--out-dir", "a_file"]),
    ("top_p 0", ["sample", "--top-p", "0"], ["--top-p", "(0, 1]", "0"]),
    ("top_p above 1", ["sample", "--top-p", "1.5"], ["--top-p", "1.5"]),
    ("top_k 0", ["sample", "--top-k", "0"], ["--top-k", "0"]),
    ("temperature negative", ["sample", "--temperature", "-1"], ["--temperature", "-1"]),
    ("max_new_tokens negative", ["sample", "--max-new-tokens", "-3"], ["--max-new-tokens", "-3"]),
    ("num_samples 0", ["sample", "--num-samples", "0"], ["--num-samples", "0"]),
    ("missing checkpoint", ["sample", "--out-dir", "{tmp}/no_run"], ["no_run", "does not exist"]),
    ("sample on unavailable device", ["sample", "--device", unavailable_device()], ["not available"]),
    ("init_from unknown", ["sample", "--init-from", "gpt5"], ["gpt5", "gpt2-medium"]),
    ("inspect without a checkpoint", ["inspect", "--out-dir", "{tmp}/no_run"], ["no_run", "does not exist"]),
    ("inspect max_tokens 0", ["inspect", "--max-tokens", "0"], ["--max-tokens", "0"]),
    ("inspect on unavailable device", ["inspect", "--device", unavailable_device()], ["not available"]),
    ("pos unknown", [*TRAIN, "--pos", "alibi"], ["--pos", "'alibi'", "rope"]),
    ("data is a device", ["train", "--data", "/dev/null"], ["/dev/null", "not a regular file"]),  # nor a pipe: read twice
    ("lr infinite", [*TRAIN, "--lr", "inf"], ["--lr", "finite", "inf"]),
    ("weight_decay infinite", [*TRAIN, "--weight-decay", "inf"], ["--weight-decay", "finite"]),
    ("batch_size past 64 bits", [*TRAIN, "--batch-size", str(2**64)], ["--batch-size", "2**63"]),
    ("n_embd past 64 bits", [*TRAIN, "--n-embd", str(2**64)], ["n_embd", "2**63"]),
    ("max_iters ends a max_minutes run before its plan", [*TRAIN, "--max-minutes", "1", "--max-iters", "20"],
     ["--max-minutes", "--max-iters 20"]),
    ("loss.svg is not a picture", [*TRAIN, *SMALL, "--out-dir", "{tmp}/run"], ["loss.svg", "not a loss curve"]),
]


@pytest.mark.parametrize("name, argv, words", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_a_bad_input_gets_one_clear_line_and_changes_nothing(name, argv, words, tmp_path, capsys):
    (tmp_path / "ok.txt").write_text(SHAKESPEARE[:5000], encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("line one\nna\xefve\n".encode("latin-1"))
    (tmp_path / "short.txt").write_text("To be, or not to be", encoding="utf-8")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "loss.svg").write_text("the user's notes, under a name train would write")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out-dir" not in argv:
        argv += ["--out-dir", str(tmp_path / "out")]
    before, paths = folder_bytes(tmp_path), sorted(tmp_path.rglob("*"))
    assert gpt.main(argv) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert folder_bytes(tmp_path) == before and sorted(tmp_path.rglob("*")) == paths  # not even an empty folder


def test_the_contexts_bench_reports_out_of_memory_and_stops_that_variant(monkeypatch, capsys):
    real = gpt.time_context

    def written_out_runs_out_at_32(T, attention, *args):  # as a machine too small for 32 would
        return None if attention == "written out" and T >= 32 else real(T, attention, *args)
    monkeypatch.setattr(gpt, "time_context", written_out_runs_out_at_32)
    out = io.StringIO()
    gpt.bench(gpt.BenchConfig(device="cpu", contexts="16,32,64", context_batch=1, context_steps=1), out)
    rows = {int(line.split("|")[1]): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in out.getvalue().splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert sorted(rows) == [16, 32, 64]
    assert float(rows[16][0].replace(",", "")) > 0 and rows[32][0] == "out of memory"
    assert rows[64][0] == "not tried (out of memory at 32)"
    for T in (16, 32, 64):  # the fused attention: ms/step, and tokens/s = batch x context / seconds
        ms, tokens_per_second = float(rows[T][3].replace(",", "")), float(rows[T][4].replace(",", ""))
        assert T / ((ms + 0.5) / 1000) - 1 <= tokens_per_second <= T / ((ms - 0.5) / 1000) + 1  # ms is rounded


def test_bench_times_train_s_dropout_with_one_loss_scaler_per_number_format_and_shows_its_progress(monkeypatch):
    # A scaler made anew for every step would restart float16's scale each step, and time skipped updates.
    made, real = [], torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kwargs: made.append(args) or real(*args, **kwargs))
    monkeypatch.setattr(gpt, "LOG_EVERY_SECONDS", 0)  # a progress line after every round
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        gpt.bench(gpt.BenchConfig(device="cpu", steps=2, rounds=2, sample_tokens=4), out)
    for job in ("timing training", "timing sampling"):
        lines = [line for line in err.getvalue().splitlines() if line.startswith(job)]
        assert [line.split(",")[0] for line in lines] == [f"{job}: {n} of 2 rounds" for n in (1, 2)], err.getvalue()
        assert "ETA" in lines[0] and ("ms/step" if job == "timing training" else "tokens/s") in lines[0]
    formats = len(set([torch.float32, gpt.pick_dtype("auto", torch.device("cpu"))]))
    assert len(made) == formats and f"dropout {gpt.TrainConfig.dropout};" in out.getvalue()
    assert out.getvalue().count("| float32") == 2  # a training row and a sampling row


def test_an_atomic_write_puts_each_file_on_disk_before_naming_it_and_names_the_second_last(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def no_links(*args):
        raise OSError("no hard links here")
    monkeypatch.setattr(gpt.os, "link", no_links)
    monkeypatch.setattr(gpt.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(gpt.os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    gpt.write_atomically(tmp_path / "ckpt.pt", lambda f: torch.save({"step": 1}, f), also=tmp_path / "last.pt")
    renames = []
    for name in ("ckpt.pt", "last.pt"):
        renames.append(next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(tmp_path / name)))
        assert ("fsync", events[renames[-1]][1]) in events[:renames[-1]], (name, events)  # its bytes on disk first
    assert renames[0] < renames[1]  # the second name after the first: a kill in between leaves it the older
    assert torch.load(tmp_path / "last.pt") == torch.load(tmp_path / "ckpt.pt") == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "last.pt"]


def test_an_atomic_write_cleans_up_after_killed_writers_only_and_takes_its_name_as_it_is(tmp_path):
    target = tmp_path / "a[1].tokens"  # to glob, [1] would mean "the character 1"
    killed = tmp_path / f".a[1].tokens.{ended_process_id()}.tmp"  # a writer killed mid-write left it
    live = tmp_path / f".a[1].tokens.{os.getppid()}.tmp"  # another process (this one's parent) writing it now
    other = tmp_path / f".a1.tokens.{ended_process_id()}.tmp"  # another file's
    notes = tmp_path / ".a[1].tokens.notes.tmp"  # no writer's: no process id
    for path in (killed, live, other, notes):
        path.write_bytes(b"part of a file")
    gpt.write_atomically(target, lambda f: f.write(b"whole"))
    assert target.read_bytes() == b"whole" and not killed.exists() and live.exists() and other.exists() and notes.exists()


def test_bad_bench_contexts_get_one_line(capsys):
    for contexts in ("256,abc", "0,512", ""):
        assert gpt.main(["bench", "--contexts", contexts]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--contexts" in err and "256,512,1024" in err, err


def test_under_torchrun_a_process_other_than_the_first_says_why_it_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")  # as torchrun starts the second of two processes; only rank 0 logs progress
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert gpt.main(["train", "--data", str(tmp_path / "only-on-rank-0.txt")]) == 1
    assert capsys.readouterr().err == f"error (process 1 of 2): data file {str(tmp_path / 'only-on-rank-0.txt')!r} " \
                                      f"does not exist\n"
    assert gpt.main(["train", "--bogus"]) == 2 and capsys.readouterr().err == ""  # the same typo: rank 0 says it once


def test_a_bad_input_on_the_real_command_line_prints_one_line_and_no_traceback(tmp_path):
    result = run_gpt("train", "--data", tmp_path / "missing.txt", "--out-dir", tmp_path / "out")
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr and "missing.txt" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unforeseen_file_error_and_a_size_too_large_for_memory_get_one_line(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE[:5000], encoding="utf-8")
    cases = [  # (flags, words of the one line): an OSError no check foresaw; an allocation of 80 GB
        (["--out-dir", tmp_path / ("a" * 300)], ["File name too long"]),
        (["--out-dir", tmp_path / "out", "--batch-size", 10**10, "--device", "cpu"], ["out of memory", "--batch-size"]),
        (["--out-dir", tmp_path / "out", "--batch-size", 2**62, "--device", "cpu"], ["out of memory", "--batch-size"]),
    ]
    for flags, words in cases:
        assert gpt.main([str(a) for a in ["train", "--data", data, *flags]]) == 1
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith("error: ") and all(word in err for word in words), err
    assert not (tmp_path / "out" / "last.pt").exists()


def test_bad_resumes_and_prompts_get_one_clear_line_and_change_nothing(trained, tmp_path, capsys):
    run = shutil.copytree(trained, tmp_path / "run")
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE[:20000], encoding="utf-8")
    cases = [
        (["train", "--resume", "--out-dir", run, "--data", data, "--tokenizer", "bpe"], ["--tokenizer bpe", "char"]),
        (["train", "--resume", "--out-dir", run, "--data", data, "--n-layer", "3"], ["--n-layer 3", "n_layer 1"]),
        (["train", "--resume", "--out-dir", run, "--data", data, "--n-embd", "32"], ["--n-embd 32", "n_embd 16"]),
        (["train", "--out-dir", run, "--data", data], ["already holds a training run", "--resume"]),
        (["sample", "--out-dir", run, "--prompt", "Hello ZZ ~ world"], ["lacks", "'~'"]),
        (["train", "--resume", "--out-dir", tmp_path / "nothing", "--data", data], ["nothing", "holds no training run"]),
        (["inspect", "--out-dir", run, "--svg", data / "attention.svg"], ["--svg", "data.txt"]),  # a file, not a folder
        (["inspect", "--out-dir", run, "--svg", run / "ckpt.pt"], ["--svg", "not an attention picture"]),  # a checkpoint
        (["inspect", "--out-dir", run, "--svg", run / "loss.svg"], ["--svg", "not an attention picture"]),  # the loss
        (["train", "--out-dir", run, "--data", data, "--seed", 2**64], ["--seed", "2**63 - 1"]),  # torch's 64 bits
        (["sample", "--out-dir", run, "--seed", -1], ["--seed", "from 0"]),
        (["train", "--out-dir", tmp_path / "new", "--data", data, "--max-minutes", "inf"], ["--max-minutes", "finite"]),
        (["sample", "--init-from", tmp_path / "gpt2.safetensors"], ["gpt2.safetensors' does not exist"]),
        (["sample", "--init-from", tmp_path / "listed"], ["config.json", "no JSON object"]),
        (["train", "--resume", "--out-dir", run, "--max-iters", "30"], ["at step 30", "larger --max-iters"]),
        (["train", "--resume", "--out-dir", run, "--seed", "5"], ["--seed", "new run"]),  # resuming keeps its streams
        (["inspect", "--out-dir", run, "--svg", tmp_path / "listed"], ["--svg", "not an attention picture"]),  # a folder
        (["train", "--resume", "--out-dir", tmp_path / "handmade"], ["not saved by train", "optimizer_state"]),
        (["train", "--resume", "--out-dir", tmp_path / "no_moments"], ["optimizer state does not fit"]),
        (["sample", "--init-from", tmp_path / "nulls"], ["config.json", "n_embd", "None"]),
        (["sample", "--init-from", tmp_path / "bools"], ["config.json", "block_size", "True"]),  # JSON's true is no 1
        (["sample", "--init-from", tmp_path / "negative.safetensors"], ["negative.safetensors", "wte.weight", "shape"]),
        (["sample", "--init-from", tmp_path / "text.safetensors"], ["text.safetensors", "wte.weight", "data_offsets"]),
        (["sample", "--init-from", tmp_path / "flat.safetensors"], ["flat.safetensors", "two matrices"]),
        (["sample", "--init-from", tmp_path / "deep.safetensors"], ["deep.safetensors", "safetensors file"]),
        (["sample", "--init-from", tmp_path / "embeddings.safetensors"], ["embeddings.safetensors", "no transformer"]),
    ]
    (tmp_path / "listed").mkdir()  # a GPT-2 folder whose config.json is JSON, but not an object
    (tmp_path / "listed" / "config.json").write_text("[1, 2]")
    (tmp_path / "listed" / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    shutil.copytree(tmp_path / "listed", tmp_path / "nulls")  # a config.json whose sizes are not numbers
    shutil.copytree(tmp_path / "listed", tmp_path / "bools")
    (tmp_path / "bools" / "config.json").write_text(json.dumps({"vocab_size": 65, "n_positions": True, "n_layer": 1,
                                                                "n_head": 2, "n_embd": 4}))
    (tmp_path / "nulls" / "config.json").write_text(json.dumps({"vocab_size": 65, "n_positions": 16, "n_layer": 1,
                                                                "n_head": 2, "n_embd": None}))
    for name, header in {"negative": {"wte.weight": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}},
                         "text": {"wte.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": ["0", "24"]}},
                         "flat": {"wte.weight": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
                                  "wpe.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 48]}},
                         "embeddings": {"wte.weight": {"dtype": "F32", "shape": [3, 64], "data_offsets": [0, 768]},
                                        "wpe.weight": {"dtype": "F32", "shape": [2, 64], "data_offsets": [768, 1280]}}
                         }.items():
        raw = json.dumps(header).encode()  # safetensors: 8 bytes of header length, the header, the tensors' bytes
        (tmp_path / f"{name}.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(1280))
    (tmp_path / "deep.safetensors").write_bytes((10**5).to_bytes(8, "little") + b"[" * 10**5)  # JSON past the stack
    for name, damage in (("handmade", lambda c: c.pop("optimizer_state")),  # the keys sampling needs, not resuming
                         ("no_moments", lambda c: c.update(optimizer_state={"state": {}, "param_groups": []}))):
        shutil.copytree(trained, tmp_path / name)
        checkpoint = gpt.load_checkpoint(tmp_path / name / "last.pt")
        damage(checkpoint)
        torch.save(checkpoint, tmp_path / name / "last.pt")
    before = folder_bytes(tmp_path)
    for argv, words in cases:
        code = gpt.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code != 0 and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        for word in words:
            assert word in err, (argv, word, err)
        assert folder_bytes(tmp_path) == before, argv


def test_a_prompt_typed_in_another_encoding_gets_one_line_and_any_sample_reaches_a_file_whole(tmp_path):
    # A Latin-1 terminal passes "café" as the bytes caf\xe9, not UTF-8; and Windows writes `sample > out.txt`
    # in its code page (cp1252), which has no 日: the text must go out as UTF-8 wherever stdout goes.
    cfg = train_cfg(tmp_path, text="日本 語" * 100, max_iters=1, eval_interval=1)
    with contextlib.redirect_stderr(io.StringIO()):
        gpt.train(cfg)
    cp1252 = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    for command in ("sample", "inspect"):
        result = subprocess.run([sys.executable, HERE / "gpt.py", command, "--out-dir", cfg.out_dir, "--prompt",
                                 "日本".encode() + b"\xe9"], capture_output=True, timeout=120, env=cp1252)
        err = result.stderr.decode()
        assert result.returncode == 1 and err.count("\n") == 1 and "--prompt is not UTF-8 (its character 3)" in err, err
    result = subprocess.run([sys.executable, HERE / "gpt.py", "sample", "--out-dir", cfg.out_dir, "--prompt", "日本",
                             "--max-new-tokens", "30"], capture_output=True, timeout=120, env=cp1252)
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode("utf-8")
    assert text.startswith("日本") and len(text) == 2 + 30 + 1 and set(text) <= set("日本 語\n")


def test_an_empty_prompt_starts_a_text_where_a_speech_starts_a_play_after_a_new_line(trained, capsys):
    assert gpt.main(["sample", "--out-dir", str(trained), "--max-new-tokens", "30", "--prompt", ""]) == 0
    empty = capsys.readouterr().out
    assert gpt.main(["sample", "--out-dir", str(trained), "--max-new-tokens", "30", "--prompt", "\n"]) == 0
    assert capsys.readouterr().out == "\n" + empty  # the same draws, after the same (unwritten) new line
    tokenizer = gpt.CharTokenizer.from_text("\tTo be\n")  # a tab sorts before the new line
    assert tokenizer.decode([tokenizer.start_token]) == "\n"
    assert gpt.BPETokenizer().start_token == 50256  # GPT-2: <|endoftext|>, which begins every document


def test_zero_new_tokens_and_an_empty_prompt_are_not_errors(trained, capsys):
    assert gpt.main(["sample", "--out-dir", str(trained), "--max-new-tokens", "0", "--prompt", "KING"]) == 0
    assert capsys.readouterr().out == "KING\n"
    assert gpt.main(["sample", "--out-dir", str(trained), "--max-new-tokens", "20", "--prompt", ""]) == 0
    assert len(capsys.readouterr().out) == 21


def write_malicious_checkpoint(path, marker):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))
    with open(path, "wb") as f:
        pickle.dump({"format": 1, "model_state": Payload()}, f)


def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "pwned"
    write_malicious_checkpoint(out / "ckpt.pt", marker)
    # the payload is real: an unsafe load runs it
    pickle.load(open(out / "ckpt.pt", "rb"))
    assert marker.exists()
    marker.unlink()
    assert gpt.main(["sample", "--out-dir", str(out)]) != 0
    err = capsys.readouterr().err
    assert "refused" in err and err.count("\n") == 1
    assert gpt.main(["train", "--resume", "--out-dir", str(out)]) != 0
    assert not marker.exists()


DAMAGED_CHECKPOINTS = {  # what is wrong: (how to make it at path from a good checkpoint's bytes, words its error has)
    "truncated": (lambda path, good: path.write_bytes(good[:len(good) // 2]), ["not a readable checkpoint"]),
    "text": (lambda path, good: path.write_text("this is not a checkpoint\n"), ["not a readable checkpoint"]),
    "missing keys": (lambda path, good: torch.save({"format": 1, "config": {}}, path), ["lacks", "model_state"]),
    "future format": (lambda path, good: torch.save({"format": 99}, path), ["format 99", "reads format 1"]),
    "not a dict": (lambda path, good: torch.save([1, 2, 3], path), ["holds a list"]),
    "empty": (lambda path, good: path.write_bytes(b""), ["not a readable checkpoint"]),
    "a folder": (lambda path, good: path.mkdir(), ["is not a file"]),
}


@pytest.mark.parametrize("damage", DAMAGED_CHECKPOINTS)
def test_a_damaged_checkpoint_gets_an_error_naming_the_file_and_the_problem(damage, trained, tmp_path):
    make, words = DAMAGED_CHECKPOINTS[damage]
    path = tmp_path / "ckpt.pt"
    make(path, (trained / "ckpt.pt").read_bytes())
    with pytest.raises(gpt.GPTError) as error:
        gpt.load_checkpoint(path)
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE[:20000], encoding="utf-8")
    out = tmp_path / "out"
    args = [sys.executable, str(HERE / "gpt.py"), "train", "--data", str(data), "--out-dir", str(out),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
            "--max-iters", "100000", "--eval-interval", "1", "--eval-iters", "1", "--device", "cpu"]
    rng = random.Random(0)
    steps = []
    for kill in range(5):
        saved = (out / "last.pt").stat().st_mtime_ns if kill else None
        process = subprocess.Popen(args + (["--resume"] if kill else []), stderr=subprocess.DEVNULL)
        # wait until this run has saved once, then kill it at a random moment
        deadline = time.time() + 60
        while time.time() < deadline and (not (out / "last.pt").exists() or (out / "last.pt").stat().st_mtime_ns == saved):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        for name in ("ckpt.pt", "last.pt"):
            gpt.model_from_checkpoint(gpt.load_checkpoint(out / name))  # never half-written
        ElementTree.parse(out / "loss.svg")  # the picture is never half-written either
        steps.append(gpt.load_checkpoint(out / "last.pt")["step"])
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["ckpt.pt", "last.pt", "loss.svg"]
    assert steps == sorted(steps) and steps[-1] > steps[0]  # each run resumed where the last one was killed
    # a leftover temporary file is cleaned up by the next save (of a run whose second --max-iters overrides the first)
    (out / f".last.pt.{ended_process_id()}.tmp").write_bytes(b"half a checkpoint")
    finished = subprocess.run(args + ["--max-iters", str(steps[-1] + 2), "--resume"], capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock", "ckpt.pt", "last.pt", "loss.svg"]  # .lock: see below


def ended_process_id():  # the id of a process that has ended (no other takes it for a while)
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def wait_for(condition, process, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, "the training process ended early"
        assert time.time() < deadline, "timed out waiting for the training process"
        time.sleep(0.01)


def assert_same_run(a, b):
    for key in ("model_state", "optimizer_state"):
        flat_a, flat_b = flatten(a[key]), flatten(b[key])
        assert flat_a.keys() == flat_b.keys()
        for name in flat_a:
            if isinstance(flat_a[name], torch.Tensor):
                assert torch.equal(flat_a[name], flat_b[name]), (key, name)
            else:
                assert flat_a[name] == flat_b[name], (key, name)
    assert a["step"] == b["step"] and a["loss"] == b["loss"]


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in flatten(value, f"{prefix}{i}.").items()}
    return {prefix: tree}


RESUMED_TOTAL = 150


def resumable_run_args(data):
    return ["train", "--data", data, "--n-layer", 2, "--n-head", 2, "--n-embd", 32, "--block-size", 32,
            "--batch-size", 8, "--dropout", 0.1, "--eval-interval", 25, "--eval-iters", 2, "--device", "cpu",
            "--warmup-iters", 10, "--lr-decay-iters", RESUMED_TOTAL]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """-> (the data file, the last.pt of a run of RESUMED_TOTAL steps made in one go)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    data = tmp / "data.txt"
    data.write_text(SHAKESPEARE[:20000], encoding="utf-8")
    straight = run_gpt(*resumable_run_args(data), "--out-dir", tmp / "a", "--max-iters", RESUMED_TOTAL)
    assert straight.returncode == 0, straight.stderr
    return data, gpt.load_checkpoint(tmp / "a" / "last.pt")


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm", "max-iters"])
def test_stop_then_resume_equals_an_uninterrupted_run_bit_for_bit(stop, uninterrupted, tmp_path):
    data, a = uninterrupted
    total, common = RESUMED_TOTAL, resumable_run_args(data)
    if stop in ("ctrl-c", "sigterm"):
        process = subprocess.Popen([sys.executable, str(HERE / "gpt.py"), *map(str, common), "--out-dir",
                                    str(tmp_path / "b"), "--max-iters", str(total)], stderr=subprocess.PIPE, text=True)
        wait_for(lambda: (tmp_path / "b" / "last.pt").exists(), process)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT if stop == "ctrl-c" else signal.SIGTERM)
        err = process.communicate(timeout=120)[1]
        assert process.returncode == (130 if stop == "ctrl-c" else 143), err  # 128 + the signal, as shells report it
        assert "--resume" in err
        stopped_at = gpt.load_checkpoint(tmp_path / "b" / "last.pt")["step"]
        assert 0 < stopped_at < total, err
    else:
        first = run_gpt(*common, "--out-dir", tmp_path / "b", "--max-iters", 60)
        assert first.returncode == 0, first.stderr
    resumed = run_gpt("train", "--resume", "--out-dir", tmp_path / "b", "--data", data, "--max-iters", total)
    assert resumed.returncode == 0, resumed.stderr
    b = gpt.load_checkpoint(tmp_path / "b" / "last.pt")
    assert_same_run(a, b)
    assert a["history"] == [h for h in b["history"] if h["step"] % 25 == 0 or h["step"] == total]


def test_a_float16_run_resumes_with_its_loss_scaler_bit_for_bit(tmp_path):
    # float16 scales the loss and counts the steps since the scale last changed: both are saved.
    straight = train_cfg(tmp_path, dtype="float16", max_iters=12, lr_decay_iters=12, eval_interval=5, peak_flops=1e12)
    gpt.train(straight)
    gpt.train(gpt.dataclasses.replace(straight, max_iters=7, out_dir=str(tmp_path / "stopped")))
    resumed, checkpoint = gpt.resumed_config({"resume": True, "out_dir": str(tmp_path / "stopped"), "max_iters": 12})
    assert checkpoint["scaler_state"]["_growth_tracker"] == 7
    gpt.train(resumed, checkpoint)
    a, b = (gpt.load_checkpoint(Path(folder) / "last.pt") for folder in (straight.out_dir, tmp_path / "stopped"))
    assert a["scaler_state"] == b["scaler_state"] and a["scaler_state"]["_growth_tracker"] == 12
    assert_same_run(a, b)


def test_max_minutes_plans_a_step_count_that_reproduces_the_run_and_resumes(tmp_path, capsys):
    cfg = train_cfg(tmp_path, max_minutes=0.05, warmup_iters=10, max_iters=100000, eval_interval=50)  # 3 seconds
    start = time.perf_counter()
    result = gpt.train(cfg)
    assert time.perf_counter() - start < 3 + 20  # the budget, and the setting up around it (on a busy machine)
    planned = gpt.load_checkpoint(tmp_path / "out" / "last.pt")
    steps = planned["train_args"]["max_iters"]
    assert result["step"] == planned["step"] == steps < 100000 and planned["train_args"]["max_minutes"] == 0.05
    err = capsys.readouterr().err
    assert f"training as with --max-iters {steps}" in err
    # The plan: its steps, at the speed it measured (printed to the ms), fit in the 3 seconds.
    ms = float(re.search(r"steps fit \(([\d,]+) ms a step", err).group(1).replace(",", ""))
    assert steps * max(ms - 0.5, 0) / 1000 <= 3
    # the same run, given that count: the same weights, bit for bit
    gpt.train(gpt.dataclasses.replace(cfg, max_minutes=None, max_iters=steps, out_dir=str(tmp_path / "counted")))
    assert_same_run(planned, gpt.load_checkpoint(tmp_path / "counted" / "last.pt"))
    # and it resumes like any other run: with more steps, or refusing to plan again
    longer, checkpoint = gpt.resumed_config({"resume": True, "out_dir": str(tmp_path / "out"), "max_iters": steps + 5})
    assert longer.max_minutes is None and gpt.train(longer, checkpoint)["step"] == steps + 5
    with pytest.raises(gpt.GPTError, match="--max-minutes plans a new run"):
        gpt.resumed_config({"resume": True, "out_dir": str(tmp_path / "out"), "max_minutes": 1.0})


def test_a_max_minutes_run_stopped_before_its_plan_resumes_only_with_a_step_count(tmp_path, monkeypatch, capsys):
    cfg = train_cfg(tmp_path, max_minutes=0.05, warmup_iters=10, max_iters=100000)  # the plan at step 9
    real_learning_rate = gpt.learning_rate

    def ctrl_c_at_step_5(step, cfg):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the loop finishes step 5, saves last.pt and stops
        return real_learning_rate(step, cfg)
    monkeypatch.setattr(gpt, "learning_rate", ctrl_c_at_step_5)
    assert gpt.train(cfg)["interrupted"]
    err = capsys.readouterr().err
    assert "step 1/? |" in err and "ETA once planned" in err and "/100000" not in err  # no count, no ETA before it
    stopped = err.splitlines()[-1]
    assert "had not planned the run's length yet: start it again, or resume it with --max-iters" in stopped, stopped
    monkeypatch.setattr(gpt, "learning_rate", real_learning_rate)
    out = {"resume": True, "out_dir": cfg.out_dir}
    with pytest.raises(gpt.GPTError, match="stopped at step 6, before --max-minutes had planned"):
        gpt.resumed_config(out)  # not 100,000 steps, the count the plan would have replaced
    resumed, checkpoint = gpt.resumed_config({**out, "max_iters": 12})
    assert gpt.train(resumed, checkpoint)["step"] == 12


def test_a_second_training_into_a_busy_out_dir_is_refused_and_the_first_runs_on(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE[:20000], encoding="utf-8")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(HERE / "gpt.py"), "train", "--data", str(data), "--out-dir", str(out),
                                "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
                                "--max-iters", "100000", "--eval-interval", "5", "--eval-iters", "1", "--device", "cpu"],
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "last.pt").exists(), process)
    # --resume while it runs: the two would take turns overwriting last.pt, each deleting the other's temporary files
    assert gpt.main(["train", "--resume", "--out-dir", str(out), "--max-iters", "1"]) == 1
    assert "another training is writing into" in capsys.readouterr().err
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130 and "stopped at step" in err, err
    step = gpt.load_checkpoint(out / "last.pt")["step"]
    assert gpt.main(["train", "--resume", "--out-dir", str(out), "--max-iters", str(step + 1)]) == 0  # its lock is gone


def test_a_run_whose_log_reader_has_gone_still_stops_on_ctrl_c_and_saves(tmp_path):
    # `train 2>&1 | tee log`, then Ctrl-C: tee dies first, and every later log line meets a broken pipe
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE[:20000], encoding="utf-8")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(HERE / "gpt.py"), "train", "--data", str(data), "--out-dir", str(out),
                                "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
                                "--max-iters", "100000", "--eval-interval", "100000", "--eval-iters", "1", "--device",
                                "cpu"], stderr=subprocess.PIPE)
    wait_for(lambda: (out / "last.pt").exists(), process)
    process.stderr.close()  # the reader goes
    time.sleep(gpt.LOG_EVERY_SECONDS + 1)  # at least one log line has met the broken pipe
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert gpt.load_checkpoint(out / "last.pt")["step"] > 0  # saved at the stop, not only at step 0


@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_second_ctrl_c_or_sigterm_stops_at_once_without_saving(sent, code, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE[:20000], encoding="utf-8")
    out = tmp_path / "out"
    # Steps of a few hundred milliseconds, so that both Ctrl-Cs land inside one step; the only
    # save is at step 0.
    process = subprocess.Popen([sys.executable, str(HERE / "gpt.py"), "train", "--data", str(data), "--out-dir",
                                str(out), "--n-layer", "4", "--n-head", "4", "--n-embd", "512", "--block-size", "256",
                                "--batch-size", "16", "--max-iters", "100000", "--eval-interval", "100000",
                                "--eval-iters", "1", "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "last.pt").exists(), process)
    saved = (out / "last.pt").read_bytes()
    time.sleep(0.3)
    process.send_signal(sent)
    err = ""
    while "finishing this step" not in err:  # the first Ctrl-C has been seen; press again, as a person would
        err += process.stderr.readline()
    process.send_signal(sent)
    err += process.communicate(timeout=60)[1]
    assert process.returncode == code, err
    assert "Traceback" not in err and "stopped at step" not in err  # no save after the second Ctrl-C
    assert (out / "last.pt").read_bytes() == saved
    gpt.model_from_checkpoint(gpt.load_checkpoint(out / "ckpt.pt"))


def test_a_diverging_run_stops_with_a_clear_message_and_keeps_the_best_checkpoint(tmp_path, capsys):
    cfg = train_cfg(tmp_path, lr=1e4, min_lr=1e4, warmup_iters=0, max_iters=200, eval_interval=100)
    with pytest.raises(gpt.GPTError, match=r"diverged.*NaN or infinite by step \d+.*untouched"):
        gpt.train(cfg)
    for name in ("ckpt.pt", "last.pt"):
        checkpoint = gpt.load_checkpoint(Path(cfg.out_dir) / name)
        assert checkpoint["step"] == 0
        assert all(torch.isfinite(t).all() for t in checkpoint["model_state"].values())


def test_a_loss_evaluated_nan_stops_the_run_and_saves_nothing(tmp_path, monkeypatch):
    # A step whose own loss was finite can leave NaN weights: the evaluation after it sees them first.
    real, calls = gpt.estimate_loss, []

    def nan_after_step_0(model, batches, autocast_ctx):
        calls.append(model)
        return real(model, batches, autocast_ctx) if len(calls) <= 2 else torch.tensor(float("nan"))

    monkeypatch.setattr(gpt, "estimate_loss", nan_after_step_0)
    cfg = train_cfg(tmp_path, max_iters=4, eval_interval=2)
    with pytest.raises(gpt.GPTError, match=r"diverged.*step 2.*untouched"):
        gpt.train(cfg)
    assert [gpt.load_checkpoint(Path(cfg.out_dir) / name)["step"] for name in ("ckpt.pt", "last.pt")] == [0, 0]


# ---------------------------------------------------------------------------------------------
# corpora larger than memory: prepared token files
# ---------------------------------------------------------------------------------------------

# Texts that probe the cuts: every kind of whitespace at every place, words, digits,
# punctuation, contractions, multi-byte characters, and GPT-2's special token.
corpus_texts = st.lists(st.sampled_from([" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "word", "Word",
                                         "'s", "'ll", "42", "7", "!", ",", "...", "é", "日本", "🙂", "\x1c",
                                         "<|endoftext|>"]), min_size=1, max_size=60).map("".join)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=corpus_texts, chunk=st.integers(1, 64), kind=st.sampled_from(["char", "bpe"]))
# Where a wrong cut shows (GPT-2's ids differ): reads that end inside a word, a number, a
# contraction, a multi-byte character or the special token, and inside a run of whitespace,
# which GPT-2 splits so that its last character goes with the next word.
@example(text="one  two   three    four\n\n\n\nfive", chunk=3, kind="bpe")  # cuts inside runs of whitespace
@example(text="one  two   three    four\n\n\n\nfive", chunk=2, kind="bpe")
@example(text="a   b  c", chunk=2, kind="bpe")  # a cut after whitespace, before a word
@example(text="Word words it'll 4242", chunk=3, kind="bpe")
@example(text="é日本🙂 é日本🙂", chunk=1, kind="bpe")
@example(text="é日本🙂 é日本🙂", chunk=2, kind="char")
@example(text="x <|endoftext|>y\n<|endoftext|>", chunk=5, kind="bpe")
@example(text="\r\n\r\n \t word\u00a0\u3000x\x1cy", chunk=1, kind="bpe")
@example(text="one two three four five six seven", chunk=32, kind="bpe")  # a chunk cut into BPE's pieces
def test_prepared_tokens_are_the_encoding_of_the_whole_text_wherever_the_chunks_end(text, chunk, kind, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setattr(gpt, "PREPARE_CHUNK_BYTES", chunk)  # cuts every few bytes, not every 4 MB,
    monkeypatch.setattr(gpt, "PREPARE_PIECE_CHARS", chunk // 4)  # and BPE's pieces a quarter of that, as 1 MB of 4 MB
    source = tmp_path / f"text-{kind}-{chunk}.txt"
    source.write_text(text, encoding="utf-8", newline="")
    with contextlib.redirect_stderr(io.StringIO()):
        path = gpt.prepare(gpt.PrepareConfig(data=str(source), tokenizer=kind, out=str(tmp_path / "t.tokens")))
    header, tokens = gpt.read_token_file(path)
    tokenizer = gpt.CharTokenizer.from_text(text) if kind == "char" else gpt.BPETokenizer()
    expected = tokenizer.encode(text)
    assert tokens[torch.arange(len(tokens))].tolist() == expected
    assert gpt.encode_text(tokenizer, text).tolist() == expected  # train's encoding, in pieces of the same size
    assert header["tokens"] == len(expected) and header["dtype"] == "uint16" and header["source"] == source.name
    assert header["source_bytes"] == len(text.encode("utf-8"))
    assert gpt.tokenizer_from_dict(header["tokenizer"], path).vocab_size == tokenizer.vocab_size


def test_a_text_is_cut_into_pieces_of_about_the_same_size_past_a_stretch_without_a_place_to_cut(monkeypatch):
    # (The pieces' ids are the whole text's: the test above.) One stretch that cannot be cut must not
    # make the rest of the text one piece, which would take its memory and its progress lines away.
    monkeypatch.setattr(gpt, "PREPARE_PIECE_CHARS", 10)
    text = "x" * 50 + " ab" * 100
    pieces = list(gpt.cut_pieces(text))
    assert "".join(pieces) == text and pieces[0] == "x" * 50  # cut at the first place after the stretch
    assert all(0 < len(piece) <= 10 for piece in pieces[1:]) and len(pieces) == 1 + 34, pieces


def test_a_token_file_holds_ids_above_32767_and_uint32_when_the_vocabulary_needs_it(tmp_path):
    source = tmp_path / "wide.txt"
    source.write_text(" the cat sat on the mat; and then ~ a zebra (Zürich) in 2024", encoding="utf-8")
    with contextlib.redirect_stderr(io.StringIO()):
        header, tokens = gpt.read_token_file(gpt.prepare(gpt.PrepareConfig(data=str(source), tokenizer="bpe")))
    ids = tokens[torch.arange(len(tokens))].tolist()
    assert ids == gpt.BPETokenizer().encode(source.read_text(encoding="utf-8")) and max(ids) > 32767
    many = "".join(chr(c) for c in range(0x20000, 0x20000 + 70_000))  # 70,000 characters: more than uint16 holds
    source.write_text(many + " " + many[:10], encoding="utf-8")
    with contextlib.redirect_stderr(io.StringIO()):
        header, tokens = gpt.read_token_file(gpt.prepare(gpt.PrepareConfig(data=str(source), tokenizer="char")))
    assert header["dtype"] == "uint32"
    text = source.read_text(encoding="utf-8")
    assert tokens[torch.arange(len(tokens))].tolist() == gpt.CharTokenizer.from_text(text).encode(text)


def test_training_on_a_text_and_on_its_prepared_tokens_gives_the_same_run_bit_for_bit(tmp_path):
    text_run = train_cfg(tmp_path, max_iters=20, eval_interval=10, dropout=0.1)
    with contextlib.redirect_stderr(io.StringIO()):
        tokens = gpt.prepare(gpt.PrepareConfig(data=text_run.data))
    gpt.train(text_run)
    gpt.train(gpt.dataclasses.replace(text_run, data=str(tokens), out_dir=str(tmp_path / "from-tokens")))
    a, b = (gpt.load_checkpoint(Path(folder) / "last.pt") for folder in (text_run.out_dir, tmp_path / "from-tokens"))
    assert_same_run(a, b)
    assert a["history"] == b["history"] and a["tokenizer"] == b["tokenizer"]


def test_a_token_file_prepared_again_while_training_reads_gives_the_run_its_first_ids(tmp_path):
    # The run keeps the file it opened: prepare's new file (renamed over the old name) is not
    # half read into it, however much shorter or longer it is.
    source = tmp_path / "text.txt"
    source.write_text("abcd" * 500, encoding="utf-8")
    with contextlib.redirect_stderr(io.StringIO()):
        _, tokens = gpt.read_token_file(gpt.prepare(gpt.PrepareConfig(data=str(source))))
        first = tokens[torch.arange(len(tokens))].tolist()
        source.write_text("zyx", encoding="utf-8")
        gpt.prepare(gpt.PrepareConfig(data=str(source)))
    assert tokens[torch.arange(len(tokens))].tolist() == first == [0, 1, 2, 3] * 500
    assert tokens[500:][torch.arange(8)].tolist() == first[500:508]
    with contextlib.redirect_stderr(io.StringIO()):
        _, tokens = gpt.read_token_file(gpt.prepare(gpt.PrepareConfig(data=str(source), out=str(tmp_path / "b"))))
    os.truncate(tmp_path / "b", tokens.start + 2)  # written over in place (cp): the very file the run reads shrinks
    with pytest.raises(gpt.GPTError, match="shorter than when training began"):
        tokens[torch.arange(len(tokens))]


def test_a_batch_the_data_refuses_mid_run_first_saves_the_steps_done(tmp_path, monkeypatch, capsys):
    cfg = train_cfg(tmp_path, max_iters=30, eval_interval=100)  # one evaluation: at step 0, of 2 + 2 batches
    tokens = gpt.prepare(gpt.PrepareConfig(data=cfg.data))
    reads, real_read = [], gpt.TokenFile.__getitem__

    def damaged_after_10_steps(self, index):
        if isinstance(index, torch.Tensor):  # a batch read, not a slice
            reads.append(index)
            if len(reads) == 4 + 10 + 1:
                raise gpt.GPTError(f"{tokens} holds token ids outside its tokenizer's: prepare it again")
        return real_read(self, index)
    monkeypatch.setattr(gpt.TokenFile, "__getitem__", damaged_after_10_steps)
    with pytest.raises(gpt.GPTError, match="outside its tokenizer"):
        gpt.train(gpt.dataclasses.replace(cfg, data=str(tokens)))
    assert capsys.readouterr().err.splitlines()[-1] == f"saved {Path(cfg.out_dir) / 'last.pt'} at step 10, the last whole one"
    saved = gpt.load_checkpoint(Path(cfg.out_dir) / "last.pt")
    assert saved["step"] == 10 and [h["step"] for h in saved["history"]] == [0]  # ten steps past the evaluation
    monkeypatch.setattr(gpt.TokenFile, "__getitem__", real_read)  # the data mended, the run goes on from there
    assert gpt.train(*gpt.resumed_config({"resume": True, "out_dir": cfg.out_dir}))["step"] == 30


def test_data_prepared_with_another_tokenizer_is_refused_with_one_line(trained, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE[:20000], encoding="utf-8")
    with contextlib.redirect_stderr(io.StringIO()):
        bpe = gpt.prepare(gpt.PrepareConfig(data=str(data), tokenizer="bpe"))
    run = shutil.copytree(trained, tmp_path / "run")
    before = folder_bytes(run)
    assert gpt.main(["train", "--resume", "--out-dir", str(run), "--data", str(bpe)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another tokenizer" in err and "GPT-2's BPE" in err and "char" in err, err
    assert "give --data the text itself" in err  # a char vocabulary cannot be prepared from another text
    assert folder_bytes(run) == before
    assert gpt.main(["train", "--data", str(bpe), "--tokenizer", "char", "--out-dir", str(tmp_path / "new")]) == 1
    assert "--tokenizer char does not match" in capsys.readouterr().err and not (tmp_path / "new").exists()


def peak_memory_of(argv):
    """Run a command; -> (its exit status, its peak resident memory in bytes), from the kernel's own
    accounting. A small Python process starts it: a process's peak counts what it held before its
    exec, and a child forked from this test process would start with all of this process's memory."""
    launcher = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, "
                "stderr=subprocess.DEVNULL); _, status, usage = os.wait4(p.pid, 0); "
                "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)")  # Linux reports kilobytes
    code, peak = subprocess.run([sys.executable, "-c", launcher, *argv], capture_output=True, text=True,
                                timeout=300).stdout.split()
    return int(code), int(peak)


def test_prepare_memory_is_bounded_whatever_the_files_size(tmp_path):
    # The same plays, 18 MB and then 54 MB of them, through BPE. Read whole and encoded in one
    # piece, the second would take about 800 MB (tiktoken's lists of ids alone: about 36 bytes a
    # token); in 8 MB chunks, each thread's list turned into 2 bytes an id at once, both take
    # under 140 MB above Python and torch (about 100 MB measured).
    baseline = peak_memory_of([sys.executable, str(HERE / "gpt.py"), "--help"])[1]
    memory = {}
    for copies in (16, 48):
        source = tmp_path / f"x{copies}.txt"
        with open(source, "w", encoding="utf-8") as f:
            for i in range(copies):
                f.write(SHAKESPEARE[i * 1000:] + SHAKESPEARE[:i * 1000])  # the plays, turned by a little each time
        code, memory[copies] = peak_memory_of([sys.executable, str(HERE / "gpt.py"), "prepare", "--data", str(source),
                                               "--tokenizer", "bpe"])
        assert code == 0
    assert abs(memory[48] - memory[16]) < 40e6 and memory[48] - baseline < 140e6, (baseline, memory)


def test_training_memory_does_not_grow_with_the_corpus(tmp_path):
    # Token files of 1 and 30 copies of the plays; a run that touched its data as a whole (or kept
    # the pages it read mapped) would take tens of MB more on the second.
    memory = {}
    for copies in (1, 30):
        source = tmp_path / f"x{copies}.txt"
        source.write_text("".join(SHAKESPEARE[i * 1000:] + SHAKESPEARE[:i * 1000] for i in range(copies)),
                          encoding="utf-8")
        assert run_gpt("prepare", "--data", source).returncode == 0
        code, memory[copies] = peak_memory_of([sys.executable, str(HERE / "gpt.py"), "train", "--data",
                                               f"{source}.tokens", "--out-dir", tmp_path / f"run{copies}",
                                               "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size",
                                               "64", "--max-iters", "40", "--eval-interval", "20", "--eval-iters", "20",
                                               "--device", "cpu"])
        assert code == 0
    assert memory[30] - memory[1] < 25e6, memory


@pytest.mark.parametrize("raw, chunk, words", [
    (b"ab\xe2\x82" + b"Xyz", 4, ["byte 2", "(line 1)", "b'\\xe2'"]),  # a character cut by a read, then broken
    (b"a\nb\xe2\x82", 2, ["ends inside a character", "byte 3"]),
    (b"line one\nna\xefve\n", 3, ["byte 11", "(line 2)", "b'\\xef'"]),
])
def test_prepare_names_the_byte_and_line_of_bad_utf8_whatever_the_chunks(raw, chunk, words, tmp_path, monkeypatch):
    monkeypatch.setattr(gpt, "PREPARE_CHUNK_BYTES", chunk)
    (tmp_path / "bad.txt").write_bytes(raw)
    with pytest.raises(gpt.GPTError) as error:
        with contextlib.redirect_stderr(io.StringIO()):
            gpt.prepare(gpt.PrepareConfig(data=str(tmp_path / "bad.txt")))
    assert all(word in str(error.value) for word in words), str(error.value)


def test_long_jobs_show_progress_with_an_eta(tmp_path, monkeypatch, capsys):
    # A progress line is due every LOG_EVERY_SECONDS; at 0, every call of each job's report logs.
    monkeypatch.setattr(gpt, "LOG_EVERY_SECONDS", 0)
    monkeypatch.setattr(gpt, "PREPARE_CHUNK_BYTES", 4096)
    monkeypatch.setattr(gpt, "PREPARE_PIECE_CHARS", 1000)  # train encodes its text in pieces of this many characters
    cfg = train_cfg(tmp_path, max_iters=2, eval_interval=2, eval_iters=3)
    gpt.prepare(gpt.PrepareConfig(data=cfg.data))
    gpt.train(cfg)
    gpt.sample(gpt.SampleConfig(out_dir=cfg.out_dir, max_new_tokens=3, num_samples=2), out=io.StringIO())  # to a file
    err = capsys.readouterr().err
    assert [line.split(",")[0] for line in err.splitlines() if line.startswith("sampling:")] == [
        f"sampling: {n} of 6 tokens" for n in range(1, 7)]
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # where the text itself shows the progress
    gpt.sample(gpt.SampleConfig(out_dir=cfg.out_dir, max_new_tokens=3), out=terminal)
    assert "sampling:" not in capsys.readouterr().err
    for job in ("collecting the characters", "encoding (char)", "encoding the text (char)", "evaluating the train loss",
                "evaluating the val loss", "sampling"):
        lines = [line for line in err.splitlines() if line.startswith(job + ":")]
        assert lines and all("ETA" in line and "/s" in line for line in lines), (job, err)
    assert [line for line in err.splitlines() if line.startswith("encoding")][-1].endswith("ETA 0m00s")  # at the end


def test_training_progress_gives_the_time_left_from_the_steps_left(tmp_path, monkeypatch, capsys):
    # A clock that only training steps move, by 10 s each: every step is due a line (10 s >
    # LOG_EVERY_SECONDS), evaluations take no time, so step k of 12 has exactly (12 - k) x 10 s left.
    clock = [0.0]
    monkeypatch.setattr(gpt.time, "perf_counter", lambda: clock[0])
    real_step = gpt.train_step

    def ten_second_step(*args):
        clock[0] += 10.0
        return real_step(*args)

    monkeypatch.setattr(gpt, "train_step", ten_second_step)
    gpt.train(train_cfg(tmp_path, max_iters=12, eval_interval=100, eval_iters=1, peak_flops=1e12))  # no timed probe
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ") and "ETA" in line]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(1, 13))
    for k, line in enumerate(lines, start=1):
        assert "10000 ms/step" in line and line.endswith(f"ETA {gpt.duration(10 * (12 - k))}"), line


def test_bad_prepare_inputs_get_one_line_and_leave_no_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("line one\nna\xefve\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("some text\n", encoding="utf-8")
    (tmp_path / "a_file").write_text("not a folder")
    cases = [
        (["--data", str(tmp_path / "nope.txt")], ["nope.txt", "does not exist"]),
        (["--data", str(tmp_path / "empty.txt")], ["empty.txt", "empty"]),
        (["--data", str(tmp_path / "latin1.txt")], ["not UTF-8", "byte 11", "line 2"]),
        (["--data", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "a_file" / "ok.tokens")], ["--out", "a_file"]),
        (["--data", str(tmp_path / "ok.txt"), "--tokenizer", "words"], ["--tokenizer", "'words'"]),
        # prepare replaces only a token file: never the text itself, another text, or a checkpoint
        (["--data", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "ok.txt")], ["--out", "not a token file"]),
        (["--data", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "a_file")], ["--out", "not a token file"]),
        (["--data", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "ckpt.pt")], ["--out", "not a token file"]),
        (["--data", str(tmp_path / "t.tokens"), "--out", str(tmp_path / "t.tokens")], ["t.tokens", "token file already"]),
    ]
    torch.save({"format": 1}, tmp_path / "ckpt.pt")
    gpt.prepare(gpt.PrepareConfig(data=str(tmp_path / "ok.txt"), out=str(tmp_path / "t.tokens")))
    capsys.readouterr()
    before = folder_bytes(tmp_path)
    for argv, words in cases:
        assert gpt.main(["prepare", *argv]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(word in err for word in words), (argv, err)
        assert folder_bytes(tmp_path) == before, argv
    for text in ("some text\n", "other text\n"):  # a token file is replaced, as preparing a text again does
        (tmp_path / "ok.txt").write_text(text, encoding="utf-8")
        assert gpt.main(["prepare", "--data", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "ok.tokens")]) == 0
        assert gpt.read_token_file(tmp_path / "ok.tokens")[0]["tokenizer"]["chars"] == "".join(sorted(set(text)))


def test_train_reads_a_text_without_whitespace_that_prepare_must_refuse(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpt, "LONGEST_UNCUT", 2000)  # as over 128 MB of DNA letters would be
    monkeypatch.setattr(gpt, "PREPARE_CHUNK_BYTES", 512)
    cfg = train_cfg(tmp_path, text="".join(random.Random(0).choice("ACGT") for _ in range(5000)), max_iters=2)
    assert gpt.train(cfg)["step"] == 2  # train reads a text whole: no cut, no limit
    assert gpt.main(["prepare", "--data", cfg.data]) == 1  # prepare cuts at whitespace, to bound its memory
    assert "without whitespace" in capsys.readouterr().err.splitlines()[-1]


def test_the_commands_that_gpt_py_prints_to_go_on_work_when_pasted_into_a_shell(tmp_path, capsys):
    out = tmp_path / "my run ~"  # a space, and a tilde that a shell would expand
    gpt.train(train_cfg(tmp_path, out_dir=str(out), max_iters=2, eval_interval=2))
    assert shlex.split(capsys.readouterr().err.split("sample with: ")[-1]) == ["python", "gpt.py", "sample",
                                                                              "--out-dir", str(out)]
    assert gpt.main(["sample", "--out-dir", str(tmp_path / "no run")]) == 1
    hint = capsys.readouterr().err.split("train one with: ")[-1]
    assert shlex.split(hint) == ["python", "gpt.py", "train", "--out-dir", str(tmp_path / "no run")]


def test_a_damaged_token_file_gets_one_line_and_trains_nothing(tmp_path, capsys):
    (tmp_path / "ok.txt").write_text(SHAKESPEARE[:5000], encoding="utf-8")
    good = gpt.prepare(gpt.PrepareConfig(data=str(tmp_path / "ok.txt"), out=str(tmp_path / "ok.tokens"))).read_bytes()
    size = int.from_bytes(good[8:16], "little")
    header, _ = json.loads(good[16:16 + size]), capsys.readouterr()
    damaged = {
        "truncated": good[:-1],
        "header longer than the file": good[:8] + (2**62).to_bytes(8, "little") + good[16:],
        "header not JSON": good[:16] + b"\xff" * size + good[16 + size:],
        "header a JSON list": good[:16] + b"[1, 2]".ljust(size) + good[16 + size:],
        "header nested too deep": good[:8] + (10**5).to_bytes(8, "little") + b"[" * 10**5 + good[16 + size:],
        "another format": good[:16] + json.dumps({**header, "format": 2}).encode().ljust(size) + good[16 + size:],
        "no count": good[:16] + json.dumps({**header, "tokens": None}).encode().ljust(size) + good[16 + size:],
    }
    for why, data in damaged.items():
        (tmp_path / "bad.tokens").write_bytes(data)
        assert gpt.main(["train", "--data", str(tmp_path / "bad.tokens"), "--out-dir", str(tmp_path / "out"),
                         "--max-iters", "1"]) == 1, why
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "bad.tokens" in err and "token file" in err, (why, err)
        assert not (tmp_path / "out").exists(), why
    ids = slice(16 + size, None)
    for why, data, words in [  # complete files, whose header or ids do not fit
        ("ids past the vocabulary", good[:ids.start] + b"\xff" * len(good[ids]), ["outside its tokenizer"]),
        ("a char tokenizer without its characters", good[:16] + json.dumps({**header, "tokenizer": {"kind": "char"}})
         .encode().ljust(size) + good[ids], ["unknown tokenizer", "chars"])]:
        (tmp_path / "bad.tokens").write_bytes(data)
        assert gpt.main(["train", "--data", str(tmp_path / "bad.tokens"), "--out-dir", str(tmp_path / "out2"),
                         "--max-iters", "1"]) == 1, why
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, (why, err)
        assert "bad.tokens" in err.splitlines()[-1] and all(word in err for word in words), (why, err)
        assert not (tmp_path / "out2" / "ckpt.pt").exists(), why


# ---------------------------------------------------------------------------------------------
# several processes: torchrun and DDP (gloo, on this CPU)
# ---------------------------------------------------------------------------------------------

def torchrun(processes, *args, wait=True, timeout=240):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            str(HERE / "gpt.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:  # in a process group of its own, as a terminal starts a command: os.killpg is a Ctrl-C typed
        return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def ddp_args(tmp_path, **flags):
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE[:20000], encoding="utf-8")
    settings_ = {"data": data, "n-layer": 1, "n-head": 2, "n-embd": 32, "block-size": 32, "batch-size": 4,
                 "grad-accum": 4, "eval-interval": 10, "eval-iters": 3, "dtype": "float32", "device": "cpu",
                 "dropout": 0, **flags}  # no dropout unless asked: its masks differ from process to process
    return ["train", *[x for name, value in settings_.items() for x in (f"--{name}", value)]]


def test_two_processes_train_the_same_model_as_one_to_within_float_rounding(tmp_path):
    one = run_gpt(*ddp_args(tmp_path, **{"max-iters": 30, "out-dir": tmp_path / "one"}))
    two = torchrun(2, *ddp_args(tmp_path, **{"max-iters": 30, "out-dir": tmp_path / "two"}))
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = (gpt.load_checkpoint(tmp_path / run / "last.pt") for run in ("one", "two"))
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [0, 10, 20, 30]
    for h1, h2 in zip(a["history"], b["history"]):  # the same micro-batches; sums in another order
        assert h1["train"] == pytest.approx(h2["train"], rel=1e-5) and h1["val"] == pytest.approx(h2["val"], rel=1e-5)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for name, weight in a["model_state"].items():
        torch.testing.assert_close(weight, b["model_state"][name], rtol=1e-4, atol=1e-5)
    assert len(b["rng_by_rank"]) == 2  # and each process's own: its dropout draws its own masks
    assert not torch.equal(b["rng_by_rank"][0]["torch"], b["rng_by_rank"][1]["torch"])
    assert two.stderr.count("step 30: train loss") == 1  # rank 0 alone logs


def test_ctrl_c_under_torchrun_stops_all_processes_at_one_step_and_resumes_bit_for_bit(tmp_path):
    flags = {"dropout": 0.1, "lr-decay-iters": 1000}
    straight = torchrun(2, *ddp_args(tmp_path, **flags, **{"max-iters": 120, "out-dir": tmp_path / "straight"}))
    assert straight.returncode == 0, straight.stderr
    process = torchrun(2, *ddp_args(tmp_path, **flags, **{"max-iters": 1000, "out-dir": tmp_path / "stopped"}),
                       wait=False)
    wait_for(lambda: (tmp_path / "stopped" / "ckpt.pt").exists(), process, seconds=120)
    time.sleep(0.5)
    # A Ctrl-C that reaches rank 1 alone: both processes must stop after the same step.
    environs = {pid: Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in child_processes(process.pid)}
    os.kill(next(pid for pid, environ in environs.items() if b"RANK=1" in environ), signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    stopped = gpt.load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert 0 < stopped["step"] < 120 and "stopped at step" in err, err
    assert err.count("stopped at step") == 1
    again = shutil.copytree(tmp_path / "stopped", tmp_path / "again")  # the same checkpoint, resumed by one process
    resumed = torchrun(2, "train", "--resume", "--out-dir", tmp_path / "stopped", "--max-iters", 120)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(gpt.load_checkpoint(tmp_path / "straight" / "last.pt"),
                    gpt.load_checkpoint(tmp_path / "stopped" / "last.pt"))
    alone = run_gpt("train", "--resume", "--out-dir", again, "--max-iters", 120)
    assert alone.returncode == 0, alone.stderr
    finished = gpt.load_checkpoint(again / "last.pt")
    assert finished["step"] == 120 and [h["step"] for h in finished["history"]][-1] == 120


def test_ctrl_c_typed_at_torchrun_reaches_each_process_once_and_each_saves_at_one_step(tmp_path):
    # A terminal's Ctrl-C goes to its foreground process group: torchrun alone (it starts each process
    # in a session of its own), which passes it on once. Were it to reach a process twice, the second
    # would stop it at once, without saving (test_a_second_ctrl_c_stops_at_once_without_saving).
    process = torchrun(2, *ddp_args(tmp_path, **{"max-iters": 100000, "out-dir": tmp_path / "out"}), wait=False)
    wait_for(lambda: (tmp_path / "out" / "ckpt.pt").exists(), process, seconds=120)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)
    err = process.communicate(timeout=60)[1]
    stopped = re.findall(r"stopped at step (\d+); saved", err)
    assert len(stopped) == 1 and "interrupted" not in err, err
    saved = gpt.load_checkpoint(tmp_path / "out" / "last.pt")
    assert saved["step"] == int(stopped[0]) > saved["history"][-1]["step"]  # the step it stopped at, after an evaluation


def child_processes(pid):
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_a_process_killed_outright_brings_the_others_down_and_leaves_a_loadable_checkpoint(tmp_path):
    process = torchrun(2, *ddp_args(tmp_path, **{"max-iters": 100000, "eval-interval": 5, "out-dir": tmp_path / "out"}),
                       wait=False)
    wait_for(lambda: (tmp_path / "out" / "last.pt").exists(), process, seconds=120)
    time.sleep(1.0)
    workers = child_processes(process.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    process.communicate(timeout=120)
    assert process.returncode != 0
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
               for pid in workers)
    gpt.model_from_checkpoint(gpt.load_checkpoint(tmp_path / "out" / "last.pt"))


def test_a_nan_stops_every_process_and_the_first_says_why_once_and_uneven_shares_are_refused(tmp_path):
    diverged = torchrun(2, *ddp_args(tmp_path, **{"lr": 1e4, "min-lr": 1e4, "warmup-iters": 0, "max-iters": 200,
                                                  "eval-interval": 100, "out-dir": tmp_path / "nan"}))
    assert diverged.returncode != 0
    assert diverged.stderr.count("error: training diverged") == 1, diverged.stderr  # others: "error (process 1 of 2)"
    uneven = torchrun(2, *ddp_args(tmp_path, **{"grad-accum": 3, "out-dir": tmp_path / "uneven"}))
    assert uneven.returncode != 0 and uneven.stderr.count("error: --grad-accum 3 is not divisible") == 1, uneven.stderr


# ---------------------------------------------------------------------------------------------
# pictures: the loss curve and the attention heatmaps
# ---------------------------------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def read_axis(root, axis):
    """(tick positions, tick values) as the picture shows them to a reader."""
    ticks = [float(line.get("x1" if axis == "x" else "y1")) for line in root.iter(SVG + "line")
             if line.get("class") == f"{axis}-tick"]
    values = [float(text.text) for text in root.iter(SVG + "text") if text.get("class") == f"{axis}-label"]
    assert len(ticks) == len(values) >= 2
    return ticks, values


def reading(ticks, values, position):
    """The value at a position on an axis, read off its first and last ticks (a linear axis)."""
    return values[0] + (position - ticks[0]) * (values[-1] - values[0]) / (ticks[-1] - ticks[0])


def test_the_loss_curve_reads_back_to_the_runs_history_with_the_best_val_marked(trained):
    history = gpt.load_checkpoint(trained / "last.pt")["history"]
    root = ElementTree.parse(trained / "loss.svg").getroot()
    x_axis, y_axis = read_axis(root, "x"), read_axis(root, "y")
    y_span = max(h[s] for h in history for s in ("train", "val")) - min(h[s] for h in history for s in ("train", "val"))
    for split in ("train", "val"):
        line = next(p for p in root.iter(SVG + "polyline") if p.get("class") == split)
        points = [tuple(map(float, point.split(","))) for point in line.get("points").split()]
        assert len(points) == len(history)
        for (px, py), h in zip(points, history):
            assert reading(*x_axis, px) == pytest.approx(h["step"], abs=1e-3)
            assert reading(*y_axis, py) == pytest.approx(h[split], abs=1e-4 * max(y_span, 1e-3))
    assert y_axis[1] == sorted(y_axis[1]) and y_axis[0] == sorted(y_axis[0], reverse=True)  # a higher loss, higher up
    best = min(history, key=lambda h: h["val"])
    circle = next(root.iter(SVG + "circle"))
    assert reading(*x_axis, float(circle.get("cx"))) == pytest.approx(best["step"], abs=1e-3)
    assert reading(*y_axis, float(circle.get("cy"))) == pytest.approx(best["val"], abs=1e-4 * max(y_span, 1e-3))


def test_a_resumed_run_draws_its_whole_history(tmp_path):
    gpt.train(train_cfg(tmp_path, max_iters=20, eval_interval=10))
    cfg, checkpoint = gpt.resumed_config({"resume": True, "out_dir": str(tmp_path / "out"), "max_iters": 40})
    gpt.train(cfg, checkpoint)
    root = ElementTree.parse(tmp_path / "out" / "loss.svg").getroot()
    points = next(p for p in root.iter(SVG + "polyline") if p.get("class") == "val").get("points").split()
    assert len(points) == 5  # steps 0, 10, 20 of the first run, 30 and 40 of the resumed one


@pytest.fixture(scope="module")
def inspected(trained, tmp_path_factory):
    svg = tmp_path_factory.mktemp("inspect") / "attention.svg"
    out, err = io.StringIO(), io.StringIO()
    prompt = "Enter KING:\nWhat, ho!"  # 21 characters: longer than --max-tokens; its last 12 hold a newline
    with contextlib.redirect_stderr(err):
        top, weights = gpt.inspect(gpt.InspectConfig(out_dir=str(trained), prompt=prompt, max_tokens=12, svg=str(svg)),
                                   out)
    return dict(prompt=prompt, svg=svg, top=top, weights=weights, out=out.getvalue(), err=err.getvalue())


def test_inspect_prints_the_softmax_of_the_models_last_logits_over_the_whole_prompt(inspected, trained):
    model, tokenizer = gpt.model_from_checkpoint(gpt.load_checkpoint(trained / "ckpt.pt"))
    with torch.no_grad():  # the whole prompt, as far as the model reaches (block_size 16), not only the 12 drawn
        logits = model.eval()(torch.tensor([tokenizer.encode(inspected["prompt"])[-16:]]))[0][0, -1]
    probs = torch.softmax(logits.double(), dim=-1)
    lines = inspected["out"].splitlines()[1:]
    assert len(lines) == 10
    expected = probs.topk(10)
    for line, p, i in zip(lines, expected.values.tolist(), expected.indices.tolist()):
        shown, percent, bar = re.fullmatch(r"\s*(.*\S)\s+(\d+\.\d+)% ?(#*)", line).groups()
        assert shown == repr(tokenizer.decode([i]))  # quoted: a newline reads '\n', a space ' '
        assert float(percent) == pytest.approx(100 * p, abs=0.006)
        assert len(bar) == round(50 * p)


def test_inspect_draws_the_models_own_attention_weights(inspected, trained):
    # Layer 0 by hand, independent of gpt.py's attention: embeddings, ln_1, c_attn, one head at a time.
    model, tokenizer = gpt.model_from_checkpoint(gpt.load_checkpoint(trained / "ckpt.pt"))
    ids = torch.tensor(tokenizer.encode(inspected["prompt"])[-16:])  # what the model reads: block_size tokens
    T, C, nh = len(ids), model.config.n_embd, model.config.n_head
    block = model.transformer.h[0]
    with torch.no_grad():
        x = model.transformer.wte.weight[ids] + model.transformer.wpe.weight[:T]
        qkv = torch.nn.functional.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias) @ block.attn.c_attn.weight.T \
            + block.attn.c_attn.bias
        for head in range(nh):
            hs = C // nh
            q, k = qkv[:, head * hs:(head + 1) * hs], qkv[:, C + head * hs:C + (head + 1) * hs]
            scores = (q @ k.T / math.sqrt(hs)).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            torch.testing.assert_close(inspected["weights"][0][head], torch.softmax(scores, dim=-1), atol=1e-5, rtol=0)
    assert len(inspected["weights"]) == model.config.n_layer
    assert "over the last 12 of 16 tokens read" in inspected["err"]


def test_the_attention_picture_shades_each_weight_and_leaves_the_future_blank(inspected):
    root = ElementTree.parse(inspected["svg"]).getroot()
    heatmaps = [g for g in root.iter(SVG + "g") if g.get("class") == "heatmap"]
    assert len(heatmaps) == len(inspected["weights"]) * inspected["weights"][0].size(0)
    cells = []
    for g in heatmaps:
        layer, head = int(g.get("data-layer")), int(g.get("data-head"))
        rows = {}
        for rect in g.iter(SVG + "rect"):
            i, j = int(rect.get("y")), int(rect.get("x"))  # the cell of query i and key j of the last 12 of 16
            assert j <= i  # nothing drawn above the diagonal: the future is blank
            w = inspected["weights"][layer][head, 4 + i, 4 + j].item()
            rows[i] = rows.get(i, 0) + 1
            cells.append((w, tuple(int(rect.get("fill")[n:n + 2], 16) for n in (1, 3, 5))))
        assert rows == {i: i + 1 for i in range(12)}  # every row drawn, over exactly the keys it may see
        torch.testing.assert_close(inspected["weights"][layer][head].sum(-1), torch.ones(16))  # softmax rows
    cells.sort()
    for (w1, c1), (w2, c2) in zip(cells, cells[1:]):  # darker, channel by channel, as the weight grows
        assert all(a >= b for a, b in zip(c1, c2)), (w1, c1, w2, c2)
    labels = [t.text for t in root.iter(SVG + "text")]
    assert "\u23ce" in labels and "\u2423" in labels  # the newline and the spaces are drawn as signs
    weights = [torch.softmax(torch.randn(1, 5, 5), dim=-1)]  # characters XML cannot hold, as they are drawn:
    ElementTree.fromstring(gpt.attention_svg(weights, [gpt.visible(ch) for ch in "\x0c\x1b\x7f\ufffe\uffff"]))


# ---------------------------------------------------------------------------------------------
# devices this machine does not have: each decision checked with device objects on the CPU
# ---------------------------------------------------------------------------------------------

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")  # objects: no hardware needed


def test_copies_to_a_device_are_non_blocking_on_cuda_only():
    tensor = types.SimpleNamespace(to=lambda device, non_blocking: non_blocking)  # says how it was copied
    assert gpt.to_device(tensor, CUDA) and not gpt.to_device(tensor, MPS) and not gpt.to_device(tensor, CPU)


@quick
@given(Tk=st.integers(1, 40), queries=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
@example(Tk=1, queries=1, dtype=torch.float16)
@example(Tk=5, queries=5, dtype=torch.bfloat16)  # training: the square mask
@example(Tk=5, queries=1, dtype=torch.float32)  # one new token: it sees everything
@example(Tk=5, queries=2, dtype=torch.float32)  # two new tokens after three cached ones
def test_the_causal_mask_lets_each_query_see_exactly_the_keys_up_to_its_position(Tk, queries, dtype):
    Tq = min(queries, Tk)
    mask = gpt.causal_mask(Tq, Tk, dtype, CPU)
    assert mask.shape == (Tq, Tk) and mask.dtype == dtype
    for i in range(Tq):  # query i sits at position Tk - Tq + i
        for j in range(Tk):
            assert mask[i, j].item() == (0.0 if j <= Tk - Tq + i else float("-inf"))
    # the same mask as torch.triu builds (on a CPU, where triu of -inf is right)
    assert torch.equal(mask, torch.full((Tq, Tk), float("-inf"), dtype=dtype).triu(Tk - Tq + 1))


def test_float16_training_on_mps_is_refused_with_a_line_that_names_the_alternatives():
    with pytest.raises(gpt.GPTError, match="float16.*MPS.*bfloat16 or float32"):
        gpt.check_training_dtype(torch.float16, MPS)
    for dtype, device in ((torch.float32, MPS), (torch.bfloat16, MPS), (torch.float16, CUDA), (torch.float16, CPU)):
        gpt.check_training_dtype(dtype, device)  # allowed


def test_the_fused_adamw_decision_is_made_up_front_from_the_parameters():
    config = gpt.GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)
    with torch.device("meta"):  # a device with no fused kernel: torch would fail only at the first step()
        on_meta = gpt.GPT(config)
    assert gpt.make_optimizer(on_meta, gpt.TrainConfig()).defaults["fused"] is False
    on_cpu = gpt.GPT(config)
    optimizer = gpt.make_optimizer(on_cpu, gpt.TrainConfig())
    assert optimizer.defaults["fused"] is True
    on_cpu(torch.zeros((1, 8), dtype=torch.long), torch.zeros((1, 8), dtype=torch.long))[1].backward()
    optimizer.step()  # the fused step really runs here
    assert not gpt.use_fused_adamw([torch.zeros(3, dtype=torch.long)])  # not floating point


def test_the_first_log_line_waits_for_the_device_before_reading_the_clock(tmp_path, monkeypatch, capsys):
    # A GPU returns from a step before computing it. Stand-in: a synchronize that takes 0.3 s,
    # as waiting for a step's queued work would; the step's logged time must include it.
    monkeypatch.setattr(gpt, "synchronize", lambda device: time.sleep(0.3))
    gpt.train(train_cfg(tmp_path, max_iters=2, eval_interval=100, peak_flops=1e12))  # no probe: it syncs too
    first = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("step 1/"))
    assert int(first.split(" ms/step")[0].split("| ")[-1]) >= 300, first


@pytest.mark.parametrize("card, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("Tesla T4", 65e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
    ("Tesla V100-SXM2-16GB", 125e12), ("Tesla V100-PCIE-32GB", 112e12),
    ("NVIDIA H800 PCIe", 756e12), ("NVIDIA RTX A1000", None), ("NVIDIA T400", None), ("NVIDIA B200", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_published_peaks_are_found_by_whole_card_names(card, peak):
    assert gpt.published_peak_flops(card) == peak


def test_mfu_is_never_above_100_percent(tmp_path, capsys):
    assert gpt.mfu(2.0, 4.0) == 0.5 and gpt.mfu(8.0, 4.0) == 1.0
    gpt.train(train_cfg(tmp_path, max_iters=3, eval_interval=100, peak_flops=1.0))  # a peak far too low
    shown = [int(line.split("MFU ")[1].split("%")[0]) for line in capsys.readouterr().err.splitlines() if "MFU" in line]
    assert shown[0] == 100 and all(0 < mfu <= 100 for mfu in shown), shown  # the peak rises to the best step seen


def test_attention_on_mps_is_fused_in_float32_only_and_a_cpu_trains_bfloat16_written_out():
    def fused(device, dtype, T=256):  # attention_for looks at q's device, dtype and length
        q = types.SimpleNamespace(device=device, dtype=dtype, size=lambda dim: T)
        return gpt.attention_for(q, q) is gpt.causal_attention_fused
    assert fused(MPS, torch.float32)
    assert not fused(MPS, torch.float16) and not fused(MPS, torch.bfloat16)
    assert fused(CUDA, torch.bfloat16) and fused(CPU, torch.float32)
    assert not fused(CPU, torch.bfloat16)  # training (gradients on), a short context
    assert not fused(CPU, torch.bfloat16, T=512) and fused(CPU, torch.bfloat16, T=513)
    with torch.no_grad():
        assert fused(CPU, torch.bfloat16)
    with gpt.attention_forced("written out"):
        assert not fused(CUDA, torch.float32)
    with gpt.attention_forced("fused"):
        assert fused(MPS, torch.float16)
    assert not fused(MPS, torch.float16)  # the choice is gpt.py's again
    with torch.no_grad():  # attention_for matches q to a float32 KV cache
        x = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)  # (B, nh, T, hs), a bfloat16 model's q
        k = torch.randn(1, 2, 5, 4)  # (B, nh, Tk, hs): keys (and values) of a float32 cache
        y = gpt.attention_for(x, k)(x, k, k, 0.0)
        assert y.dtype == torch.bfloat16 and torch.equal(y, gpt.causal_attention_written_out(x.float(), k, k).bfloat16())


# ---------------------------------------------------------------------------------------------
# GPT-2's weights: parity with Hugging Face
# ---------------------------------------------------------------------------------------------

import transformers  # noqa: E402  a test-only reference; the README's test command installs it


def hf_gpt2(n_layer, n_head, n_embd, block_size, vocab_size, seed, scale=0.2):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # large random weights: logits far apart, so greedy choices are clear-cut
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model


@st.composite
def hf_shapes(draw):
    n_head = draw(st.integers(1, 4))
    return dict(n_layer=draw(st.integers(1, 3)), n_head=n_head, n_embd=n_head * draw(st.sampled_from([2, 4, 8])),
                block_size=draw(st.integers(45, 64)), vocab_size=draw(st.integers(5, 300)),
                seed=draw(st.integers(0, 2**16)))


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=hf_shapes(), length=st.one_of(st.integers(1, 64), st.integers(-3, 0)), prompt_length=st.integers(1, 24))
@example(shape=dict(n_layer=1, n_head=1, n_embd=2, block_size=45, vocab_size=5, seed=0), length=1, prompt_length=1)
@example(shape=dict(n_layer=3, n_head=4, n_embd=32, block_size=64, vocab_size=300, seed=1), length=0,
         prompt_length=24)  # length 0: a full context of 64; the prompt and 40 new tokens fill it
def test_from_pretrained_matches_hugging_face(shape, length, prompt_length, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    reference = hf_gpt2(**shape)
    reference.save_pretrained(folder)
    model = gpt.GPT.from_pretrained(str(folder)).eval()
    # (a) logits, with a prompt anywhere up to block_size long, near it included (length <= 0:
    # that far from block_size)
    T = min(length, shape["block_size"]) if length > 0 else shape["block_size"] + length
    idx = torch.randint(shape["vocab_size"], (2, T))
    targets = torch.randint(shape["vocab_size"], (2, T))
    with torch.no_grad():
        expected = reference(idx, labels=None)
        logits, loss = model(idx, targets)
    assert (logits - expected.logits).abs().max().item() < 1e-5
    # (b) the loss on the same targets (Hugging Face shifts labels itself, so give it one more token)
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(expected.logits.view(-1, shape["vocab_size"]), targets.view(-1))
    assert abs(loss.item() - hf_loss.item()) < 1e-5
    longer = torch.cat([idx[:, :1], targets], dim=1)[:, :shape["block_size"]]
    with torch.no_grad():
        shifted = reference(longer, labels=longer).loss
        ours = model(longer[:, :-1], longer[:, 1:])[1]
    assert abs(shifted.item() - ours.item()) < 1e-5
    # (c) 40 greedy tokens, identical to Hugging Face's generate
    prompt = idx[:1, :min(prompt_length, shape["block_size"] - 40, T)]
    theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                                min_new_tokens=40)  # the mask: a prompt token equal to pad_token_id is not padding
    assert torch.equal(gpt.generate(model, prompt, 40, temperature=0), theirs)


def test_the_safetensors_reader_reads_what_the_safetensors_library_writes(tmp_path):
    from safetensors.torch import save_file
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.float16), "c": torch.randn(2, 2, 2).bfloat16(),
               "d": torch.randn(7, dtype=torch.float64)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    loaded = gpt.read_safetensors(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys()
    for name in tensors:
        assert loaded[name].dtype == tensors[name].dtype and torch.equal(loaded[name], tensors[name])


def write_safetensors(path, tensors):
    """The format, written by hand: 8-byte header length, JSON header, raw little-endian bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


@pytest.mark.parametrize("damage, words", [
    ("drop", ["Missing", "h.0.mlp.c_fc.bias"]),
    ("reshape", ["size mismatch", "h.1.attn.c_attn.weight", "[8, 24]", "[24, 8]"]),
    ("extra", ["Unexpected", "h.0.attn.rotary"]),
])
def test_a_gpt2_file_with_a_missing_or_misshapen_tensor_is_an_error_naming_it(damage, words, tmp_path):
    reference = hf_gpt2(n_layer=2, n_head=2, n_embd=8, block_size=16, vocab_size=11, seed=0)
    tensors = {name: t.detach().clone() for name, t in reference.transformer.state_dict().items()}
    if damage == "drop":
        del tensors["h.0.mlp.c_fc.bias"]
    elif damage == "reshape":  # stored the nn.Linear way round, not GPT-2's Conv1D way
        tensors["h.1.attn.c_attn.weight"] = tensors["h.1.attn.c_attn.weight"].t().contiguous()
    else:
        tensors["h.0.attn.rotary"] = torch.randn(3)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    reference.config.save_pretrained(tmp_path)  # config.json beside it
    with pytest.raises(gpt.GPTError) as error:
        gpt.GPT.from_pretrained(str(tmp_path / "model.safetensors"))
    for word in [f"--init-from {tmp_path / 'model.safetensors'}:", *words]:  # the file named, then the tensor
        assert word in str(error.value)


def test_a_bare_safetensors_file_written_by_hand_loads_with_its_shape_read_off_the_tensors(tmp_path):
    reference = hf_gpt2(n_layer=2, n_head=12, n_embd=768, block_size=16, vocab_size=11, seed=1, scale=0.05)
    tensors = {name: t.detach().clone() for name, t in reference.transformer.state_dict().items()
               if not name.endswith(".attn.bias")}
    write_safetensors(tmp_path / "weights.safetensors", tensors)
    model = gpt.GPT.from_pretrained(str(tmp_path / "weights.safetensors")).eval()
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 12, 768)  # GPT-2 small's width
    idx = torch.randint(11, (1, 16))
    with torch.no_grad():
        assert (model(idx)[0] - reference(idx).logits).abs().max() < 1e-4
    # A width GPT-2 was not released at: one head of 128, or two of 64? The tensors cannot say.
    other = hf_gpt2(n_layer=1, n_head=1, n_embd=128, block_size=16, vocab_size=11, seed=1)
    write_safetensors(tmp_path / "other.safetensors", {name: t for name, t in other.transformer.state_dict().items()
                                                        if not name.endswith(".attn.bias")})
    with pytest.raises(gpt.GPTError, match="do not say how many heads.*put its config.json beside it"):
        gpt.GPT.from_pretrained(str(tmp_path / "other.safetensors"))


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support; the first request for a file breaks off halfway."""
    broken = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.server.root) / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path.endswith(".safetensors") and self.path not in RangeHandler.broken:
            RangeHandler.broken.add(self.path)
            self.wfile.write(body[start:start + len(body) // 2])  # then hang up
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body[start:])


def test_a_gpt2_download_resumes_and_never_leaves_half_a_file(tmp_path, monkeypatch):
    served = tmp_path / "hub" / "gpt2"
    served.mkdir(parents=True)
    hf_gpt2(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=50, seed=0).save_pretrained(served)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.root = tmp_path / "hub"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(gpt, "GPT2_URL", f"http://127.0.0.1:{server.server_address[1]}/{{name}}/{{file}}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    cached = tmp_path / "cache" / "gpt.py" / "gpt2"
    try:
        with pytest.raises(gpt.GPTError, match="rerun to resume"):
            gpt.GPT.from_pretrained("gpt2")
        assert not (cached / "model.safetensors").exists()  # no half file under the real name
        assert (cached / "model.safetensors.part").exists()
        model = gpt.GPT.from_pretrained("gpt2")  # resumes with a Range request
    finally:
        server.shutdown()
    assert (cached / "model.safetensors").read_bytes() == (served / "model.safetensors").read_bytes()
    assert not (cached / "model.safetensors.part").exists()
    assert model.config.vocab_size == 50


def test_a_gpt2_file_whose_vocabulary_is_not_gpt2s_is_refused_with_one_line(tmp_path, capsys):
    folder = tmp_path / "small-vocab"
    hf_gpt2(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=50, seed=0).save_pretrained(folder)
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE[:5000], encoding="utf-8")
    capsys.readouterr()  # forget what save_pretrained printed
    for argv in (["sample", "--init-from", str(folder)],
                 ["train", "--init-from", str(folder), "--data", str(data), "--out-dir", str(tmp_path / "out")]):
        assert gpt.main(argv) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "50 tokens" in err and "50257" in err, err
    assert not (tmp_path / "out").exists()


def test_fine_tuning_a_local_gpt2_then_sampling_from_its_checkpoint(tmp_path):
    folder = tmp_path / "gpt2-tiny"
    hf_gpt2(n_layer=1, n_head=2, n_embd=8, block_size=64, vocab_size=50257, seed=0, scale=0.02).save_pretrained(folder)
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE[:40000], encoding="utf-8")
    out = tmp_path / "out"
    tuned = run_gpt("train", "--init-from", folder, "--data", data, "--out-dir", out, "--block-size", 32,
                    "--max-iters", 4, "--eval-interval", 2, "--eval-iters", 1, "--batch-size", 2, "--dropout", 0.1)
    assert tuned.returncode == 0, tuned.stderr
    checkpoint = gpt.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["tokenizer"]["kind"] == "bpe"
    assert checkpoint["config"]["n_embd"] == 8 and checkpoint["config"]["block_size"] == 32  # cropped from 64
    assert checkpoint["train_args"]["dropout"] == 0.1
    sampled = run_gpt("sample", "--out-dir", out, "--prompt", "ROMEO:", "--max-new-tokens", 10)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("ROMEO:")
    conflicting = run_gpt("train", "--init-from", folder, "--data", data, "--out-dir", tmp_path / "o2",
                          "--n-layer", 4)
    assert conflicting.returncode != 0 and "--n-layer 4" in conflicting.stderr
    from_folder = run_gpt("sample", "--init-from", folder, "--prompt", "Hello", "--max-new-tokens", 5)
    assert from_folder.returncode == 0 and from_folder.stdout.startswith("Hello")
