"""Generation: KV-cache decode against the full forward, greedy parity with transformers'
generate, one compilation per bucket, stop handling, streaming and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import llama_jax as lj
from llama_jax.inference.generate import (
    CACHE_FULL,
    LENGTH,
    STOP,
    _decode_loop,
    _decode_step,
    _prefill,
    generate,
    generate_stream,
    generate_text,
)
from llama_jax.model import set_params
from llama_jax.tokenizer import train_sentencepiece
from tests.hf_oracle import hf_params, make_hf_model

# 300 ids: the SentencePiece vocabulary of the text-level tests, so every test shares one
# model and its compilations.
CFG = lj.LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, max_seq_len=128
)
PROMPTS = [[1, 17, 33, 5, 90, 12, 7], [1, 4], [1, 100, 3, 3, 64, 2, 9, 11, 58, 20, 21, 99, 6]]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def hf_and_ours():
    hf = make_hf_model(CFG, seed=3)
    ours = set_params(lj.Transformer(CFG, rngs=nnx.Rngs(0)), hf_params(hf, CFG))
    return hf, ours


def left_pad(rows, pad=0):
    P = max(len(r) for r in rows)
    tokens = np.full((len(rows), P), pad, np.int32)
    mask = np.zeros((len(rows), P), bool)
    for i, r in enumerate(rows):
        tokens[i, P - len(r) :], mask[i, P - len(r) :] = r, True
    return tokens, mask


def test_kv_cache_decode_matches_full_forward(hf_and_ours):
    """Prefill left-padded prompts of different lengths, then decode token by token: every
    step's logits equal the full forward over each row's whole unpadded sequence."""
    _, model = hf_and_ours
    rng = np.random.default_rng(0)
    continuations = rng.integers(0, CFG.vocab_size, size=(len(PROMPTS), 6)).tolist()
    tokens, mask = left_pad(PROMPTS)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cache = lj.KVCache.create(CFG, len(PROMPTS), 32)
    forward = nnx.jit(lambda model, *args: model(*args))
    logits, cache = forward(
        model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), cache
    )
    got = [[logits[i, -1]] for i in range(len(PROMPTS))]
    pos = positions[:, -1]
    for step in range(6):
        pos = pos + 1
        tok = np.array([[c[step]] for c in continuations], np.int32)
        logits, cache = forward(model, jnp.asarray(tok), jnp.asarray(pos[:, None]), None, cache)
        for i in range(len(PROMPTS)):
            got[i].append(logits[i, 0])
    # The reference: each row's prompt + continuation unpadded, batched by padding on the
    # right (causal attention makes the padding after a row's end invisible to it).
    whole = [p + c for p, c in zip(PROMPTS, continuations, strict=True)]
    right = np.zeros((len(whole), max(map(len, whole))), np.int32)
    for i, row in enumerate(whole):
        right[i, : len(row)] = row
    full = forward(model, jnp.asarray(right))  # [B, T, V]
    for i, prompt in enumerate(PROMPTS):
        want = full[i, len(prompt) - 1 : len(whole[i])]
        assert rel_err(jnp.stack(got[i]), want) < 1e-5, f"row {i}"


def hf_greedy(hf, rows, n):
    tokens, mask = left_pad(rows)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, tokens.shape[1] :].tolist()


def test_greedy_matches_transformers_generate(hf_and_ours):
    hf, ours = hf_and_ours
    n = 40
    # One prompt alone, then a left-padded batch (HF derives positions from the mask).
    assert generate(ours, PROMPTS[:1], n) == hf_greedy(hf, PROMPTS[:1], n)
    batch = generate(ours, PROMPTS, n)
    assert batch == hf_greedy(hf, PROMPTS, n)
    assert batch.finish_reasons == [LENGTH] * 3
    # The same prompts alone give the same tokens as in the padded batch.
    assert generate(ours, PROMPTS[1:2], n)[0] == batch[1]


def test_one_decode_compile_per_bucket(hf_and_ours):
    """Prompts of 3 to 16 tokens share bucket 16; any token count shares the cache of the
    model's 128 slots; the decode step and loop compile once and nothing else recompiles."""
    _, model = hf_and_ours
    model = lj.Transformer(CFG.replace(norm_eps=1.1e-5), rngs=nnx.Rngs(0))  # fresh jit keys
    sizes = lambda: (_prefill._cache_size(), _decode_loop._cache_size(), _decode_step._cache_size())
    before = sizes()
    rng = np.random.default_rng(1)
    prompts = lambda n: [rng.integers(1, 300, size=n).tolist(), [1, 2, 3]]
    generate(model, prompts(5), 4)
    generate(model, prompts(5), 4, on_token=lambda row, tok: None)
    assert np.subtract(sizes(), before).tolist() == [1, 1, 1]

    compiles = []
    on_event = lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else 0
    jax.monitoring.register_event_duration_secs_listener(on_event)
    for length, new in [(3, 1), (9, 50), (16, 7), (12, 113), (7, 30)]:
        out = generate(model, prompts(length), new, temperature=0.5 * (new % 2), top_k=new)
        assert [len(r) for r in out] == [new, new]
        generate(model, prompts(length), new, on_token=lambda row, tok: None)
    assert compiles == []
    assert np.subtract(sizes(), before).tolist() == [1, 1, 1]


