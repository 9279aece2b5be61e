"""Speculative decoding: greedy output is the target's exactly, samples follow its law.

Greedy runs are compared token for token with plain `generate` (batched, prompts of
different lengths, k in {1, 3, 5}, a draft of the target's first layers and a draft
that is another model). The sampled tokens are checked against the target's exact
distribution, enumerated over a vocabulary of 8, with a chi-square test that the
draft's own (uncorrected) samples must fail.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax.inference.sampling import filter_logits
from llama_jax.inference.speculative import draft_from_layers, speculative_generate

CFG = lj.LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=256,
    ffn_dim=128,
    max_seq_len=256,
    dtype="float32",
    param_dtype="float32",
)


@pytest.fixture(scope="module")
def target():
    return lj.build_model(CFG, seed=1)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in (3, 11, 16, 7)]


@pytest.fixture(scope="module")
def plain(target, prompts):
    return lj.generate(target, prompts, 40)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_plain_greedy_with_first_layers_draft(target, prompts, plain, k):
    g = speculative_generate(target, draft_from_layers(target, 1), prompts, 40, speculate_k=k)
    assert list(g) == list(plain)
    assert g.finish_reasons == plain.finish_reasons == ["length"] * 4
    assert 0.0 <= g.acceptance_rate <= 1.0
    # At most one target forward per token after the prefill's.
    assert g.rounds <= 39


def test_greedy_equals_plain_greedy_with_another_model_as_draft(target, prompts, plain):
    other = dataclasses.replace(CFG, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
    g = speculative_generate(target, lj.build_model(other, seed=7), prompts, 40, speculate_k=3)
    assert list(g) == list(plain)


def test_draft_equal_to_target_accepts_everything(target, prompts, plain):
    g = speculative_generate(target, target, prompts, 40, speculate_k=3)
    assert list(g) == list(plain)
    assert g.acceptance_rate == 1.0
    # Every round keeps 3 guesses and adds one token: 39 tokens after the prefill's.
    assert g.rounds == math.ceil(39 / 4)


def test_stop_ids_and_finish_reasons_as_generate(target, prompts):
    # Stop on tokens the plain run produces, per row, so that rows end at different steps.
    ref = lj.generate(target, prompts, 40)
    stops = [[row[5]] for row in ref[:3]] + [[]]
    want = lj.generate(target, prompts, 40, stop_ids=stops)
    g = speculative_generate(
        target, draft_from_layers(target, 1), prompts, 40, stop_ids=stops, speculate_k=3
    )
    assert list(g) == list(want)
    assert g.finish_reasons == want.finish_reasons
    assert g.finish_reasons[:3] == ["stop"] * 3 and g.finish_reasons[3] == "length"


def test_streamed_tokens_are_the_returned_ones_and_a_row_can_be_ended(target, prompts, plain):
    # Row 1 ends at a stop id (left out of the stream): one it first makes after 5 tokens.
    first = next(j for j in range(5, 40) if plain[1][j] not in plain[1][:j])
    stops = [[], [plain[1][first]], [], []]
    draft = draft_from_layers(target, 1)
    pieces = {i: [] for i in range(len(prompts))}

    def collect(i, tokens):
        pieces[i].append(tokens)

    kw = dict(stop_ids=stops, speculate_k=3)
    g = speculative_generate(target, draft, prompts, 40, on_tokens=collect, **kw)
    assert list(g) == list(speculative_generate(target, draft, prompts, 40, **kw))
    assert [sum(pieces[i], []) for i in range(len(prompts))] == list(g)
    assert all(len(pieces[i]) > 1 for i in range(len(prompts)))  # round by round
    assert len(g[1]) == first and g.finish_reasons[1] == "stop"
    # Returning True ends a row where it is: row 2 after its first round.
    g = speculative_generate(target, draft, prompts, 40, on_tokens=lambda i, t: i == 2, **kw)
    assert g[2] == plain[2][: len(g[2])] and len(g[2]) < 40 and g.finish_reasons[2] == "stop"
    assert g[3] == plain[3] and g.finish_reasons[3] == "length"


def test_small_cache_ends_rows_with_cache_full(target):
    g = speculative_generate(target, target, [[1, 2, 3]], 100, speculate_k=3, cache_len=24)
    plain = lj.generate(target, [[1, 2, 3]], 100)
    assert g.finish_reasons == ["cache_full"]
    assert 0 < len(g[0]) < 100 and g[0] == plain[0][: len(g[0])]


def _replayed_rate(draft, prompts, generation, k):
    """The acceptance rate greedy speculation must report, replayed without any cache.

    One full forward of the draft over each final sequence gives the draft's argmax at
    every position; a round starting after token i keeps guesses while they equal the
    tokens that follow. An error in the draft's cache handling (positions, holes, the
    two-token first step) changes its guesses and so this rate, not the output.
    """
    kept = proposed = 0
    for prompt, row in zip(prompts, generation, strict=True):
        seq = prompt + row
        best = np.asarray(draft(jnp.asarray([seq]))[0]).argmax(-1)  # best[t] guesses seq[t + 1]
        i = len(prompt)  # the latest token, fed at the start of the round
        while i < len(seq) - 1:
            a = 0
            while a < k and i + a + 1 < len(seq) and best[i + a] == seq[i + a + 1]:
                a += 1
            kept, proposed, i = kept + a, proposed + k, i + a + 1
    return kept / proposed


def test_acceptance_rate_is_the_drafts_own_agreement(target, prompts, plain):
    # A draft close to the target (its output layer slightly perturbed) keeps many
    # guesses and rejects some, so rows advance by different amounts.
    draft = lj.build_model(CFG, seed=1)
    noise = np.random.default_rng(1).normal(size=draft.output[...].shape).astype(np.float32)
    draft.output[...] = draft.output[...] + 0.002 * noise
    g = speculative_generate(target, draft, prompts, 40, speculate_k=3)
    assert list(g) == list(plain)
    assert 0.2 < g.acceptance_rate < 0.95
    assert g.acceptance_rate == pytest.approx(_replayed_rate(draft, prompts, plain, 3), abs=1e-9)


def test_draft_from_layers_shares_the_arrays(target):
    draft = draft_from_layers(target, 2)
    assert draft.cfg.n_layers == 2 and len(draft.layers) == 2
    assert draft.layers[1].attention.wq is target.layers[1].attention.wq
    assert draft.tok_embeddings is target.tok_embeddings and draft.output is target.output
    # The draft is the target truncated: its logits are the target's norm and output
    # applied after block 2.
    tokens = jnp.array([[5, 6, 7]])
    assert draft(tokens).shape == (1, 3, CFG.vocab_size)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(speculate_k=0), "speculate_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(cache_len=4), "cache_len"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_bad_arguments(target, kwargs, message):
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(lj.LlamaError, match=message):
        speculative_generate(target, target, [[1, 2, 3]], **args)


def test_bad_drafts(target):
    with pytest.raises(lj.LlamaError, match="vocabulary"):
        other = lj.build_model(dataclasses.replace(CFG, vocab_size=128))
        speculative_generate(target, other, [[1, 2]], 4)
    with pytest.raises(lj.LlamaError, match="draft layers"):
        draft_from_layers(target, 3)


# -- the distribution -----------------------------------------------------------------------------

SMALL = lj.LlamaConfig(
    dim=32,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    vocab_size=8,
    ffn_dim=64,
    max_seq_len=64,
    dtype="float32",
    param_dtype="float32",
)
PROMPT = [1, 2, 3]
N_SAMPLES = 3000


def _models():
    """A target with spread-out next-token laws and a draft that is a noisy copy of it."""
    target, noise = lj.build_model(SMALL, seed=3), lj.build_model(SMALL, seed=4)
    target.output[...] = target.output[...] * 5.0
    draft = lj.build_model(SMALL, seed=3)
    draft.output[...] = target.output[...] + 1.5 * noise.output[...]
    return target, draft


def _exact(model, temperature, top_k, top_p):
    """P(t1, t2, t3 | PROMPT) by enumeration, [V, V, V]: the target's sampling law."""
    V = SMALL.vocab_size
    seqs = np.array([PROMPT + list(t) for t in itertools.product(range(V), repeat=2)])
    logits = model(jnp.asarray(seqs))[:, len(PROMPT) - 1 :] / temperature  # [V*V, 3, V]
    flat = filter_logits(logits.reshape(-1, V), jnp.int32(top_k or 0), jnp.float32(top_p or 1))
    probs = np.asarray(jax.nn.softmax(flat, axis=-1), np.float64).reshape(V, V, 3, V)
    p1 = probs[0, 0, 0]  # [V], the same in every row
    p2 = probs[:, 0, 1]  # [V(t1), V]
    p3 = probs[:, :, 2]  # [V(t1), V(t2), V]
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi_square_rejects(rows, exact) -> bool:
    """Chi-square goodness of fit of the (t1, t2, t3) counts at significance 1e-3."""
    V = SMALL.vocab_size
    counts = np.zeros((V, V, V))
    for r in rows:
        counts[tuple(r[:3])] += 1
    expected = exact * len(rows)
    if np.any(counts[expected == 0]):  # a token the target never draws
        return True
    big = expected >= 5  # pool the rare (but possible) cells into one
    rare = ~big & (expected > 0)
    obs, exp = counts[big], expected[big]
    if rare.any():
        obs, exp = np.append(obs, counts[rare].sum()), np.append(exp, expected[rare].sum())
    stat = np.sum((obs - exp) ** 2 / exp)
    assert np.isfinite(stat)
    df = len(obs) - 1
    # Wilson-Hilferty: the chi-square quantile from the normal one (z for 1 - 1e-3).
    crit = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    return stat > crit


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, None, None), (0.8, 5, 0.9)], ids=["plain", "filtered"]
)
def test_sampled_tokens_follow_the_target_distribution(temperature, top_k, top_p):
    target, draft = _models()
    exact = _exact(target, temperature, top_k, top_p)
    prompts = [PROMPT] * N_SAMPLES
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    g = speculative_generate(target, draft, prompts, 3, speculate_k=1, **kw)
    assert all(len(r) == 3 for r in g)
    assert 0.3 < g.acceptance_rate < 0.95  # both paths (kept and corrected) are exercised
    assert not _chi_square_rejects(g, exact)
    # The test has power: t1 from the target, then t2, t3 from the draft, i.e. the
    # draft's guesses taken without the correction, fail it.
    uncorrected = lj.generate(draft, [PROMPT + r[:1] for r in g], 2, **kw)
    assert _chi_square_rejects([r[:1] + u for r, u in zip(g, uncorrected, strict=True)], exact)


