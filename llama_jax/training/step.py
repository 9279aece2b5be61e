"""Training and fine-tuning: loss, optimizer, a sharded train step, resumable checkpoints.

    llama-jax train --preset tiny --tokenizer tok.model --data corpus/ --out runs/tiny
    llama-jax train --init converted/ --task sft --data chats.jsonl --out runs/sft

The pieces, each usable on its own:

    next-token loss    mean cross-entropy over targets with weight 1 (the prompt and the
                       padding of fine-tuning rows weigh 0, so they give no gradient)
    optimizer          AdamW, linear warmup then cosine decay, global-norm clipping;
                       weight decay on every matrix, none on the RMSNorm gains
    train step         one jitted pure function of (params, opt_state, batch); gradients
                       of M micro-batches are summed in a `lax.scan` before one update, so
                       M micro-batches of B/M rows equal one batch of B rows
    precision          float32 master weights and optimizer state; matmuls in
                       `TrainConfig.compute_dtype` (bfloat16 by default); the logits, the
                       softmax and the norms stay float32 (see model.py)
    sharding           params and optimizer state placed by `sharding.param_shardings`,
                       the batch split over the `data` and `fsdp` mesh axes; XLA inserts
                       the collectives
    checkpoints        an Orbax CheckpointManager in OUT/checkpoints: asynchronous saves
                       every `save_every` steps, the last `keep` kept, one more on SIGTERM;
                       a run restarted with the same OUT resumes from the latest

Resuming is exact: the data order is a pure function of (seed, step) (see data.py), the
step has no other randomness (LLaMA trains without dropout), and the checkpoint holds
params, optimizer state and the step; so an interrupted run continues with bitwise the
losses of an uninterrupted one on CPU.

Dimension letters (see model.py): B batch, T sequence length, V vocab; M micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import sharding
from llama_jax.config import DTYPES, LlamaConfig
from llama_jax.errors import LlamaError
from llama_jax.model import REMAT_POLICIES, CompiledTransformer, Transformer
from llama_jax.model.attention import KERNELS
from llama_jax.training import lora
from llama_jax.training.data import TokenDataset


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a run. The defaults suit a small model on a few devices."""

    steps: int = 1000  # optimizer updates
    batch_size: int = 8  # B: rows (sequences) per update, over all devices and hosts
    micro_batches: int = 1  # M: B is processed as M micro-batches, gradients summed
    seq_len: int = 256  # T
    learning_rate: float = 3e-4  # peak, reached after warmup
    warmup_steps: int = 100  # linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio at `steps`
    weight_decay: float = 0.1  # decoupled (AdamW), matrices only
    b1: float = 0.9
    b2: float = 0.95  # LLaMA's value; 0.999 reacts too slowly to loss spikes
    eps: float = 1e-8
    clip_norm: float = 1.0  # global gradient norm; 0 turns clipping off
    compute_dtype: str = "bfloat16"  # matmul dtype; master weights are always float32
    remat: str = "none"  # a key of model.REMAT_POLICIES
    attention: str = "xla"  # the reference einsums, or a kernel of llama_jax.kernels
    seed: int = 0  # initial weights (when not fine-tuning) and data order
    eval_every: int = 100  # steps between held-out evaluations; 0: only at start and end
    eval_batches: int = 4  # batches of B rows per evaluation (always the same rows)
    save_every: int = 100  # steps between checkpoints; 0: only at the end
    keep: int = 3  # checkpoints kept
    log_every: int = 10  # steps between metric lines
    # LoRA (training/lora.py): rank 0 trains every weight; rank r > 0 freezes the model and
    # trains rank-r adapters on `lora_targets` only, scaled by lora_alpha / r.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("wq", "wv")
    lora_dropout: float = 0.0  # on the adapters' input; the frozen base sees none
    # None: the frozen base holds float weights of the config's param_dtype. "int8" (LoRA
    # only): its projections are int8 values with float32 per-channel scales
    # (llama_jax.inference.int8), as read from an int8 checkpoint; they are never trained.
    base_quantization: str | None = None

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "micro_batches",
            "seq_len",
            "eval_batches",
            "keep",
            "log_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LlamaError(f"TrainConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise LlamaError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.batch_size % self.micro_batches:
            raise LlamaError(
                f"batch size {self.batch_size} is not divisible by micro_batches "
                f"{self.micro_batches}; each micro-batch must hold the same number of rows."
            )
        if self.learning_rate <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise LlamaError("TrainConfig needs learning_rate > 0 and 0 <= min_lr_ratio <= 1.")
        if self.compute_dtype not in DTYPES:
            raise LlamaError(f"compute dtype {self.compute_dtype!r} is not one of {DTYPES}.")
        if self.remat not in REMAT_POLICIES:
            raise LlamaError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}.")
        if self.attention not in KERNELS:
            raise LlamaError(f"attention {self.attention!r} is not one of {list(KERNELS)}.")
        if self.lora_rank != 0:
            lora.check_lora(self.lora_rank, self.lora_alpha, self.lora_dropout)
            object.__setattr__(self, "lora_targets", lora.check_targets(self.lora_targets))
        if self.base_quantization is not None:
            from llama_jax.inference import int8

            int8.check_method(self.base_quantization)
            if self.lora_rank == 0:
                raise LlamaError(
                    f"TrainConfig.base_quantization={self.base_quantization!r} needs LoRA: "
                    "int8 weights cannot be trained, only adapters on them (--lora-rank)."
                )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


