"""Text generation: a prefill, then a decode loop over a static key/value cache.

Shapes never depend on the number of tokens generated so far, so XLA compiles each
function once per (batch size, prompt bucket, cache length):

- Prompts are left-padded to a *bucket* length (a power of two, at least 16), so prompts
  of 17 to 32 tokens all share one compiled prefill. Padding slots are masked out of
  attention and every row gets its own positions 0, 1, ... from its first real token.
- The cache has a fixed number of slots S (`cache_len`, by default the next power of two
  holding the prompt bucket plus the new tokens, at most the model's context). One
  decode step feeds one token per row and writes one slot.
- The decode step is a pure function of (parameters, decode state) compiled once and
  reused for every token; the decode state is donated, so the cache is updated in place.
  Without streaming the whole loop runs on the device in a `jax.lax.while_loop`.

Rows stop independently (on any of their stop ids); the batch stops when all rows have
stopped, when `max_new_tokens` are generated, or when the cache is full, and each row
reports which of these ended it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import sharding
from llama_jax.errors import LlamaError
from llama_jax.inference.int8 import check_cache_dtype, new_cache
from llama_jax.inference.sampling import SamplingParams, sample
from llama_jax.model import KVCache

MIN_BUCKET = 16
MIN_CACHE = 128
STOP_PAD = 8  # stop-id tables are padded to a multiple of this, to share compilations

# Why a row finished.
STOP = "stop"  # it produced one of its stop ids (not included in the output)
LENGTH = "length"  # it reached max_new_tokens
CACHE_FULL = "cache_full"  # the cache (at most the model's context) has no free slot


class Generation(list):
    """The new token ids of each prompt (a list of lists), with `finish_reasons`.

    Attributes:
      finish_reasons: per row, "stop", "length" or "cache_full".
    """

    def __init__(self, rows: list[list[int]], finish_reasons: list[str]):
        super().__init__(rows)
        self.finish_reasons = finish_reasons


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the decode loop carries, all static shapes.

    Attributes:
      cache: the KVCache (see Transformer.init_cache for its form).
      token: [B] the latest token of each row, fed at the next step.
      position: [B] its rotary position.
      done: [B] rows that have stopped (they keep computing, their output is ignored).
      stopped: [B] rows that stopped on a stop id.
      out: [B, S] generated tokens, column i holding the i-th new token.
      step: int32 scalar, the number of tokens generated (columns of `out` written).
    """

    cache: KVCache
    token: jax.Array
    position: jax.Array
    done: jax.Array
    stopped: jax.Array
    out: jax.Array
    step: jax.Array


def bucket_length(n: int, max_len: int, minimum: int = MIN_BUCKET) -> int:
    """The padded prompt length: the next power of two >= n (at least `minimum`), capped."""
    return min(max(minimum, 1 << (max(n, 1) - 1).bit_length()), max_len)


def default_cache_len(prompt_bucket: int, max_new_tokens: int, max_len: int) -> int:
    """Slots for the prompt bucket plus the new tokens, rounded up to the next size.

    Sizes are powers of two and the midpoints between them (128, 192, 256, 384, 512, ...),
    so at most a third of the slots go unused, while prompts and lengths that differ a
    little still share one decode compilation. Attention reads every slot on every step:
    at batch 32 a cache twice too long cost more than the weights.
    """
    need = max(prompt_bucket + max_new_tokens, MIN_CACHE)
    power = 1 << (need - 1).bit_length()  # the power of two >= need
    size = power * 3 // 4 if need <= power * 3 // 4 else power
    return min(size, max_len)


# -- the compiled pieces -------------------------------------------------------------------------


def _finish(ds: DecodeState, new: jax.Array, stop_ids: jax.Array, pad_id: int) -> DecodeState:
    """Record the tokens `new` [B] as step `ds.step` and update the stop flags."""
    new = jnp.where(ds.done, pad_id, new)
    is_stop = jnp.any(new[:, None] == stop_ids, axis=-1) & ~ds.done  # [B]
    out = jax.lax.dynamic_update_slice(ds.out, new[:, None], (0, ds.step))
    return dataclasses.replace(
        ds,
        token=new,
        done=ds.done | is_stop,
        stopped=ds.stopped | is_stop,
        out=out,
        step=ds.step + 1,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "cache_dtype", "pad_id"))
