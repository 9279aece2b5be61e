"""Speculative decoding: a small draft model proposes, the target model verifies.

Decoding one token reads every weight of the model once, so on most hardware it is
bound by memory bandwidth, not arithmetic: feeding the target k + 1 tokens in one
forward costs about as much as feeding it one. A cheaper draft model (a smaller
checkpoint with the same vocabulary, or the target's own first layers, see
`draft_from_layers`) guesses k tokens one by one; the target scores all of them in one
forward and keeps the longest prefix it agrees with, plus one token of its own. Every
round therefore yields between 1 and k + 1 tokens for one target forward.

The output is the target's, not the draft's (Leviathan et al. 2023, Chen et al. 2023):

- greedy (temperature 0): a draft token is kept when it equals the target's argmax;
  the first one that is not is replaced by the target's argmax. The tokens are exactly
  those of plain greedy decoding.
- sampling: with p the target's and q the draft's distribution (both after the same
  temperature, top-k and top-p as `sampling.sample`), draft token x is kept with
  probability min(1, p(x) / q(x)); at the first rejection the token is drawn from
  norm(max(0, p - q)), and when all k are kept a bonus token is drawn from the target's
  next distribution. Each token is then distributed exactly as p.

Static shapes, batched. Both models keep their own static KVCache with the same number
of slots S and the same slot layout. A round writes k + 1 slots at one shared index I:
the target holds [x0, d1, ..., dk] at I .. I + k (x0 the row's latest token, d the
draft's guesses). Rows accept different numbers a of guesses: slots I + a + 1 .. I + k
of a row are marked invalid in both caches (attention never reads them again) and the
next round starts at I + max(a + 1) over the rows still running. Each row keeps its own
rotary positions, so the invalid slots ("holes", as left padding) change nothing but
memory; with one row there are none. The draft's cache lacks dk when all k were kept,
so the draft's first step of a round feeds two tokens at I - 1, I: the row's previous
token (valid where slot I - 1 is the row's own, written again with the same key and
value) and x0. The whole loop runs on the device in one `jax.lax.while_loop`, compiled
once per (batch, k, cache slots), like `generate`'s decode loop; when the tokens are
streamed (`on_tokens`, or text with `on_text` or stop strings) the same program runs
one round per call and the host passes each round's tokens on.

Dimension letters as in model/transformer.py: B batch, V vocab; k is the draft length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import sharding
from llama_jax.errors import LlamaError
from llama_jax.inference.generate import (
    CACHE_FULL,
    LENGTH,
    STOP,
    Generation,
    TextRows,
    _check_prompts,
    _prepare_batch,
    bucket_length,
    default_cache_len,
)
from llama_jax.inference.int8 import check_cache_dtype, new_cache
from llama_jax.inference.sampling import SamplingParams, filter_logits, sample
from llama_jax.model import KVCache, Transformer


class SpeculativeGeneration(Generation):
    """A `Generation` (new ids per row, `finish_reasons`) with the draft's statistics.

    Attributes:
      acceptance_rate: the fraction of the draft's guesses the target kept, over all
        rounds and the rows still running in each (1.0 when draft and target agree).
      rounds: the number of target forwards after the prefill.
    """

    def __init__(self, rows, finish_reasons, acceptance_rate: float, rounds: int):
        super().__init__(rows, finish_reasons)
        self.acceptance_rate = acceptance_rate
        self.rounds = rounds


def draft_from_layers(model: Transformer, n: int) -> Transformer:
    """The target's first `n` blocks with its final norm and output as a draft model.

    The draft shares the target's parameter arrays (no copy, no extra memory): its
    embedding, blocks 0 .. n-1, norm and output are the target's own objects.

    Args:
      model: the target `Transformer`.
      n: how many blocks to keep, 1 <= n <= model.cfg.n_layers.
    Returns:
      A `Transformer` whose config is the target's with n_layers = n.
    """
    L = model.cfg.n_layers
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= L:
        raise LlamaError(
            f"draft layers must be an integer in [1, {L}] (the model's layers); got {n!r}."
        )
    cfg = dataclasses.replace(model.cfg, n_layers=int(n), name=f"{model.cfg.name}[:{n}]")
    # The structure without memory, then the target's own parameters put in.
    draft = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), remat=model.remat))
    draft.tok_embeddings = model.tok_embeddings
    draft.layers = nnx.List(list(model.layers)[:n])
    draft.norm = model.norm
    if not cfg.tie_word_embeddings:
        draft.output = model.output
    return draft


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecState:
    """What the speculative loop carries, all static shapes.

    Attributes:
      target, draft: the two KVCaches (same slots; `valid` kept equal between rounds).
      index: int32 scalar I, the slot of `token` in the next round.
      token: [B] each row's latest token (not yet in either cache).
      position: [B] its rotary position.
      prev: [B] the token before it; prev_ok: [B] whether slot I - 1 is that token's.
      done, stopped: [B] rows finished / finished on a stop id.
      out: [B, W] the new tokens of each row, `count` of them written.
      count: [B] int32.
      rounds, proposed, accepted: int32 scalars for the statistics.
    """

    target: KVCache
    draft: KVCache
    index: jax.Array
    token: jax.Array
    position: jax.Array
    prev: jax.Array
    prev_ok: jax.Array
    done: jax.Array
    stopped: jax.Array
    out: jax.Array
    count: jax.Array
    rounds: jax.Array
    proposed: jax.Array
    accepted: jax.Array


def probabilities(logits, temperature, top_k, top_p):
    """The distribution `sampling.sample` draws from: [N, V] float32 logits -> [N, V].

    Greedy (temperature 0) is the one-hot of the argmax, so the acceptance rule below
    becomes "keep a guess iff it is the target's argmax" with no special case.
    """

    def greedy(_):
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)

    def soft(_):
        x = logits / temperature
        x = jax.lax.cond(
            (top_k > 0) | (top_p < 1.0), filter_logits, lambda x, k, p: x, x, top_k, top_p
        )
        return jax.nn.softmax(x, axis=-1)

    return jax.lax.cond(temperature > 0, soft, greedy, None)


def verify(p, q, guesses, key, temperature):
    """Rejection sampling of the draft's guesses against the target.

    Args:
      p: [B, k + 1, V] the target's distributions after x0, d1, ..., dk.
      q: [B, k, V] the draft's distributions its guesses were drawn from.
      guesses: [B, k] the draft's tokens d1 .. dk.
      key: a PRNG key.
      temperature: float32 scalar (0: greedy, the next token is an argmax).
    Returns:
      (a [B] int32 number of guesses kept, next [B] int32 the target's token after them).
    """
    B, k, V = q.shape
    key_u, key_r = jax.random.split(key)
    p_x = jnp.take_along_axis(p[:, :k], guesses[..., None], axis=-1)[..., 0]  # [B, k]
    q_x = jnp.take_along_axis(q, guesses[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(key_u, (B, k))
    # Keep x with probability min(1, p(x)/q(x)), written without a division.
    keep = u * q_x < p_x
    a = jnp.sum(jnp.cumprod(keep, axis=1), axis=1).astype(jnp.int32)  # leading kept
    p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]  # [B, V]
    q_pad = jnp.concatenate([q, jnp.zeros((B, 1, V), q.dtype)], axis=1)  # no q after dk
    q_a = jnp.take_along_axis(q_pad, a[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    # p == q leaves nothing, but then nothing is ever rejected; fall back to p anyway.
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
    drawn = jax.random.categorical(key_r, jnp.log(residual), axis=-1)
    nxt = jnp.where(temperature > 0, drawn, jnp.argmax(residual, axis=-1))
    return a, nxt.astype(jnp.int32)


def _round(target, draft, st: SpecState, stop_ids, sampling, key, n_tokens, k, pad_id):
    """One round: k guesses from the draft, one verifying forward of the target."""
    B = st.token.shape[0]
    key = jax.random.fold_in(key, st.rounds)
    key_d, key_v = jax.random.split(key)
    probs = functools.partial(probabilities, **sampling)
    V = target.cfg.vocab_size

    # Draft: the previous token (again) and x0 at slots I - 1, I, then k - 1 more guesses.
    cache = dataclasses.replace(st.draft, index=st.index - 1, valid=st.target.valid)
    two = jnp.stack([st.prev, st.token], axis=1)  # [B, 2]
    mask = jnp.stack([st.prev_ok, jnp.ones((B,), bool)], axis=1)
    logits, cache = draft(two, st.position[:, None] + jnp.arange(-1, 1), mask, cache)
    q0 = probs(logits[:, -1])
    d0 = sample(logits[:, -1], jax.random.fold_in(key_d, 0), **sampling)
    guesses = jnp.zeros((B, k), jnp.int32).at[:, 0].set(d0)
    q = jnp.zeros((B, k, V), jnp.float32).at[:, 0].set(q0)

    def guess(j, carry):
        cache, guesses, q = carry
        tok = guesses[:, j - 1]
        logits, cache = draft(tok[:, None], (st.position + j)[:, None], None, cache)
        d = sample(logits[:, 0], jax.random.fold_in(key_d, j), **sampling)
        return cache, guesses.at[:, j].set(d), q.at[:, j].set(probs(logits[:, 0]))

    cache, guesses, q = jax.lax.fori_loop(1, k, guess, (cache, guesses, q))

    # Target: x0 and all k guesses in one forward over its cache at slots I .. I + k.
    fed = jnp.concatenate([st.token[:, None], guesses], axis=1)  # [B, k + 1]
    positions = st.position[:, None] + jnp.arange(k + 1)
    t_cache = dataclasses.replace(st.target, index=st.index)
    logits, t_cache = target(fed, positions, None, t_cache)
    p = probs(logits.reshape(B * (k + 1), V)).reshape(B, k + 1, V)
    a, nxt = verify(p, q, guesses, key_v, sampling["temperature"])

    # The row's new tokens: d1 .. da, then the target's; after that only padding.
    j = jnp.arange(k + 1)
    padded = jnp.concatenate([guesses, jnp.full((B, 1), pad_id, jnp.int32)], axis=1)
    new = jnp.where(j < a[:, None], padded, pad_id)
    new = jnp.where(j == a[:, None], nxt[:, None], new)  # [B, k + 1]
    active = ~st.done
    n_new = jnp.where(active, a + 1, 0)
    # A stop id within the first n_tokens ends the row there (it is kept in `out`, the
    # host strips it, as `generate` does).
    is_stop = jnp.any(new[..., None] == stop_ids[:, None, :], axis=-1)  # [B, k + 1]
    is_stop &= (j < n_new[:, None]) & (st.count[:, None] + j < n_tokens)
    hit = jnp.any(is_stop, axis=1)
    n_new = jnp.where(hit, jnp.argmax(is_stop, axis=1) + 1, n_new)
    new = jnp.where(j < n_new[:, None], new, pad_id)
    out = jax.vmap(lambda o, n, c: jax.lax.dynamic_update_slice(o, n, (c,)))(st.out, new, st.count)
    count = st.count + n_new

    # Slots I + j hold a row's real tokens for j <= a; the rest become holes.
    valid = jax.lax.dynamic_update_slice(t_cache.valid, j <= a[:, None], (0, st.index))
    step = jnp.max(jnp.where(active, a + 1, 0))
    prev = jnp.where(
        a > 0, jnp.take_along_axis(guesses, jnp.maximum(a - 1, 0)[:, None], 1)[:, 0], st.token
    )
    return SpecState(
        target=dataclasses.replace(t_cache, valid=valid),
        draft=dataclasses.replace(cache, valid=valid),
        index=st.index + step,
        token=nxt,
        position=st.position + a + 1,
        prev=prev,
        prev_ok=a + 1 == step,
        done=st.done | hit | (count >= n_tokens),
        stopped=st.stopped | hit,
        out=out,
        count=count,
        rounds=st.rounds + 1,
        proposed=st.proposed + k * jnp.sum(active),
        accepted=st.accepted + jnp.sum(jnp.where(active, a, 0)),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "cache_dtype"))
def _draft_prefill(graphdef, state, tokens, mask, *, cache_len, cache_dtype):
    """The draft's cache after the prompts [B, P] (positions as in `_prefill`)."""
    model = nnx.merge(graphdef, state)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = new_cache(model, tokens.shape[0], cache_len, cache_dtype)
    _, cache = model(tokens, positions, mask, cache)
    return cache


@functools.partial(
    jax.jit, static_argnames=("t_graph", "d_graph", "k", "pad_id"), donate_argnames=("st",)
)
def _speculate(
    t_graph, t_state, d_graph, d_state, st, stop_ids, sampling, key, n_tokens, until, *, k, pad_id
):
    """Rounds on the device until every row is done, a round no longer fits the cache, or
    `until` rounds have run in all."""
    target, draft = nnx.merge(t_graph, t_state), nnx.merge(d_graph, d_state)
    S = st.target.max_len
    return jax.lax.while_loop(
        lambda st: ~jnp.all(st.done) & (st.index + k + 1 <= S) & (st.rounds < until),
        lambda st: _round(target, draft, st, stop_ids, sampling, key, n_tokens, k, pad_id),
        st,
    )


def speculative_cache_len(
    prompt_bucket: int, max_new_tokens: int, k: int, batch: int, max_len: int
) -> int:
    """Default slots: room for every round even when one row keeps no guess.

    A round needs k + 1 free slots. With one row the cache grows by exactly the tokens
    kept; in a batch it grows by the most any row kept, so a row that keeps nothing may
    spend k + 1 slots per token.
    """
    per_token = 1 if batch == 1 else k + 1
    need = per_token * max(max_new_tokens - 1, 0) + k + 1
    return default_cache_len(prompt_bucket, need, max_len)


def speculative_generate(
    model: Transformer,
    draft: Transformer,
    prompt_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids=None,
    *,
    speculate_k: int = 4,
    cache_len: int | None = None,
    cache_dtype: str | None = None,
    pad_id: int = 0,
    on_tokens: Callable[[int, list[int]], bool | None] | None = None,
) -> SpeculativeGeneration:
    """`generate`, with a draft model proposing `speculate_k` tokens per target forward.

    Greedy output is token for token the target's own greedy output; sampled output is
    distributed as the target's (see the module docstring). The random draws differ from
    `generate`'s, so the same seed gives other (equally distributed) samples.

    Args:
      model: the target `Transformer`.
      draft: a `Transformer` with the same vocabulary (e.g. `draft_from_layers(model, n)`
        or a smaller checkpoint with the same tokenizer).
      prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, pad_id: as
        for `generate`.
      speculate_k: k, the draft's guesses per round (>= 1).
      cache_len: slots of each KV cache; default `speculative_cache_len(...)`, at most
        the smaller model context. A round needs k + 1 free slots: rows still running
        when no round fits end with reason "cache_full".
      cache_dtype: both KV caches' dtype, as for `generate`.
      on_tokens: streaming: called after each round as on_tokens(row, new_ids) for every
        row that kept tokens (stop ids left out); returning True ends that row there.
    Returns:
      a `SpeculativeGeneration`: new ids per row, `finish_reasons`, `acceptance_rate`.
    """
    cfg = model.cfg
    k = speculate_k
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise LlamaError(f"speculate_k must be a positive integer; got {k!r}.")
    k = int(k)
    if not isinstance(draft, Transformer):
        raise LlamaError(f"draft must be a Transformer (see draft_from_layers); got {draft!r}.")
    if draft.cfg.vocab_size != cfg.vocab_size:
        raise LlamaError(
            f"The draft's vocabulary ({draft.cfg.vocab_size} ids) differs from the model's "
            f"({cfg.vocab_size}): a draft must share the target's tokenizer."
        )
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise LlamaError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
    sampling = SamplingParams(temperature, top_k, top_p, seed)
    check_cache_dtype(cache_dtype)
    max_len = min(cfg.max_seq_len, draft.cfg.max_seq_len)
    rows = _check_prompts(prompt_ids, cfg.vocab_size, max_len)
    B = len(rows)
    longest = max(len(r) for r in rows)
    P = bucket_length(longest, max_len)
    if cache_len is None:
        cache_len = speculative_cache_len(P, max_new_tokens, k, B, max_len)
    elif not longest + k + 1 <= cache_len <= max_len:
        raise LlamaError(
            f"cache_len={cache_len} must hold the longest prompt ({longest} tokens) plus "
            f"speculate_k + 1 = {k + 1} slots, and be at most the context ({max_len})."
        )
    if longest + k + 1 > cache_len:
        raise LlamaError(
            f"The longest prompt ({longest} tokens) leaves less than speculate_k + 1 = {k + 1} "
            f"free slots of the {max_len}-token context; shorten it or lower speculate_k."
        )
    P = min(P, cache_len - k - 1)  # every round needs k + 1 free slots after the prompt
    b = _prepare_batch(
        model, rows, P, cache_len, cache_dtype, max_new_tokens, stop_ids, sampling, pad_id
    )
    ds, n_tokens, stop_table = b.ds, b.n_tokens, b.stop_table

    d_graph, d_state = nnx.split(draft)
    with sharding.use_mesh(b.mesh):
        d_cache = _draft_prefill(
            d_graph, d_state, b.tokens, b.mask, cache_len=cache_len, cache_dtype=cache_dtype
        )
        st = SpecState(
            target=ds.cache,
            draft=d_cache,
            index=jnp.asarray(P, jnp.int32),  # its own buffer: the state is donated
            token=ds.token,
            position=ds.position,
            prev=jnp.asarray(b.tokens[:, -1]),
            prev_ok=jnp.ones((B,), bool),
            done=ds.done | (n_tokens <= 1),
            stopped=ds.stopped,
            out=jnp.full((B, cache_len + k + 1), pad_id, jnp.int32).at[:, 0].set(ds.token),
            count=jnp.ones((B,), jnp.int32),
            rounds=jnp.zeros((), jnp.int32),
            proposed=jnp.zeros((), jnp.int32),
            accepted=jnp.zeros((), jnp.int32),
        )
        args = (b.graphdef, b.state, d_graph, d_state)
        rest = (stop_table, b.sampling, b.key, np.int32(n_tokens))
        ended_here: set[int] = set()  # rows on_tokens ended
        if on_tokens is None:
            st = _speculate(*args, st, *rest, np.int32(2**31 - 1), k=k, pad_id=pad_id)
        else:
            passed = [0] * B  # tokens of each row handed to on_tokens
            rounds = 0  # st.rounds, as last read
            while True:
                before = rounds
                st = _speculate(*args, st, *rest, np.int32(before + 1), k=k, pad_id=pad_id)
                out, count, stopped, rounds = jax.device_get(
                    (st.out, st.count, st.stopped, st.rounds)
                )
                ended = []
                for i in range(B):
                    end = min(int(count[i]), n_tokens) - int(stopped[i])  # not the stop id
                    if end > passed[i] and i not in ended_here:
                        if on_tokens(i, out[i, passed[i] : end].tolist()):
                            ended.append(i)
                        passed[i] = end
                if rounds == before:  # every row done, or no room for another round
                    break
                if ended:
                    ended_here.update(ended)
                    st = dataclasses.replace(st, done=st.done.at[np.asarray(ended)].set(True))
    out, count, stopped, rounds, proposed, accepted = jax.device_get(
        (st.out, st.count, st.stopped, st.rounds, st.proposed, st.accepted)
    )
    tokens_out, reasons = [], []
    for i in range(B):
        row = out[i, : min(int(count[i]), n_tokens)].tolist()
        if stopped[i]:
            row_stops = set(stop_table[i].tolist())
            row, reason = row[: next(j for j, t in enumerate(row) if t in row_stops)], STOP
        elif i in ended_here:
            reason = STOP
        elif len(row) == n_tokens:
            reason = CACHE_FULL if b.cache_bound else LENGTH
        else:  # the loop ended because no further round fits in the cache
            reason = CACHE_FULL
        tokens_out.append(row)
        reasons.append(reason)
    rate = float(accepted) / float(proposed) if proposed else 1.0
    return SpeculativeGeneration(tokens_out, reasons, rate, int(rounds))


def speculative_generate_text(
    model: Transformer,
    draft: Transformer,
    tokenizer,
    prompts,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    *,
    chat: bool = False,
    stop=None,
    speculate_k: int = 4,
    cache_len: int | None = None,
    cache_dtype: str | None = None,
    on_text: Callable[[int, str], None] | None = None,
):
    """`generate_text` for a batch, through `speculative_generate`.

    Args:
      model, draft, speculate_k, cache_len, cache_dtype: as for `speculative_generate`.
      tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed, chat, stop,
        on_text: as for `generate_text` (prompts: a list of strings, or of dialogs with
        chat); with on_text or stop strings the text is passed on round by round.
    Returns:
      (texts, finish_reasons, acceptance_rate).
    """
    if chat:
        ids = [tokenizer.encode_dialog(d) for d in prompts]
    else:
        if not all(isinstance(p, str) and p for p in prompts):
            raise LlamaError("prompts must be non-empty strings (or dialogs with chat=True).")
        ids = [tokenizer.encode(p, bos=True) for p in prompts]
    rows = TextRows(tokenizer, len(ids), stop, on_text)

    def on_tokens(i, tokens):
        return any([rows.push(i, t) for t in tokens])  # every token, then whether it ended

    g = speculative_generate(
        model,
        draft,
        ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        sorted(tokenizer.stop_ids),
        speculate_k=speculate_k,
        cache_len=cache_len,
        cache_dtype=cache_dtype,
        pad_id=tokenizer.pad_id,
        on_tokens=on_tokens if rows.streams else None,
    )
    if not rows.streams:
        return [tokenizer.decode(t) for t in g], list(g.finish_reasons), g.acceptance_rate
    return rows.finish(), rows.reasons(g.finish_reasons), g.acceptance_rate