# Optimizer ------------------------------------------------------------------------------


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak over `warmup_steps`, then cosine to the floor."""
    warmup = min(tc.warmup_steps, tc.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(tc.steps, warmup + 1),
        end_value=tc.learning_rate * tc.min_lr_ratio,
    )


def decay_mask(params: dict) -> dict:
    """True for parameters that get weight decay: every matrix, not the RMSNorm gains.

    The gains multiply normalised activations; decaying them towards 0 would shrink
    every block's input, which is why GPT-style and LLaMA recipes exempt them. The token
    embedding and the output projection are decayed like the other matrices (LLaMA's
    recipe; with tied embeddings they are one matrix).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", k)) for k in path), params
    )


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule and the decay mask."""
    adamw = optax.adamw(
        learning_rate_schedule(tc),
        b1=tc.b1,
        b2=tc.b2,
        eps=tc.eps,
        weight_decay=tc.weight_decay,
        mask=decay_mask,
    )
    if tc.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw)
    return adamw


# Loss and step --------------------------------------------------------------------------


def loss_sums(model: Transformer, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Weighted sum of next-token cross-entropies and the sum of weights, in float32.

    Args:
      model: the transformer.
      batch: "tokens", "targets" [B, T] int32 and "weights" [B, T] float32.
    Returns:
      (sum of weight * loss, sum of weight); their ratio is the mean loss. Sums, not the
      mean, so that micro-batches of different weight counts combine exactly.
    """
    logits = model(batch["tokens"])  # [B, T, V] float32
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum(losses * w), jnp.sum(w)


def loss_and_grads(
    graphdef, params: dict, batch: dict[str, jax.Array], frozen=None, dropout_key=None
):
    """Mean loss and its gradient over M micro-batches, accumulated with a scan.

    Args:
      graphdef: the model's nnx GraphDef (structure, remat policy, dtypes).
      params: the trained parameters as a nested dict of arrays.
      batch: "tokens", "targets", "weights" shaped [M, B / M, T].
      frozen: with LoRA, the frozen base (the rest of the model's state): used in the
        forward, never differentiated.
      dropout_key: with LoRA dropout, this update's key (each micro-batch folds in its
        index); None: no dropout.
    Returns:
      (loss, grads): the weighted mean over all M micro-batches and its gradient with
      respect to `params`.
    """

    def sums(p, mb, key):
        model = nnx.merge(graphdef, p) if frozen is None else nnx.merge(graphdef, p, frozen)
        if key is not None:
            lora.set_dropout_key(model, key)
        return loss_sums(model, mb)

    grad_fn = jax.value_and_grad(sums, has_aux=True)

    def body(acc, xs):
        mb, i = xs
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        (loss_sum, weight_sum), grads = grad_fn(params, mb, key)
        return jax.tree.map(jnp.add, acc, (loss_sum, weight_sum, grads)), None

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jax.tree.map(jnp.zeros_like, params))
    M = jax.tree.leaves(batch)[0].shape[0]
    (loss_sum, weight_sum, grads), _ = jax.lax.scan(body, init, (batch, jnp.arange(M)))
    weight_sum = jnp.maximum(weight_sum, 1.0)  # a batch of padding only gives 0, not NaN
    return loss_sum / weight_sum, jax.tree.map(lambda g: g / weight_sum, grads)