def test_stop_ids_per_row_and_finish_reasons(hf_and_ours):
    _, model = hf_and_ours
    free = generate(model, PROMPTS, 20)
    # Row 0 stops on its 5th token, row 1 on its 3rd, row 2 has no stop ids.
    stops = [{free[0][4]}, {free[1][2], 299}, set()]
    first0, first1 = free[0].index(free[0][4]), free[1].index(free[1][2])
    out = generate(model, PROMPTS, 20, stop_ids=stops)
    assert out == [free[0][:first0], free[1][:first1], free[2]]
    assert out.finish_reasons == [STOP, STOP, LENGTH]
    # The same stop set for every row.
    shared = generate(model, PROMPTS, 20, stop_ids={free[2][0]})
    assert shared[2] == [] and shared.finish_reasons[2] == STOP


def test_full_cache_ends_generation_with_a_reason(hf_and_ours):
    _, model = hf_and_ours
    out = generate(model, PROMPTS, 500)  # bucket 16 + 500 > the 128-token context
    assert [len(r) for r in out] == [128 - 16 + 1] * 3
    assert out.finish_reasons == [CACHE_FULL] * 3
    small = generate(model, PROMPTS, 40, cache_len=32)
    assert [len(r) for r in small] == [17] * 3 and small.finish_reasons == [CACHE_FULL] * 3
    assert small[0] == generate(model, PROMPTS, 17)[0]


def test_streaming_gives_the_same_tokens_as_they_come(hf_and_ours):
    _, model = hf_and_ours
    stops = [set(), {generate(model, PROMPTS, 8)[1][5]}, set()]
    want = generate(model, PROMPTS, 12, temperature=0.8, top_p=0.9, seed=5, stop_ids=stops)
    seen = [[] for _ in PROMPTS]
    got = generate(
        model,
        PROMPTS,
        12,
        temperature=0.8,
        top_p=0.9,
        seed=5,
        stop_ids=stops,
        on_token=lambda row, tok: seen[row].append(tok),
    )
    assert got == want == seen and got.finish_reasons == want.finish_reasons
    stream = generate_stream(model, PROMPTS, 12, stop_ids=stops)
    steps = list(stream)
    assert len(steps) == 12 and all(len(s) == 3 for s in steps)
    assert [[t for t in col if t is not None] for col in zip(*steps, strict=True)] == stream.tokens
    assert steps[-1][1] is None  # row 1 finished early