# -- the command line and a real trained model -----------------------------------------------------

from tests.test_generate_cli import checkpoint, greedy_argv  # noqa: E402, F401  (a tiny saved checkpoint)


def test_generate_command_with_a_draft(checkpoint, capsys):  # noqa: F811
    from llama_jax.cli import main
    from llama_jax.inference.generate import generate_text

    path, model, tok = checkpoint
    want = generate_text(model, tok, "the llama", 12)
    for flags in (["--draft-layers", "1"], ["--draft", str(path)]):
        assert main(greedy_argv(path, 12, "--speculate", "2", *flags)) == 0
        captured = capsys.readouterr()
        assert captured.out == "the llama" + want + "\n"
        assert "accepted" in captured.err
    argv = ["generate", "--checkpoint", str(path), "--prompt", "x", "--draft-layers", "9"]
    assert main(argv) == 2 and "draft layers" in capsys.readouterr().err
    # A chat answer is streamed and printed too.
    assert main(greedy_argv(path, 12, "--chat")) == 0
    chat = capsys.readouterr().out
    assert main(greedy_argv(path, 12, "--chat", "--draft-layers", "1")) == 0
    assert capsys.readouterr().out == chat and chat.strip()


def test_streamed_text_with_stop_strings_is_plain_generate_text(checkpoint):  # noqa: F811
    from llama_jax.inference.generate import generate_text
    from llama_jax.inference.speculative import speculative_generate_text

    _, model, tok = checkpoint
    prompts = ["the llama", "alpacas watched"]
    full = generate_text(model, tok, prompts, 24)
    stop = [full[0][8:11]]  # a stop string inside row 0's text
    want, reasons = generate_text(model, tok, prompts, 24, stop=stop, return_finish_reasons=True)
    pieces = {0: [], 1: []}
    texts, got_reasons, _ = speculative_generate_text(
        model,
        draft_from_layers(model, 1),
        tok,
        prompts,
        24,
        stop=stop,
        speculate_k=2,
        on_text=lambda i, t: pieces[i].append(t),
    )
    assert texts == want and got_reasons == reasons and reasons[0] == "stop"
    assert ["".join(pieces[i]) for i in (0, 1)] == want and len(pieces[1]) > 1


def test_real_model_greedy_equals_plain_greedy(tmp_path):
    from llama_jax.checkpoint.convert import convert
    from tests.smollm2 import gguf_file

    convert(gguf_file(), tmp_path / "ckpt", progress=False)
    model, tok = lj.load(tmp_path / "ckpt"), lj.Tokenizer.load(tmp_path / "ckpt")
    ids = [tok.encode(p, bos=True) for p in ("The capital of France is", "def add(a, b):")]
    plain = lj.generate(model, ids, 16)
    draft = draft_from_layers(model, 20)
    g = speculative_generate(model, draft, ids, 16, speculate_k=3)
    assert list(g) == list(plain)
    assert g.acceptance_rate == pytest.approx(_replayed_rate(draft, ids, plain, 3), abs=1e-9)