def train_step(
    graphdef,
    tx: optax.GradientTransformation,
    params,
    opt_state,
    batch,
    frozen=None,
    dropout_key=None,
):
    """One optimizer update; pure, so it can be jitted, sharded and donated.

    With LoRA, `params` are the adapters and `frozen` the base (see `loss_and_grads`).

    Returns:
      (new params, new optimizer state, {"loss", "grad_norm"}); grad_norm is measured
      before clipping.
    """
    loss, grads = loss_and_grads(graphdef, params, batch, frozen, dropout_key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def training_config(cfg: LlamaConfig, tc: TrainConfig) -> LlamaConfig:
    """The model config as trained: float32 master weights, matmuls in tc.compute_dtype.

    With LoRA the frozen base keeps `cfg.param_dtype` (bfloat16 halves its memory; with
    `tc.base_quantization` "int8" that is the dtype of its embeddings and norms only); the
    adapters, the only weights updated, are float32.
    """
    if tc.lora_rank:
        return cfg.replace(dtype=tc.compute_dtype)
    return cfg.replace(param_dtype="float32", dtype=tc.compute_dtype)


class Trainer:
    """The jitted, sharded train and eval steps of one model config on one mesh.

    Without LoRA the trained parameters are the whole model. With `tc.lora_rank > 0` they
    are the adapters only (`lora.LoRAParam` leaves): the frozen base is held by the
    trainer (`set_base`), passed to every step as a read-only input, and is neither
    differentiated nor tracked by the optimizer; checkpoints then hold adapters only.

    Args:
      cfg: the model architecture (dtypes are replaced by `training_config`).
      tc: the training hyper-parameters.
      mesh: a jax Mesh with axes data/fsdp/tensor, or None for one device.
    """

    def __init__(self, cfg: LlamaConfig, tc: TrainConfig, mesh=None):
        self.cfg = training_config(cfg, tc)
        self.tc = tc
        self.lora = tc.lora_rank > 0
        # The trainer owns its arrays from creation on, so it runs on Auto axes whatever
        # the mesh's types: with JAX's default Explicit axes the cross-entropy's gather
        # from vocab-split logits has no unambiguous output sharding.
        mesh = None if mesh is None else sharding.auto_mesh(mesh)
        self.mesh = mesh
        self.tx = make_optimizer(tc)
        self.schedule = learning_rate_schedule(tc)
        abstract = nnx.eval_shape(self._create)
        if self.lora:
            self.graphdef, adapters, base = nnx.split(abstract, lora.LoRAParam, ...)
            self.abstract_params = nnx.to_pure_dict(adapters)
            self.abstract_frozen = nnx.to_pure_dict(base)
        else:
            self.graphdef, abstract_state = nnx.split(abstract)
            self.abstract_params = nnx.to_pure_dict(abstract_state)
            self.abstract_frozen = None
        self.frozen = None  # the LoRA base, once set_base has placed it
        self.abstract_opt_state = jax.eval_shape(self.tx.init, self.abstract_params)
        if mesh is None:
            self.param_shardings = self.opt_shardings = self.batch_sharding = None
            self.eval_sharding = self.frozen_shardings = None
            self._step = jax.jit(self._train_step, donate_argnums=(0, 1))
            self._eval = jax.jit(self._eval_sums)
            return
        self._check_mesh(mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.param_shardings = sharding.param_shardings(self.abstract_params, mesh)
        self.frozen_shardings = None
        if self.lora:
            self.frozen_shardings = sharding.param_shardings(self.abstract_frozen, mesh)
        self.opt_shardings = optax.tree_map_params(
            self.tx,
            lambda _, s: s,
            self.abstract_opt_state,
            self.param_shardings,
            transform_non_params=lambda _: replicated,
        )
        # Batches are [M micro-batches, rows, T]: rows split as the rules table says.
        self.batch_sharding = sharding.logical_sharding(mesh, (None, *sharding.BATCH_AXES))
        eval_sharding = sharding.logical_sharding(mesh, sharding.BATCH_AXES)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(
                self.param_shardings,
                self.opt_shardings,
                self.batch_sharding,
                self.frozen_shardings,
                replicated,
            ),
            out_shardings=(self.param_shardings, self.opt_shardings, replicated),
            donate_argnums=(0, 1),
        )
        self.eval_sharding = eval_sharding
        self._eval = jax.jit(
            self._eval_sums,
            in_shardings=(self.param_shardings, eval_sharding, self.frozen_shardings),
            out_shardings=replicated,
        )

    def _create(self, seed: int | None = None) -> Transformer:
        """The model as trained (adapted when LoRA is on); seed: its initial weights."""
        tc = self.tc
        seed = tc.seed if seed is None else seed
        model = CompiledTransformer(
            self.cfg, rngs=nnx.Rngs(seed), remat=tc.remat, attention=tc.attention
        )
        if tc.base_quantization is not None:
            # Before the adapters wrap them: each adapter's base is then an Int8Weight.
            from llama_jax.inference import int8

            int8.quantize(model, tc.base_quantization)
        if self.lora:
            lora.apply_lora(
                model, tc.lora_targets, tc.lora_rank, tc.lora_alpha, tc.lora_dropout, seed=seed
            )
        return model

    def _check_mesh(self, mesh) -> None:
        sharding.validate(self.cfg, mesh)
        micro = self.tc.batch_size // self.tc.micro_batches
        what = (
            f"Each micro-batch (batch size {self.tc.batch_size} / {self.tc.micro_batches} "
            "micro-batches; see --batch-size, --micro-batches, --mesh)"
        )
        sharding.check_batch(mesh, micro, what)

    def _train_step(self, params, opt_state, batch, frozen, step):
        key = None
        if self.lora and self.tc.lora_dropout > 0:
            # A pure function of (seed, step), like the data order: resuming is exact.
            key = jax.random.fold_in(jax.random.key(self.tc.seed), step)
        return train_step(self.graphdef, self.tx, params, opt_state, batch, frozen, key)

    def _eval_sums(self, params, batch, frozen):
        return loss_sums(self._merge(params, frozen), batch)

    def _merge(self, params, frozen) -> Transformer:
        if frozen is None:
            return nnx.merge(self.graphdef, params)
        return nnx.merge(self.graphdef, params, frozen)

    def _in_mesh(self):
        # The model's `constrain` calls take effect only with the mesh in context.
        return sharding.use_mesh(self.mesh)

    def _need_base(self):
        if self.lora and self.frozen is None:
            raise LlamaError("A LoRA Trainer needs its frozen base first: call set_base().")
        return self.frozen

    # State ---------------------------------------------------------------------------

    def set_base(self, params: dict | None = None, seed: int | None = None) -> None:
        """With LoRA: place the frozen base model the adapters are trained on.

        Args:
          params: the base's weights as a plain Transformer's nested dict (e.g. from a
            converted checkpoint), any dtype and placement; they are cast to the config's
            param_dtype and placed on the mesh shard by shard. With
            `tc.base_quantization` "int8" the projections must be int8 already
            ({"values", "scale"}, as an int8 checkpoint holds them) and are kept as they
            are. None: random weights (quantized when the base is int8).
          seed: the seed of random base weights (default tc.seed).
        Raises:
          LlamaError: no LoRA, `params` not shaped like the model config, or float
            projections for an int8 base (or int8 ones for a float base).
        """
        if not self.lora:
            raise LlamaError("set_base is for LoRA runs (TrainConfig.lora_rank > 0).")
        if params is None:
            make = lambda: nnx.to_pure_dict(nnx.split(self._create(seed), lora.LoRAParam, ...)[2])
            self.frozen = jax.jit(make, out_shardings=self.frozen_shardings)()
            return
        self._check_base_quantization(params)
        params = lora.frozen_from_plain(params, self.abstract_frozen)
        self._check_shapes(self.abstract_frozen, params)
        if self.mesh is not None:
            params = jax.device_put(params, self.frozen_shardings)
        # Arrays already of the right dtype and placement are used as they are: the base
        # is the largest thing in memory and is never written, so it is not copied. Each
        # takes the model's dtype for it: param_dtype, or int8 values and float32 scales.
        self.frozen = jax.tree.map(
            lambda a, like: jnp.asarray(a, like.dtype), params, self.abstract_frozen
        )

    def _check_base_quantization(self, params: dict) -> None:
        # An int8 projection is a dict {"values", "scale"} where a float one is an array.
        try:
            wq = params["layers"][0]["attention"]["wq"]
        except (KeyError, IndexError, TypeError):
            return  # _check_shapes names the mismatch
        if isinstance(wq, dict) and "base" in wq:  # already in the adapted layout
            wq = wq["base"]
        given = "int8" if isinstance(wq, dict) and "values" in wq else None
        want = self.tc.base_quantization
        if given != want:
            raise LlamaError(
                f"The base weights are {given or 'float'} but the run's base is "
                f"{want or 'float'} (TrainConfig.base_quantization={want!r}); give the "
                "base the run was started with, or a new run directory."
            )

    def _check_shapes(self, abstract: dict, params: dict) -> None:
        want = jax.tree.map(lambda a: (a.shape,), abstract)
        got = jax.tree.map(lambda a: (tuple(a.shape),), params)
        if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
            raise LlamaError(
                "The initial weights do not match the model config "
                f"{self.cfg.name!r}; fine-tune with the config they were saved with."
            )

    def init_params(self, seed: int | None = None, params: dict | None = None) -> dict:
        """Float32 parameters placed on the mesh: random ones, or `params` (fine-tuning).

        Random weights are created directly on their shardings (a jit with out_shardings),
        and given ones are placed shard by shard, so no device holds the whole model.
        With LoRA the returned parameters are fresh adapters (B = 0), and the base is
        `params` (or random weights) placed by `set_base` unless one is set already.

        Args:
          seed: the initialisation seed (default tc.seed); ignored when `params` is given.
          params: a nested dict of arrays (numpy or jax, any dtype and placement) in the
            model's layout, e.g. from a converted checkpoint.
        Returns:
          The parameters as a nested dict of float32 jax Arrays.
        Raises:
          LlamaError: `params` does not have the model config's names and shapes.
        """
        if self.lora:
            if self.frozen is None or params is not None:
                self.set_base(params, seed)
            make = lambda: lora.lora_state(self._create(seed))
            return jax.jit(make, out_shardings=self.param_shardings)()
        if params is not None:
            self._check_shapes(self.abstract_params, params)
            if self.mesh is not None:
                params = jax.device_put(params, self.param_shardings)
            to_f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
            return jax.jit(to_f32, out_shardings=self.param_shardings)(params)

        make = lambda: nnx.to_pure_dict(nnx.state(self._create(seed)))
        return jax.jit(make, out_shardings=self.param_shardings)()

    def init_opt_state(self, params: dict):
        """A fresh optimizer state, sharded like the parameters it tracks."""
        return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)

    def put_batch(self, batch: dict[str, np.ndarray], sharding=None) -> dict[str, jax.Array]:
        """This host's rows of a global batch, as global arrays split over data x fsdp.

        Args:
          batch: {"tokens", "targets", "weights"} numpy arrays, [M, b, T] (this host's b
            rows of every micro-batch, from `TokenDataset.batch`).
          sharding: the sharding of the global arrays (default: the train batch's).
        Returns:
          The same dict of jax Arrays spanning every host.
        """
        sharding = sharding or self.batch_sharding
        if sharding is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def step(self, params, opt_state, batch: dict[str, jax.Array], step: int = 0):
        """Run one update; params and opt_state are donated, so use the returned ones.

        Args:
          params, opt_state: the current state (from init_params / init_opt_state).
          batch: the global batch from `put_batch`.
          step: the update's number; it seeds LoRA dropout (nothing else is random).
        Returns:
          (params, opt_state, {"loss", "grad_norm"} as device scalars).
        """
        frozen = self._need_base()
        with self._in_mesh():
            return self._step(params, opt_state, batch, frozen, jnp.asarray(step, jnp.int32))

    def evaluate(self, params, dataset: TokenDataset, seed: int = 0) -> float:
        """Mean loss over `eval_batches` fixed batches of `dataset` (the same rows each time).

        Args:
          params: the parameters.
          dataset: held-out rows.
          seed: picks the rows (fixed, so evaluations are comparable across steps).
        Returns:
          The weighted mean cross-entropy in nats per token, a Python float.
        """
        sharding = None
        if self.mesh is not None:
            sharding = self.eval_sharding
        total = weight = 0.0
        for i in range(self.tc.eval_batches):
            b = dataset.batch(
                i, self.tc.batch_size, seed, 1, jax.process_index(), jax.process_count()
            )
            b = self.put_batch({k: v[0] for k, v in b.items()}, sharding)
            with self._in_mesh():
                s, n = self._eval(params, b, self._need_base())
            total, weight = total + float(s), weight + float(n)
        return total / max(weight, 1.0)

    def model(self, params: dict, remat: str = "none") -> Transformer:
        """An nnx Transformer holding `params` (for generation or saving).

        Args:
          params: parameters from training (they are shared, not copied).
          remat: the returned model's rematerialisation policy (none for inference).
        Returns:
          The Transformer; its config has float32 weights (with LoRA: the base's dtype
          and float32 adapters) and tc.compute_dtype matmuls. With LoRA the model is
          adapted (`lora.merge` folds the adapters in).
        """
        model = self._merge(params, self._need_base())
        model.remat = remat
        return model

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of {"params", "opt_state"}, for restoring."""

        def spec(a, s=None):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

        if self.mesh is None:
            return {
                "params": jax.tree.map(spec, self.abstract_params),
                "opt_state": jax.tree.map(spec, self.abstract_opt_state),
            }
        return {
            "params": jax.tree.map(spec, self.abstract_params, self.param_shardings),
            "opt_state": jax.tree.map(spec, self.abstract_opt_state, self.opt_shardings),
        }