def test_same_seed_same_tokens_and_temperature_zero_is_greedy(hf_and_ours):
    _, model = hf_and_ours
    a = generate(model, PROMPTS, 16, temperature=1.0, seed=7)
    assert a == generate(model, PROMPTS, 16, temperature=1.0, seed=7)
    assert a != generate(model, PROMPTS, 16, temperature=1.0, seed=8)
    greedy = generate(model, PROMPTS, 16)
    assert generate(model, PROMPTS, 16, temperature=0.0, top_k=3, top_p=0.5, seed=9) == greedy
    assert a != greedy


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_sharded_decode_matches_one_device(hf_and_ours, axis_types):
    from llama_jax.sharding import MESH_AXES, make_mesh, shard_model

    _, model = hf_and_ours
    prompts = PROMPTS + PROMPTS[:1]  # 4 rows, so the batch divides over data=2
    want = generate(model, prompts, 10)
    # Tensor parallel over 4 devices (one query head each, the 2 KV heads split or
    # replicated as the rules decide), rows over 2.
    kind = jax.sharding.AxisType.Explicit if axis_types == "explicit" else None
    mesh = jax.make_mesh((2, 1, 4), MESH_AXES, axis_types=(kind,) * 3) if kind else None
    mesh = mesh or make_mesh("data=2,fsdp=1,tensor=4")
    sharded = shard_model(nnx.clone(model), mesh)
    wq = sharded.layers[0].attention.wq[...]
    assert len(wq.sharding.device_set) == 8 and wq.addressable_shards[0].data.shape[1] == 1
    assert generate(sharded, prompts, 10) == want


# -- text level ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, hf_and_ours):
    words = "the llama ate grass while alpacas watched the quiet hills at dawn".split()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, size=12)) for _ in range(300)]
    tok = train_sentencepiece(corpus, tmp_path_factory.mktemp("tok") / "t.model", 300)
    assert tok.vocab_size == CFG.vocab_size
    return hf_and_ours[1], tok


def test_generate_text_streams_and_cuts_at_stop_strings(text_model):
    model, tok = text_model
    prompts = ["the llama", "alpacas watched the quiet hills and", "at dawn"]
    full = generate_text(model, tok, prompts, 24, temperature=1.0, seed=1)
    ids = generate(
        model, [tok.encode(p) for p in prompts], 24, temperature=1.0, seed=1, stop_ids=tok.stop_ids
    )
    assert full == [tok.decode(r) for r in ids]
    pieces = [[], [], []]
    streamed = generate_text(
        model,
        tok,
        prompts,
        24,
        temperature=1.0,
        seed=1,
        on_text=lambda row, text: pieces[row].append(text),
    )
    assert streamed == full == ["".join(p) for p in pieces]
    assert len(pieces[0]) > 1
    stop = full[0][5:8]
    cut = generate_text(model, tok, prompts, 24, temperature=1.0, seed=1, stop=[stop])
    assert cut[0] == full[0][: full[0].find(stop)]
    assert generate_text(model, tok, "the llama", 24, temperature=1.0, seed=1) == full[0]


def test_generate_text_chat(text_model):
    model, tok = text_model
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    got = generate_text(model, tok, dialog, 8, chat=True)
    assert got == tok.decode(generate(model, [tok.encode_dialog(dialog)], 8, stop_ids=[2])[0])


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_ids=[[1, 2], []]), "Prompt 1 is empty"),
        (dict(prompt_ids=[]), "non-empty list"),
        (dict(prompt_ids=[1, 2, 3]), "list of lists"),
        (dict(prompt_ids=[[1] * 129]), "more than the model's context of 128"),
        (dict(prompt_ids=[[1, 300]]), "outside the vocabulary"),
        (dict(top_p=0.0), "top_p must lie in"),
        (dict(top_p=1.5), "top_p must lie in"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(cache_len=256), "at most the model's context"),
        (dict(stop_ids=[[1], [2]]), "per-row sets for 1 prompts"),
    ],
)
def test_bad_input(hf_and_ours, kwargs, match):
    _, model = hf_and_ours
    args = dict(prompt_ids=[[1, 2, 3]], max_new_tokens=4) | kwargs
    with pytest.raises(lj.LlamaError, match=match):
        generate(model, **args)