def _prefill(
    graphdef, state, tokens, mask, stop_ids, sampling, key, *, cache_len, cache_dtype, pad_id
):
    """Run the prompts [B, P] through the model into a new cache; sample the first token."""
    model = nnx.merge(graphdef, state)
    B, P = tokens.shape
    # Left padding: each row's positions count its real tokens only.
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)  # [B, P]
    cache = new_cache(model, B, cache_len, cache_dtype)
    if P > 1:
        # All but the last token: only the cache is kept, so XLA drops the [B, P, V]
        # logits and the output projection with them.
        _, cache = model(tokens[:, :-1], positions[:, :-1], mask[:, :-1], cache)
    logits, cache = model(tokens[:, -1:], positions[:, -1:], mask[:, -1:], cache)
    first = sample(logits[:, 0], jax.random.fold_in(key, 0), **sampling)
    ds = DecodeState(
        cache=cache,
        token=first,
        position=positions[:, -1] + 1,
        done=jnp.zeros((B,), bool),
        stopped=jnp.zeros((B,), bool),
        out=jnp.full((B, cache_len), pad_id, jnp.int32),
        step=jnp.zeros((), jnp.int32),
    )
    return _finish(ds, first, stop_ids, pad_id)


def _step(model, ds: DecodeState, stop_ids, sampling, key, pad_id) -> DecodeState:
    """One decode step: feed each row's latest token, sample the next."""
    logits, cache = model(ds.token[:, None], ds.position[:, None], None, ds.cache)
    new = sample(logits[:, 0], jax.random.fold_in(key, ds.step), **sampling)
    ds = dataclasses.replace(ds, cache=cache, position=ds.position + 1)
    return _finish(ds, new, stop_ids, pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "pad_id"), donate_argnames=("ds",))
def _decode_step(graphdef, state, ds, stop_ids, sampling, key, *, pad_id):
    """One compiled decode step (the streaming path)."""
    return _step(nnx.merge(graphdef, state), ds, stop_ids, sampling, key, pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "pad_id"), donate_argnames=("ds",))
def _decode_loop(graphdef, state, ds, stop_ids, sampling, key, n_tokens, *, pad_id):
    """Decode on the device until `n_tokens` (traced) exist or every row has stopped."""
    model = nnx.merge(graphdef, state)
    return jax.lax.while_loop(
        lambda ds: (ds.step < n_tokens) & ~jnp.all(ds.done),
        lambda ds: _step(model, ds, stop_ids, sampling, key, pad_id),
        ds,
    )


# -- input checks and batching -----------------------------------------------------------------


def _check_prompts(prompt_ids, vocab_size: int, max_len: int) -> list[list[int]]:
    if isinstance(prompt_ids, np.ndarray | jax.Array):
        prompt_ids = np.asarray(prompt_ids).tolist()
    if not isinstance(prompt_ids, Sequence) or not prompt_ids:
        raise LlamaError("prompt_ids must be a non-empty list of lists of token ids.")
    if all(isinstance(t, int | np.integer) for t in prompt_ids):
        raise LlamaError("prompt_ids must be a list of lists of ints (one list per prompt).")
    rows = []
    for i, row in enumerate(prompt_ids):
        row = [int(t) for t in row]
        if not row:
            raise LlamaError(f"Prompt {i} is empty: give at least one token (e.g. BOS).")
        if len(row) > max_len:
            raise LlamaError(
                f"Prompt {i} has {len(row)} tokens, more than the model's context of "
                f"{max_len} (max_seq_len); shorten it."
            )
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise LlamaError(
                f"Prompt {i} holds token ids {bad[:5]} outside the vocabulary [0, {vocab_size})."
            )
        rows.append(row)
    return rows


