"""LoRA: low-rank adapters on the projections of a frozen model (Hu et al., 2021).

A projection W (input dims I, output dims O) is kept frozen and a trainable low-rank
update is added beside it:

    y = x W + (alpha / r) * ((dropout(x) A) B)       A: [I..., r]   B: [r, O...]

A starts small and random, B at zero, so an adapted model computes exactly what the base
model does until training moves B. With rank r much smaller than the widths, A and B
hold r * (|I| + |O|) numbers where W holds |I| * |O|: the gradients and the optimizer
state shrink by the same factor, and the frozen base can stay in bfloat16 (or int8).

    model = checkpoint.load("ckpt/")
    apply_lora(model, targets=("wq", "wv"), rank=8, alpha=16)   # in place
    ...train the LoRAParam leaves (Trainer does, with TrainConfig(lora_rank=8))...
    merged = merge(model)                                       # a plain Transformer
    export_peft(model, "adapter/")                              # for PyTorch's peft

The adapters are `LoRAParam` variables, a type of their own, so that `nnx.state(model,
LoRAParam)` selects exactly the trainable leaves and `nnx.state(model, nnx.Param)` the
frozen base. A `LoRA` module sits where the weight was (`attention.wq` becomes a module
with `base`, `lora_a`, `lora_b`) and is called by `model.layers.linear` like any weight
module, so the model code does not change. The base may itself be a module (an int8
weight with its scales): the adapter only needs its shape and calls it through `linear`.

Dimension letters (see model/transformer.py): D model width, F MLP width, N query heads,
K KV heads, H head dim, L layers; R is the adapter rank.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError
from llama_jax.model.layers import linear, weight_order

# The projections an adapter can wrap: name -> (the block's sub-module holding it, the
# number of leading input dims of its weight). wo is [N, H, D]: two input dims.
TARGETS: dict[str, tuple[str, int]] = {
    "wq": ("attention", 1),
    "wk": ("attention", 1),
    "wv": ("attention", 1),
    "wo": ("attention", 2),
    "w1": ("feed_forward", 1),
    "w2": ("feed_forward", 1),
    "w3": ("feed_forward", 1),
}
DEFAULT_TARGETS = ("wq", "wv")  # the original paper's choice, and peft's for LLaMA

# Hugging Face module names of the targets (peft's `target_modules`).
HF_MODULES = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
}


class LoRAParam(nnx.Variable):
    """A trainable adapter matrix (A or B of a LoRA), a type apart from the frozen nnx.Param."""


class LoRA(nnx.Module):
    """A frozen weight plus a trainable low-rank update, called like the weight itself.

    Args:
      base: the frozen weight, an nnx.Param shaped [I..., O...], or a weight module called
        as `base(spec, x, dtype, out_dtype)` (e.g. an int8 weight) with a `shape`
        attribute or a largest leaf of that shape.
      n_in: how many leading dims of the weight are input dims (contracted with x).
      rank: r.
      alpha: the update is scaled by alpha / r, so changing r keeps its size comparable.
      dropout: probability of zeroing an input of the adapter while training (the
        base product never sees dropout). Applied only while `dropout_key` is set.
      key: a jax random key for A's initial values.
    """

    def __init__(self, base, n_in: int, rank: int, alpha: float, dropout: float, key):
        shape = base_shape(base)
        in_shape, out_shape = shape[:n_in], shape[n_in:]
        fan_in = math.prod(in_shape)
        # peft's default: Kaiming-uniform A (bound 1/sqrt(fan_in)), B zero.
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, (*in_shape, rank), jnp.float32, -bound, bound)
        self.base = base
        self.lora_a = LoRAParam(a)  # [I..., R]
        self.lora_b = LoRAParam(jnp.zeros((rank, *out_shape), jnp.float32))  # [R, O...]
        self.n_in = n_in
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.dropout_key = nnx.data(None)  # set for one training forward by `set_dropout_key`

    @property
    def scale(self) -> float:
        """alpha / r, the factor of the low-rank update."""
        return self.alpha / self.rank

    def __call__(self, spec: str, x: jax.Array, dtype, out_dtype=None) -> jax.Array:
        """`linear(spec, x, base)` + scale * ((dropout(x) A) B), A and B cast to `dtype`.

        Args:
          spec: the weight's einsum, e.g. "BTD,DNH->BTNH".
          x: the activations.
          dtype: the matmul dtype.
          out_dtype: the result's dtype; default `dtype`.
        Returns:
          The adapted product, in out_dtype (or dtype).
        """
        y = linear(spec, x, self.base, dtype, out_dtype)
        spec_a, spec_b = adapter_specs(spec, self.n_in)
        if self.dropout > 0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        xa = jnp.einsum(
            weight_order(spec_a),
            x.astype(dtype),
            self.lora_a[...].astype(dtype),
            preferred_element_type=jnp.float32,
        )
        delta = jnp.einsum(
            spec_b,
            xa.astype(dtype),
            self.lora_b[...].astype(dtype),
            preferred_element_type=jnp.float32,
        )
        return y + (self.scale * delta).astype(y.dtype)

    def delta(self) -> jax.Array:
        """The full update scale * A B, float32, shaped like the base weight."""
        a, b = self.lora_a[...], self.lora_b[...]
        a2 = a.reshape(-1, self.rank)  # [I, R]
        b2 = b.reshape(self.rank, -1)  # [R, O]
        return (self.scale * (a2 @ b2)).reshape(*a.shape[:-1], *b.shape[1:])


def adapter_specs(spec: str, n_in: int) -> tuple[str, str]:
    """The two einsums of an adapter from its weight's: "BTD,DNH->BTNH" -> "BTD,DR->BTR", ...

    Args:
      spec: the weight's einsum "x,w->out", the weight's first `n_in` letters its inputs.
      n_in: number of input dims of the weight.
    Returns:
      (x A, (x A) B) einsums, R naming the rank.
    """
    lhs, out = spec.split("->")
    xs, ws = lhs.split(",")
    ins, outs = ws[:n_in], ws[n_in:]
    if "R" in spec or not set(ins) <= set(xs) or not set(outs) <= set(out):
        raise LlamaError(
            f"A LoRA adapter with {n_in} input dims cannot follow the einsum {spec!r}; its "
            "weight must list its input dims (shared with x) first."
        )
    xr = "".join(c for c in xs if c not in ins) + "R"
    return f"{xs},{ins}R->{xr}", f"{xr},R{outs}->{out}"


def base_shape(base) -> tuple[int, ...]:
    """The shape of the weight a LoRA wraps: a Param's, or a weight module's."""
    if isinstance(base, nnx.Variable):
        return tuple(base.shape)
    if hasattr(base, "shape"):
        return tuple(base.shape)
    leaves = jax.tree.leaves(nnx.state(base))
    if not leaves:
        raise LlamaError(f"A LoRA cannot wrap {type(base).__name__}: it holds no weight.")
    return tuple(max(leaves, key=lambda a: math.prod(a.shape)).shape)


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """The targets as a tuple, or a LlamaError naming the unknown ones."""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise LlamaError(
            f"LoRA targets {list(targets)}: each must be one of {list(TARGETS)}, at least one, "
            "none twice (e.g. --lora-targets wq,wv)."
        )
    return targets


def check_lora(rank: int, alpha: float, dropout: float) -> None:
    """Raise a LlamaError for a rank, alpha or dropout no adapter can have."""
    if not isinstance(rank, int) or rank <= 0:
        raise LlamaError(f"LoRA rank must be a positive integer (--lora-rank), got {rank!r}.")
    if not alpha > 0:
        raise LlamaError(f"LoRA alpha must be > 0 (--lora-alpha), got {alpha!r}.")
    if not 0 <= dropout < 1:
        raise LlamaError(f"LoRA dropout must be in [0, 1) (--lora-dropout), got {dropout!r}.")


def apply_lora(
    model,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    seed: int = 0,
):
    """Wrap the chosen projections of every block in a LoRA, in place.

    Args:
      model: a Transformer (real or abstract, e.g. inside nnx.eval_shape).
      targets: any of wq, wk, wv, wo, w1, w2, w3 (a tuple or "wq,wv").
      rank: r, the adapters' inner width.
      alpha: the update is scaled by alpha / r.
      dropout: dropout probability on the adapters' input while training.
      seed: seeds A's initial values (each layer and target its own key).
    Returns:
      The model, now adapted.
    Raises:
      LlamaError: unknown targets, a bad rank/alpha/dropout, or a model already adapted.
    """
    targets = check_targets(targets)
    check_lora(rank, alpha, dropout)
    if any(True for _ in lora_modules(model)):
        raise LlamaError("The model already has LoRA adapters; merge() them or start anew.")
    key = jax.random.key(seed)
    for i, block in enumerate(model.layers):
        for j, name in enumerate(targets):
            group, n_in = TARGETS[name]
            holder = getattr(block, group)
            k = jax.random.fold_in(jax.random.fold_in(key, i), j)
            setattr(holder, name, LoRA(getattr(holder, name), n_in, rank, alpha, dropout, k))
    return model


def lora_modules(model) -> Iterator[tuple[int, str, LoRA]]:
    """(layer, target, LoRA) for every adapter of the model, in layer then TARGETS order."""
    for i, block in enumerate(model.layers):
        for name, (group, _) in TARGETS.items():
            w = getattr(getattr(block, group), name)
            if isinstance(w, LoRA):
                yield i, name, w


def lora_settings(model) -> dict:
    """{"rank", "alpha", "dropout", "targets"} of an adapted model (a LlamaError if none)."""
    mods = list(lora_modules(model))
    if not mods:
        raise LlamaError("The model has no LoRA adapters (see apply_lora).")
    first = mods[0][2]
    targets = tuple(name for name in TARGETS if any(n == name for _, n, _ in mods))
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.dropout, "targets": targets}


def set_dropout_key(model, key) -> None:
    """Turn on adapter dropout for the next forward, each adapter with its own key.

    Training calls it on the model it builds for one step; a model without a key (the
    default) applies no dropout. Remat recomputes a block with the same key, hence the
    same mask.

    Args:
      model: an adapted model.
      key: a jax random key (e.g. folded from the run's seed and the step), or None.
    """
    for n, (_, _, mod) in enumerate(lora_modules(model)):
        mod.dropout_key = nnx.data(None if key is None else jax.random.fold_in(key, n))


def merge(model):
    """A plain Transformer whose weights are base + (alpha / r) A B; the input is unchanged.

    The returned model shares every unadapted array with `model` (no copy) and has new
    weights where adapters were, in the base's dtype.

    Args:
      model: an adapted model with float bases (an int8 base must provide `dequantize()`).
    Returns:
      The merged Transformer: same config, no LoRA modules, same logits up to rounding.
    """
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)  # new modules over the same arrays
    for i, name, mod in lora_modules(merged):
        base = mod.base
        if isinstance(base, nnx.Variable):
            w = base[...]
        elif hasattr(base, "dequantize"):  # an int8 weight: merged in the model's dtype
            w = base.dequantize(model.cfg.param_dtype)
        else:
            raise LlamaError(
                f"layers.{i}.{name}: the adapter's base {type(base).__name__} cannot be "
                "merged (it has no dequantize()); export the adapter instead."
            )
        new = (w.astype(jnp.float32) + mod.delta()).astype(w.dtype)
        setattr(getattr(merged.layers[i], TARGETS[name][0]), name, nnx.Param(new))
    return merged


def count_lora_params(
    cfg: LlamaConfig, targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 8
) -> int:
    """Trainable numbers of LoRA: L * sum over targets of r * (inputs + outputs).

    Args:
      cfg: the model config.
      targets: the wrapped projections.
      rank: r.
    Returns:
      The number of adapter parameters (A and B of every target of every layer).
    """
    D, F, NH, KH = (
        cfg.dim,
        cfg.ffn_hidden_dim,
        cfg.n_heads * cfg.head_dim,
        cfg.kv_heads * cfg.head_dim,
    )
    sizes = {
        "wq": (D, NH),
        "wk": (D, KH),
        "wv": (D, KH),
        "wo": (NH, D),
        "w1": (D, F),
        "w3": (D, F),
        "w2": (F, D),
    }
    return cfg.n_layers * sum(rank * sum(sizes[t]) for t in check_targets(targets))


def lora_state(model) -> dict:
    """The adapters as a nested dict of arrays (what training updates and checkpoints)."""
    return nnx.to_pure_dict(nnx.state(model, LoRAParam))


def set_lora_state(model, adapters: dict):
    """Put adapters (a nested dict, e.g. from a run checkpoint) into an adapted model."""
    state = nnx.state(model, LoRAParam)
    want = jax.tree.map(lambda a: tuple(a.shape), nnx.to_pure_dict(state))
    got = jax.tree.map(lambda a: tuple(a.shape), adapters)
    if want != got:
        raise LlamaError(
            "The adapters do not fit the model's LoRA (targets, rank or model config "
            "differ); adapt the model with the run's settings."
        )
    nnx.replace_by_pure_dict(state, adapters)
    nnx.update(model, state)
    return model


def frozen_from_plain(plain: dict, frozen_like: dict) -> dict:
    """A plain model's parameter dict rearranged as an adapted model's frozen state.

    An adapted model keeps each wrapped weight under `.../wq/base`; this takes it from
    `.../wq` of `plain` (e.g. weights from a converted checkpoint): an array, or an int8
    weight's {"values", "scale"} (from an int8 checkpoint).

    Args:
      plain: nested dict of a plain Transformer's parameters.
      frozen_like: the adapted model's non-adapter state as a nested dict (shapes).
    Returns:
      A nested dict shaped like `frozen_like` holding `plain`'s arrays.
    """

    def fill(like, src, path):
        out = {}
        for k, v in like.items():
            wrapped = isinstance(v, dict) and set(v) == {"base"}
            if wrapped and k in src and not (isinstance(src[k], dict) and "base" in src[k]):
                out[k] = {"base": src[k]}
            elif isinstance(v, dict):
                if not isinstance(src.get(k), dict):
                    raise LlamaError(f"The base weights lack {'/'.join(map(str, (*path, k)))}.")
                out[k] = fill(v, src[k], (*path, k))
            else:
                if k not in src:
                    raise LlamaError(f"The base weights lack {'/'.join(map(str, (*path, k)))}.")
                out[k] = src[k]
        return out

    return fill(frozen_like, plain, ())


# peft export --------------------------------------------------------------------------


def peft_tensors(model) -> dict[str, np.ndarray]:
    """The adapters as peft names them for transformers' LlamaForCausalLM, float32 numpy.

    peft's lora_A.weight is [r, in] and lora_B.weight [out, r] in torch's [out, in] order,
    with delta W = (alpha / r) lora_B @ lora_A. Hugging Face permuted the rows of q_proj
    and k_proj for its rotary convention (checkpoint.layout); B carries the output rows,
    so its rows get the same permutation, and A (the input side) none.

    Args:
      model: an adapted model.
    Returns:
      {"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight": array, ...}.
    """
    from llama_jax.checkpoint import layout

    cfg = model.cfg
    out = {}
    for i, name, mod in lora_modules(model):
        group = TARGETS[name][0]
        meta_name = f"layers.{i}.{group}.{name}.weight"
        a = np.asarray(jax.device_get(mod.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(mod.lora_b[...]), np.float32)
        a_t = a.reshape(-1, mod.rank).T  # [R, I]
        b_t = b.reshape(mod.rank, -1).T  # [O, R], rows in Meta's order
        hf_name, b_t = layout.meta_to_hf_tensor(meta_name, b_t, cfg)
        stem = "base_model.model." + hf_name.removesuffix(".weight")
        out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a_t)
        out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b_t)
    return out


def peft_config(model, base_model: str | None = None) -> dict:
    """peft's adapter_config.json for the model's adapters."""
    s = lora_settings(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": s["rank"],
        "lora_alpha": s["alpha"],
        "lora_dropout": s["dropout"],
        "target_modules": [HF_MODULES[t] for t in s["targets"]],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }


def export_peft(
    model, out_dir: str | os.PathLike, *, base_model: str | None = None, force: bool = False
) -> str:
    """Write the adapters as a peft adapter directory (PeftModel.from_pretrained loads it).

    Args:
      model: an adapted model.
      out_dir: the directory to create (atomically; see checkpoint.store.atomic_directory).
      base_model: recorded as base_model_name_or_path (e.g. the HF export of the base).
      force: replace an existing directory.
    Returns:
      The absolute path written: adapter_config.json and adapter_model.safetensors.
    """
    from llama_jax.checkpoint.safetensors_io import SafetensorsWriter
    from llama_jax.checkpoint.store import atomic_directory

    tensors = peft_tensors(model)
    config = peft_config(model, base_model)
    with atomic_directory(out_dir, force) as tmp:
        specs = [(k, v.dtype, v.shape) for k, v in tensors.items()]
        writer = SafetensorsWriter(os.path.join(tmp, "adapter_model.safetensors"), specs)
        for k, v in tensors.items():
            writer.write(k, v)
        writer.close()
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
