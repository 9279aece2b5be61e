"""Sampling: the filters against transformers' logits warpers, and the draws themselves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from llama_jax.errors import LlamaError
from llama_jax.inference.sampling import SamplingParams, filter_logits, sample

V = 64
jit_sample = jax.jit(sample)


def draw(logits, n, seed=0, temperature=1.0, top_k=None, top_p=None):
    """n samples from one row of logits (the row repeated n times, one key)."""
    arrays = SamplingParams(temperature, top_k, top_p).arrays()
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    return np.asarray(jit_sample(rows, jax.random.key(seed), **arrays))


def logits_row(seed, scale=2.0):
    return np.random.default_rng(seed).normal(size=V).astype(np.float32) * scale


@pytest.mark.parametrize("k, p", [(5, None), (None, 0.7), (10, 0.5), (3, 0.99), (None, 1.0)])
def test_filters_keep_the_same_tokens_as_transformers(k, p):
    logits = np.stack([logits_row(s) for s in range(6)])
    ours = np.asarray(filter_logits(jnp.asarray(logits), jnp.int32(k or 0), jnp.float32(p or 1)))
    scores = torch.tensor(logits)
    if k is not None:
        scores = TopKLogitsWarper(top_k=k)(None, scores)
    if p is not None and p < 1:
        scores = TopPLogitsWarper(top_p=p)(None, scores)
    want_kept = np.isfinite(scores.numpy())
    np.testing.assert_array_equal(np.isfinite(ours), want_kept)
    np.testing.assert_array_equal(ours[want_kept], logits[want_kept])


def test_top_k_never_leaves_the_k_best():
    logits = logits_row(1, scale=0.5)  # flat enough that all five get drawn
    samples = draw(logits, 4000, top_k=5)
    best = set(np.argsort(-logits)[:5].tolist())
    assert set(samples.tolist()) == best


def test_top_p_respects_its_mass():
    logits = logits_row(2)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    for p in (0.3, 0.6, 0.9):
        samples = draw(logits, 4000, seed=3, top_p=p)
        kept = sorted(set(samples.tolist()), key=lambda t: -probs[t])
        # The kept set is the shortest run of most likely tokens whose mass reaches p.
        assert kept == order[: len(kept)].tolist()
        assert probs[kept].sum() >= p and probs[kept[:-1]].sum() < p
        # Within it, tokens are drawn in proportion to their renormalised probability.
        freq = np.bincount(samples, minlength=V)[kept] / len(samples)
        np.testing.assert_allclose(freq, probs[kept] / probs[kept].sum(), atol=0.03)


def test_temperature_scales_the_distribution():
    logits = logits_row(4, scale=1.0)
    for t in (0.5, 2.0):
        want = np.exp(logits / t - (logits / t).max())
        want /= want.sum()
        freq = np.bincount(draw(logits, 8000, seed=5, temperature=t), minlength=V) / 8000
        assert np.abs(freq - want).max() < 0.03


def test_temperature_zero_is_greedy_and_seeds_repeat():
    logits = np.stack([logits_row(s) for s in range(8)])
    arrays = SamplingParams(0.0, top_k=3, top_p=0.5).arrays()
    for seed in range(3):
        got = jit_sample(jnp.asarray(logits), jax.random.key(seed), **arrays)
        np.testing.assert_array_equal(got, logits.argmax(-1))
    a = draw(logits[0], 64, seed=11)
    np.testing.assert_array_equal(a, draw(logits[0], 64, seed=11))
    assert not np.array_equal(a, draw(logits[0], 64, seed=12))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_p=0.0), "top_p must lie in"),
        (dict(top_p=1.01), "top_p must lie in"),
        (dict(top_p=-0.5), "top_p must lie in"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(top_k=2.5), "top_k must be a positive integer"),
        (dict(temperature=-0.1), "temperature must be"),
        (dict(temperature=float("nan")), "temperature must be"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(LlamaError, match=match):
        SamplingParams(**kwargs)