def left_pad(rows: list[list[int]], length: int, pad_id: int, vocab_size: int):
    """Prompts as one left-padded batch: (tokens [B, length] int32, mask [B, length] bool).

    Raises:
      LlamaError: pad_id is outside the vocabulary.
    """
    if not 0 <= pad_id < vocab_size:
        raise LlamaError(f"pad_id={pad_id} is outside the vocabulary [0, {vocab_size}).")
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        tokens[i, length - len(r) :] = r
        mask[i, length - len(r) :] = True
    return tokens, mask


def _stop_table(stop_ids, batch: int) -> np.ndarray:
    """[B, Q] stop ids, -1 padded; `stop_ids` is None, one set for all rows or one per row."""
    if stop_ids is None:
        per_row = [[] for _ in range(batch)]
    elif all(isinstance(s, int | np.integer) for s in stop_ids):
        per_row = [list(stop_ids)] * batch
    else:
        per_row = [list(s or ()) for s in stop_ids]
        if len(per_row) != batch:
            raise LlamaError(
                f"stop_ids has {len(per_row)} per-row sets for {batch} prompts; give one "
                "set for all rows or one per row."
            )
    q = max(STOP_PAD, -(-max(len(r) for r in per_row) // STOP_PAD) * STOP_PAD)
    table = np.full((batch, q), -1, np.int32)
    for i, r in enumerate(per_row):
        table[i, : len(r)] = r
    return table


class _Batch(NamedTuple):
    """Checked prompts, padded and prefilled: what a decode loop starts from."""

    tokens: np.ndarray  # [B, P] int32, left-padded; numpy, so jit replicates it on every host
    mask: np.ndarray  # [B, P] bool, the real tokens
    stop_table: np.ndarray  # [B, Q] int32, see `_stop_table`
    n_tokens: int  # the most new tokens a row gets: max_new_tokens or what the cache holds
    cache_bound: bool  # whether the cache, not max_new_tokens, set n_tokens
    graphdef: nnx.GraphDef  # graphdef, state: the model, split for the compiled functions
    state: nnx.State
    mesh: jax.sharding.Mesh | None  # the mesh the model is sharded over (None: one device)
    sampling: dict[str, jax.Array]  # `SamplingParams.arrays()`
    key: jax.Array  # the PRNG key of the seed
    ds: DecodeState  # after the prefill, with each row's first new token


def _prepare_batch(
    model, rows, length, cache_len, cache_dtype, max_new_tokens, stop_ids, sampling, pad_id
):
    """Pad the prompts, bound the new tokens by the cache and run the prefill.

    Args:
      model: the `Transformer` that runs the prefill (the target, when speculating).
      rows: the prompts, as `_check_prompts` returns them.
      length: P, the padded prompt length: the prompt bucket, capped so that what decoding
        needs fits after it (`speculative_generate` keeps k + 1 slots free for a round).
      cache_len: S, the cache's slots; cache_dtype: its dtype (see `generate`).
      max_new_tokens, stop_ids, pad_id: as for `generate`; sampling: the `SamplingParams`.
    Returns:
      a `_Batch`.
    """
    tokens, mask = left_pad(rows, length, pad_id, model.cfg.vocab_size)
    stops = _stop_table(stop_ids, len(rows))
    # After the prefill the cache holds P slots; each further token needs one more slot,
    # except the last one sampled, which is never fed back.
    n_tokens = min(max_new_tokens, cache_len - length + 1)
    cache_bound = max_new_tokens > n_tokens

    graphdef, state = nnx.split(model)
    # A model sharded over a mesh decodes on it: with the mesh in context the model's
    # logical constraints shard heads and MLP over `tensor` (and rows over data/fsdp).
    mesh = _mesh_of(state)
    arrays = sampling.arrays()
    key = jax.random.key(sampling.seed)
    with sharding.use_mesh(mesh):
        ds = _prefill(
            graphdef,
            state,
            tokens,
            mask,
            stops,
            arrays,
            key,
            cache_len=cache_len,
            cache_dtype=cache_dtype,
            pad_id=pad_id,
        )
    return _Batch(
        tokens, mask, stops, n_tokens, cache_bound, graphdef, state, mesh, arrays, key, ds
    )


@dataclasses.dataclass
class GenerationStream:
    """Tokens as they are generated; iterate to get one list per step.

    Each item holds, per row, the new token id, or None for rows that have already
    finished (a stop id is reported as None: it is not part of the output). After the
    iteration, `tokens` holds the new ids per row and `finish_reasons` why each ended.
    Call `stop_rows(rows)` between steps to end rows early (e.g. on a stop string).
    """

    _iter: Iterator[list[int | None]]
    tokens: list[list[int]]
    finish_reasons: list[str | None]
    _host_stop: np.ndarray

    def __iter__(self):
        return self._iter

    def stop_rows(self, rows: Sequence[int]) -> None:
        """Finish these rows now (reason "stop"); they generate nothing more."""
        self._host_stop[list(rows)] = True


def generate_stream(
    model,
    prompt_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids=None,
    *,
    cache_len: int | None = None,
    cache_dtype: str | None = None,
    pad_id: int = 0,
) -> GenerationStream:
    """Like `generate`, but yields the tokens step by step (see `GenerationStream`)."""
    sampling = SamplingParams(temperature, top_k, top_p, seed)
    cache = (cache_len, cache_dtype)
    return _start(model, prompt_ids, max_new_tokens, sampling, stop_ids, cache, pad_id, True)


def generate(
    model,
    prompt_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids=None,
    *,
    cache_len: int | None = None,
    cache_dtype: str | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
) -> Generation:
    """Generate new tokens for a batch of prompts of any lengths.

    Args:
      model: a `Transformer` (on one device or sharded over a mesh).
      prompt_ids: a list of prompts, each a non-empty list of token ids (with BOS if the
        model wants one; nothing is added).
      max_new_tokens: the most new tokens per prompt.
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_k: sample only among the k most likely tokens (None: no limit).
      top_p: sample only among the most likely tokens holding this much probability,
        in (0, 1] (None: no limit).
      seed: the random seed; the same seed gives the same tokens.
      stop_ids: token ids that end a row (not included in its output): None, one
        collection for all rows, or one collection per row (e.g. `tokenizer.stop_ids`).
      cache_len: slots of the KV cache (default: see `default_cache_len`); prompt bucket
        plus new tokens beyond it end generation with reason "cache_full".
      cache_dtype: the KV cache's dtype: None (the model's compute dtype), "float32",
        "bfloat16", "float16", or "int8" (`llama_jax.inference.int8.Int8KVCache`: one
        int8 per number plus a float32 scale per key or value vector).
      pad_id: the id used to pad prompts (masked out; any valid id works).
      on_token: called as on_token(row, token_id) for every new token as it is
        generated; decoding then returns to Python after every step.
    Returns:
      a `Generation`: a list with the new ids of each prompt, and `finish_reasons`.
    """
    sampling = SamplingParams(temperature, top_k, top_p, seed)
    streaming = on_token is not None  # on_token is called after every step
    cache = (cache_len, cache_dtype)
    stream = _start(model, prompt_ids, max_new_tokens, sampling, stop_ids, cache, pad_id, streaming)
    for step in stream:
        for row, tok in enumerate(step):
            if tok is not None:
                on_token(row, tok)
    return Generation(stream.tokens, stream.finish_reasons)


def _start(model, prompt_ids, max_new_tokens, sampling, stop_ids, cache, pad_id, stream):
    cfg = model.cfg
    cache_len, cache_dtype = cache  # slots (None: default_cache_len) and dtype
    check_cache_dtype(cache_dtype)
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise LlamaError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
    rows = _check_prompts(prompt_ids, cfg.vocab_size, cfg.max_seq_len)
    B = len(rows)
    longest = max(len(r) for r in rows)
    P = bucket_length(longest, cfg.max_seq_len)
    if cache_len is None:
        cache_len = default_cache_len(P, max_new_tokens, cfg.max_seq_len)
    elif not longest <= cache_len <= cfg.max_seq_len:
        raise LlamaError(
            f"cache_len={cache_len} must hold the longest prompt ({longest} tokens) and be at "
            f"most the model's context ({cfg.max_seq_len})."
        )
    P = min(P, cache_len)
    b = _prepare_batch(
        model, rows, P, cache_len, cache_dtype, max_new_tokens, stop_ids, sampling, pad_id
    )
    ds, n_tokens, cache_bound, stop_table = b.ds, b.n_tokens, b.cache_bound, b.stop_table
    graphdef, state, mesh, arrays, key = b.graphdef, b.state, b.mesh, b.sampling, b.key

    result = GenerationStream(iter(()), [[] for _ in range(B)], [None] * B, np.zeros(B, bool))

    def finish(out, stopped, count):
        for i in range(B):
            row = out[i, :count].tolist()
            reason = CACHE_FULL if cache_bound and len(row) == n_tokens else LENGTH
            if stopped[i]:
                # The first stop id ends the row; everything after it is padding.
                row_stops = set(stop_table[i].tolist())
                row, reason = row[: next(j for j, t in enumerate(row) if t in row_stops)], STOP
            result.tokens[i] = row
            result.finish_reasons[i] = reason

    def run_loop():
        nonlocal ds
        with sharding.use_mesh(mesh):
            ds = _decode_loop(
                graphdef, state, ds, stop_table, arrays, key, np.int32(n_tokens), pad_id=pad_id
            )
        out, stopped, step = jax.device_get((ds.out, ds.stopped, ds.step))
        finish(out, stopped, int(step))
        yield from ()

    def run_stream():
        nonlocal ds
        emitted = np.zeros(B, bool)
        while True:
            tok, done, stopped, step = jax.device_get((ds.token, ds.done, ds.stopped, ds.step))
            active = ~emitted & ~result._host_stop
            item = [int(tok[i]) if active[i] and not stopped[i] else None for i in range(B)]
            for i, t in enumerate(item):
                if t is not None:
                    result.tokens[i].append(t)
            emitted |= done
            yield item
            halted = done | result._host_stop
            if int(step) >= n_tokens or halted.all():
                break
            if result._host_stop.any():
                ds = dataclasses.replace(ds, done=ds.done | jnp.asarray(result._host_stop))
            with sharding.use_mesh(mesh):
                ds = _decode_step(graphdef, state, ds, stop_table, arrays, key, pad_id=pad_id)
        for i in range(B):
            if stopped[i] or result._host_stop[i]:
                result.finish_reasons[i] = STOP
            elif cache_bound and len(result.tokens[i]) == n_tokens:
                result.finish_reasons[i] = CACHE_FULL
            else:
                result.finish_reasons[i] = LENGTH

    result._iter = run_stream() if stream else run_loop()
    return result


def _mesh_of(state):
    """The mesh the model's parameters are sharded over, or None (one device)."""
    for leaf in jax.tree.leaves(state):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if isinstance(mesh, jax.sharding.Mesh) and mesh.size > 1:
            return mesh
    return None


# -- text level ----------------------------------------------------------------------------------


def generate_text(
    model,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[dict]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    *,
    chat: bool = False,
    stop: Sequence[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    cache_len: int | None = None,
    cache_dtype: str | None = None,
    return_finish_reasons: bool = False,
):
    """Generate text for one prompt or a batch.

    Args:
      model: a `Transformer`.
      tokenizer: the model's `Tokenizer`.
      prompts: a string, a list of strings, or (with chat=True) a list of dialogs, each
        a list of {"role", "content"} messages (one dialog alone also works).
      max_new_tokens, temperature, top_k, top_p, seed, cache_len, cache_dtype: as for
        `generate`.
      chat: format prompts with the model family's chat template.
      stop: strings that end a row's text (the text is cut before them); the tokenizer's
        stop ids (e.g. `<|eot_id|>`) always end a row.
      on_text: called as on_text(row, text_piece) while generating (streaming).
      return_finish_reasons: also return why each row ended ("stop", "length",
        "cache_full"; a stop string counts as "stop").
    Returns:
      the generated text (a string for a single prompt, else a list); with
      return_finish_reasons, (text, reason) or (texts, reasons).
    """
    single = isinstance(prompts, str) or (chat and prompts and isinstance(prompts[0], dict))
    items = [prompts] if single else list(prompts)
    if chat:
        ids = [tokenizer.encode_dialog(d) for d in items]
    else:
        if not all(isinstance(p, str) for p in items):
            raise LlamaError("prompts must be strings (or dialogs with chat=True).")
        for i, p in enumerate(items):
            if not p:
                raise LlamaError(f"Prompt {i} is empty; give some text to continue.")
        ids = [tokenizer.encode(p, bos=True) for p in items]
    rows = TextRows(tokenizer, len(items), stop, on_text)
    sampling = SamplingParams(temperature, top_k, top_p, seed)
    stop_ids, pad_id = sorted(tokenizer.stop_ids), tokenizer.pad_id
    cache = (cache_len, cache_dtype)
    stream = _start(model, ids, max_new_tokens, sampling, stop_ids, cache, pad_id, rows.streams)

    def result(texts):
        reasons = rows.reasons(stream.finish_reasons)
        if not return_finish_reasons:
            return texts[0] if single else texts
        return (texts[0], reasons[0]) if single else (texts, reasons)

    if not rows.streams:
        for _ in stream:
            pass
        return result([tokenizer.decode(t) for t in stream.tokens])
    for step in stream:
        ended = [i for i, tok in enumerate(step) if tok is not None and rows.push(i, tok)]
        if ended:
            stream.stop_rows(ended)
    return result(rows.finish())


class TextRows:
    """Each row's new token ids turned into text as they come, cut at stop strings.

    `on_text(row, piece)` receives the text as it grows, except the last characters that
    could still begin a stop string: those are held until they cannot, so no piece of a
    stop string is ever passed on. Used by `generate_text` and the speculative version.
    """

    def __init__(self, tokenizer, n_rows: int, stop: Sequence[str] | None, on_text=None):
        self.decoders = [tokenizer.stream_decoder() for _ in range(n_rows)]
        self.texts = [""] * n_rows
        self.sent = [0] * n_rows  # characters already passed to on_text
        self.cut: set[int] = set()  # rows whose text ended at a stop string
        self.stop, self.on_text = [s for s in (stop or ()) if s], on_text
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    @property
    def streams(self) -> bool:
        """Whether tokens must be pushed as they come: to pass text on, or to find stops."""
        return bool(self.stop) or self.on_text is not None

    def reasons(self, finish_reasons: Sequence[str]) -> list[str]:
        """The generation's finish reasons, with "stop" for rows cut at a stop string."""
        return [STOP if i in self.cut else r for i, r in enumerate(finish_reasons)]

    def push(self, i: int, token: int) -> bool:
        """Add row i's next token; True when its text has just reached a stop string."""
        if i in self.cut:
            return False
        self.texts[i] += self.decoders[i].push(token)
        ended = self._check_stop(i)
        self._emit(i, final=ended)
        return ended

    def finish(self) -> list[str]:
        """Every row's final text (the decoders flushed), the rest passed to on_text."""
        for i in range(len(self.texts)):
            if i not in self.cut:
                self.texts[i] += self.decoders[i].flush()
                self._check_stop(i)
            self._emit(i, final=True)
        return self.texts

    def _check_stop(self, i: int) -> bool:
        text = self.texts[i]
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.texts[i] = text[:cut]
            self.cut.add(i)
        return cut >= 0

    def _emit(self, i: int, final: bool) -> None:
        text, sent = self.texts[i], self.sent[i]
        end = len(text) if final else max(sent, len(text) - self.hold)
        if self.on_text is not None and end > sent:
            self.on_text(i, text[sent:end])
        self.sent[i] = end
