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
import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import sharding
from llama_jax.config import DTYPES, LlamaConfig
from llama_jax.data import TokenDataset
from llama_jax.errors import LlamaError
from llama_jax.model import REMAT_POLICIES, Transformer


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
    seed: int = 0  # initial weights (when not fine-tuning) and data order
    eval_every: int = 100  # steps between held-out evaluations; 0: only at start and end
    eval_batches: int = 4  # batches of B rows per evaluation (always the same rows)
    save_every: int = 100  # steps between checkpoints; 0: only at the end
    keep: int = 3  # checkpoints kept
    log_every: int = 10  # steps between metric lines

    def __post_init__(self):
        for name in ("steps", "batch_size", "micro_batches", "seq_len", "eval_batches", "keep",
                     "log_every"):  # fmt: skip
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
        learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
        weight_decay=tc.weight_decay, mask=decay_mask,
    )  # fmt: skip
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


def loss_and_grads(graphdef, params: dict, batch: dict[str, jax.Array]):
    """Mean loss and its gradient over M micro-batches, accumulated with a scan.

    Args:
      graphdef: the model's nnx GraphDef (structure, remat policy, dtypes).
      params: the parameters as a nested dict of arrays.
      batch: "tokens", "targets", "weights" shaped [M, B / M, T].
    Returns:
      (loss, grads): the weighted mean over all M micro-batches and its gradient.
    """

    def sums(p, mb):
        return loss_sums(nnx.merge(graphdef, p), mb)

    grad_fn = jax.value_and_grad(sums, has_aux=True)

    def body(acc, mb):
        (loss_sum, weight_sum), grads = grad_fn(params, mb)
        return jax.tree.map(jnp.add, acc, (loss_sum, weight_sum, grads)), None

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jax.tree.map(jnp.zeros_like, params))
    (loss_sum, weight_sum, grads), _ = jax.lax.scan(body, init, batch)
    weight_sum = jnp.maximum(weight_sum, 1.0)  # a batch of padding only gives 0, not NaN
    return loss_sum / weight_sum, jax.tree.map(lambda g: g / weight_sum, grads)


def train_step(graphdef, tx: optax.GradientTransformation, params, opt_state, batch):
    """One optimizer update; pure, so it can be jitted, sharded and donated.

    Returns:
      (new params, new optimizer state, {"loss", "grad_norm"}); grad_norm is measured
      before clipping.
    """
    loss, grads = loss_and_grads(graphdef, params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def training_config(cfg: LlamaConfig, tc: TrainConfig) -> LlamaConfig:
    """The model config as trained: float32 master weights, matmuls in tc.compute_dtype."""
    return cfg.replace(param_dtype="float32", dtype=tc.compute_dtype)


class Trainer:
    """The jitted, sharded train and eval steps of one model config on one mesh.

    Args:
      cfg: the model architecture (dtypes are replaced by `training_config`).
      tc: the training hyper-parameters.
      mesh: a jax Mesh with axes data/fsdp/tensor, or None for one device.
    """

    def __init__(self, cfg: LlamaConfig, tc: TrainConfig, mesh=None):
        self.cfg = training_config(cfg, tc)
        self.tc = tc
        # The trainer owns its arrays from creation on, so it runs on Auto axes whatever
        # the mesh's types: with JAX's default Explicit axes the cross-entropy's gather
        # from vocab-split logits has no unambiguous output sharding.
        mesh = None if mesh is None else sharding.auto_mesh(mesh)
        self.mesh = mesh
        self.tx = make_optimizer(tc)
        self.schedule = learning_rate_schedule(tc)
        abstract = nnx.eval_shape(lambda: Transformer(self.cfg, rngs=nnx.Rngs(0), remat=tc.remat))
        self.graphdef, abstract_state = nnx.split(abstract)
        self.abstract_params = nnx.to_pure_dict(abstract_state)
        self.abstract_opt_state = jax.eval_shape(self.tx.init, self.abstract_params)
        if mesh is None:
            self.param_shardings = self.opt_shardings = self.batch_sharding = None
            self._step = jax.jit(self._train_step, donate_argnums=(0, 1))
            self._eval = jax.jit(self._eval_sums)
            return
        self._check_mesh(mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.param_shardings = sharding.param_shardings(self.abstract_params, mesh)
        self.opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, self.abstract_opt_state, self.param_shardings,
            transform_non_params=lambda _: replicated,
        )  # fmt: skip
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
        eval_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding),
            out_shardings=(self.param_shardings, self.opt_shardings, replicated),
            donate_argnums=(0, 1),
        )
        self._eval = jax.jit(
            self._eval_sums, in_shardings=(self.param_shardings, eval_sharding),
            out_shardings=replicated,
        )  # fmt: skip

    def _check_mesh(self, mesh) -> None:
        sharding.validate(self.cfg, mesh)
        split = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        micro = self.tc.batch_size // self.tc.micro_batches
        if micro % split:
            raise LlamaError(
                f"Each micro-batch has {micro} rows (batch size {self.tc.batch_size} / "
                f"{self.tc.micro_batches} micro-batches), which the mesh's data x fsdp = {split} "
                "devices cannot split evenly; change --batch-size, --micro-batches or --mesh."
            )

    def _train_step(self, params, opt_state, batch):
        return train_step(self.graphdef, self.tx, params, opt_state, batch)

    def _eval_sums(self, params, batch):
        return loss_sums(nnx.merge(self.graphdef, params), batch)

    def _in_mesh(self):
        # The model's `constrain` calls take effect only with the mesh in context.
        return sharding.use_mesh(self.mesh)

    # State ---------------------------------------------------------------------------

    def init_params(self, seed: int | None = None, params: dict | None = None) -> dict:
        """Float32 parameters placed on the mesh: random ones, or `params` (fine-tuning).

        Random weights are created directly on their shardings (a jit with out_shardings),
        and given ones are placed shard by shard, so no device holds the whole model.

        Args:
          seed: the initialisation seed (default tc.seed); ignored when `params` is given.
          params: a nested dict of arrays (numpy or jax, any dtype and placement) in the
            model's layout, e.g. from a converted checkpoint.
        Returns:
          The parameters as a nested dict of float32 jax Arrays.
        Raises:
          LlamaError: `params` does not have the model config's names and shapes.
        """
        if params is not None:
            want = jax.tree.map(lambda a: (a.shape,), self.abstract_params)
            got = jax.tree.map(lambda a: (tuple(a.shape),), params)
            if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
                raise LlamaError(
                    "The initial weights do not match the model config "
                    f"{self.cfg.name!r}; fine-tune with the config they were saved with."
                )
            if self.mesh is not None:
                params = jax.device_put(params, self.param_shardings)
            to_f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
            return jax.jit(to_f32, out_shardings=self.param_shardings)(params)

        seed = self.tc.seed if seed is None else seed
        make = lambda: nnx.to_pure_dict(
            nnx.state(Transformer(self.cfg, rngs=nnx.Rngs(seed), remat=self.tc.remat))
        )
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

    def step(self, params, opt_state, batch: dict[str, jax.Array]):
        """Run one update; params and opt_state are donated, so use the returned ones.

        Args:
          params, opt_state: the current state (from init_params / init_opt_state).
          batch: the global batch from `put_batch`.
        Returns:
          (params, opt_state, {"loss", "grad_norm"} as device scalars).
        """
        with self._in_mesh():
            return self._step(params, opt_state, batch)

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
            sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        total = weight = 0.0
        for i in range(self.tc.eval_batches):
            b = dataset.batch(i, self.tc.batch_size, seed, 1, jax.process_index(),
                              jax.process_count())  # fmt: skip
            b = self.put_batch({k: v[0] for k, v in b.items()}, sharding)
            with self._in_mesh():
                s, n = self._eval(params, b)
            total, weight = total + float(s), weight + float(n)
        return total / max(weight, 1.0)

    def model(self, params: dict, remat: str = "none") -> Transformer:
        """An nnx Transformer holding `params` (for generation or saving).

        Args:
          params: parameters from training (they are shared, not copied).
          remat: the returned model's rematerialisation policy (none for inference).
        Returns:
          The Transformer; its config has float32 weights and tc.compute_dtype matmuls.
        """
        model = nnx.merge(self.graphdef, params)
        model.remat = remat
        return model

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of {"params", "opt_state"}, for restoring."""

        def spec(a, s=None):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

        if self.mesh is None:
            return {"params": jax.tree.map(spec, self.abstract_params),
                    "opt_state": jax.tree.map(spec, self.abstract_opt_state)}  # fmt: skip
        return {
            "params": jax.tree.map(spec, self.abstract_params, self.param_shardings),
            "opt_state": jax.tree.map(spec, self.abstract_opt_state, self.opt_shardings),
        }


# Throughput ----------------------------------------------------------------------------

# Dense bfloat16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}

_measured_peak: dict[str, float] = {}


def peak_flops(device=None) -> float:
    """Peak FLOP/s of one device: the data-sheet figure, or for CPUs a measured one.

    A CPU has no single published figure, so its peak is measured once as the best of a
    few float32 1024^3 matmuls on that device; CPU MFU is relative to that.
    """
    device = device or jax.devices()[0]
    for name, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(name):
            return flops
    key = device.device_kind
    if key not in _measured_peak:
        a = jax.device_put(jnp.ones((1024, 1024), jnp.float32), device)
        mm = jax.jit(lambda x: x @ x)
        mm(a).block_until_ready()
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            mm(a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        _measured_peak[key] = 2 * 1024**3 / best
    return _measured_peak[key]


def model_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x the forward (the backward pass costs two forwards).

    Recomputation from rematerialisation is not counted: MFU measures useful work.
    """
    return 3 * cfg.flops_per_token(seq_len)


# Checkpoints -----------------------------------------------------------------------------


def checkpoint_manager(directory: str | Path, tc: TrainConfig):
    """An Orbax CheckpointManager: async saves every `save_every` steps, keep `keep`."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=tc.keep,
        save_interval_steps=tc.save_every or tc.steps,
        enable_async_checkpointing=True,
        create=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_names=("state", "meta"))  # fmt: skip


def _save(manager, step: int, params, opt_state, meta: dict, force: bool = False) -> bool:
    import orbax.checkpoint as ocp

    args = ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
        meta=ocp.args.JsonSave(meta),
    )
    return manager.save(step, args=args, force=force)


def _restore(manager, step: int, trainer: Trainer):
    import orbax.checkpoint as ocp

    out = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(trainer.abstract_state()), meta=ocp.args.JsonRestore()
        ),
    )
    return out["state"]["params"], out["state"]["opt_state"], out["meta"]


def read_checkpoint_meta(directory: str | Path, step: int | None = None) -> dict | None:
    """The JSON metadata of a training checkpoint (latest step by default), or None."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not directory.is_dir():
        return None
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, item_names=("state", "meta"), options=options) as m:
        step = m.latest_step() if step is None else step
        if step is None:
            return None
        return m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


# The loop --------------------------------------------------------------------------------

# Fields that fix the trajectory of a run: resuming with any of them changed would not
# continue the same run.
_RESUME_KEYS = ("batch_size", "seq_len", "seed", "micro_batches")


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
      params: the final parameters (float32, on the mesh).
      trainer: the Trainer (its `model(params)` gives an nnx model).
      start_step: the step the run started or resumed from.
      step: the last step completed.
      losses: {step: training loss} of the steps run in this call.
      eval_losses: {step: held-out loss} of the evaluations run in this call.
      preempted: True if a SIGTERM stopped the run early (after saving).
    """

    params: dict
    trainer: Trainer
    start_step: int
    step: int
    losses: dict[int, float]
    eval_losses: dict[int, float]
    preempted: bool = False


def _check_resume(meta: dict, cfg: LlamaConfig, tc: TrainConfig, data_fp: str, where) -> None:
    saved_cfg = LlamaConfig.from_dict(meta["model_config"]).replace(name=cfg.name)
    if saved_cfg != cfg.replace(name=cfg.name):
        diff = {
            k: (v, getattr(cfg, k)) for k, v in dataclasses.asdict(saved_cfg).items()
            if getattr(cfg, k) != getattr(saved_cfg, k)
        }  # fmt: skip
        raise LlamaError(
            f"The checkpoint in {where} was trained with a different model config "
            f"(field: (saved, now) = {diff}); use the same config to resume, or a new --out."
        )
    for key in _RESUME_KEYS:
        if meta["train_config"][key] != getattr(tc, key):
            raise LlamaError(
                f"The checkpoint in {where} was trained with {key}={meta['train_config'][key]}, "
                f"this run asks for {getattr(tc, key)}; resume with the same value or use a "
                "new --out."
            )
    if meta["data"]["fingerprint"] != data_fp:
        raise LlamaError(
            f"The training data differ from those of the checkpoint in {where}; resuming would "
            "not continue the same run. Use the same data (and tokenizer) or a new --out."
        )


def train(
    cfg: LlamaConfig,
    tc: TrainConfig,
    train_data: TokenDataset,
    out_dir: str | Path,
    eval_data: TokenDataset | None = None,
    *,
    init_params: dict | None = None,
    mesh=None,
    on_step: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or resume training) and checkpoint to `out_dir`.

    Args:
      cfg: model architecture.
      tc: hyper-parameters.
      train_data: rows of length tc.seq_len + 1 (see data.py).
      out_dir: the run's directory: checkpoints/ (Orbax) and metrics.jsonl. If it holds a
        checkpoint, the run resumes from the latest one.
      eval_data: held-out rows, evaluated every tc.eval_every steps and at the end.
      init_params: starting weights (fine-tuning) instead of random ones.
      mesh: a Mesh with axes data/fsdp/tensor, or None for one device.
      on_step: called as on_step(step, metrics) after every logged step (every
        tc.log_every steps; metrics hold python floats); for notebooks and tests.
      progress: show a tqdm progress bar.
      log: where one-line messages go.
    Returns:
      A TrainResult.
    Raises:
      LlamaError: seq_len above the model's context, data of the wrong length, a mesh that
        cannot split the batch, or a checkpoint in out_dir from another config or data.
    """
    if tc.seq_len > cfg.max_seq_len:
        raise LlamaError(
            f"--seq-len {tc.seq_len} is longer than the model's context "
            f"max_seq_len={cfg.max_seq_len}; lower it."
        )
    for name, ds in (("training", train_data), ("evaluation", eval_data)):
        if ds is not None and ds.seq_len != tc.seq_len:
            raise LlamaError(
                f"The {name} data have rows of {ds.seq_len} tokens, the run trains {tc.seq_len}."
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, tc, mesh)
    cfg = trainer.cfg
    lead = jax.process_index() == 0
    say = log if lead else (lambda _msg: None)
    data_fp = train_data.fingerprint()
    meta = {
        "model_config": cfg.to_dict(),
        "train_config": tc.to_dict(),
        "data": {"seed": tc.seed, "fingerprint": data_fp, "rows": len(train_data)},
    }

    manager = checkpoint_manager(out_dir / "checkpoints", tc)
    latest = manager.latest_step()
    if latest is not None:
        saved = manager.restore(latest, args=_meta_only())["meta"]
        _check_resume(saved, cfg, tc, data_fp, out_dir / "checkpoints")
        params, opt_state, _ = _restore(manager, latest, trainer)
        start = latest
        say(f"resumed from step {start} ({out_dir / 'checkpoints'})")
    else:
        params = trainer.init_params(params=init_params)
        opt_state = trainer.init_opt_state(params)
        start = 0

    stop = {"sigterm": False}

    def on_sigterm(signum, frame):
        stop["sigterm"] = True

    installed = True
    try:
        previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: signals cannot be caught here
        installed = False
    metrics_file = open(out_dir / "metrics.jsonl", "a") if lead else None

    def record(entry: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}

    def evaluate(step: int) -> None:
        if eval_data is None:
            return
        value = trainer.evaluate(params, eval_data)
        eval_losses[step] = value
        record({"step": step, "eval_loss": value})
        say(f"step {step}: held-out loss {value:.4f}")

    if start == 0:
        evaluate(0)

    tokens_per_step = tc.batch_size * tc.seq_len
    flops_per_step = model_flops_per_token(cfg, tc.seq_len) * tokens_per_step
    # A CPU's measured peak is the whole host's (its matmul uses every core), however many
    # devices the host is split into; accelerators' peaks are per chip.
    n_devices = 1 if mesh is None else mesh.devices.size
    peak = peak_flops() * (1 if jax.devices()[0].platform == "cpu" else n_devices)
    bar = None
    if progress and lead:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="training", unit="step")

    step = start
    window_start, window_steps = None, 0
    try:
        for step in range(start + 1, tc.steps + 1):
            host_batch = train_data.batch(
                step - 1, tc.batch_size, tc.seed, tc.micro_batches,
                jax.process_index(), jax.process_count(),
            )  # fmt: skip
            params, opt_state, m = trainer.step(params, opt_state, trainer.put_batch(host_batch))
            window_steps += 1
            if window_start is None:
                # The first step includes compilation: time from its end on.
                jax.block_until_ready(m)
                window_start, window_steps = time.perf_counter(), 0
            if step % tc.log_every == 0 or step == tc.steps:
                m = {k: float(v) for k, v in m.items()}
                now = time.perf_counter()
                rate = tokens_per_step * window_steps / (now - window_start) if window_steps else 0
                entry = {
                    "step": step, "loss": m["loss"], "lr": float(trainer.schedule(step - 1)),
                    "grad_norm": m["grad_norm"], "tokens_per_s": rate,
                    "mfu": rate / tokens_per_step * flops_per_step / peak,
                }  # fmt: skip
                record(entry)
                losses[step] = m["loss"]
                window_start, window_steps = now, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{entry['lr']:.2e}")
                if on_step is not None:
                    on_step(step, entry)
            if bar is not None:
                bar.update(1)
            if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                evaluate(step)
            _save(manager, step, params, opt_state, {**meta, "step": step})
            if stop["sigterm"]:
                if manager.latest_step() != step:
                    _save(manager, step, params, opt_state, {**meta, "step": step}, force=True)
                say(f"SIGTERM: saved step {step}; run the same command again to resume")
                break
        else:
            evaluate(tc.steps)
            if manager.latest_step() != tc.steps and start < tc.steps:
                _save(manager, tc.steps, params, opt_state, {**meta, "step": tc.steps},
                      force=True)  # fmt: skip
        manager.wait_until_finished()
    finally:
        if bar is not None:
            bar.close()
        manager.close()
        if metrics_file is not None:
            metrics_file.close()
        if installed:
            signal.signal(signal.SIGTERM, previous_handler or signal.SIG_DFL)
    return TrainResult(params, trainer, start, step, losses, eval_losses, stop["sigterm"])


def _meta_only():
    import orbax.checkpoint as ocp

    return ocp.args.Composite(meta=ocp.args.JsonRestore())


# The command ----------------------------------------------------------------------------


def add_arguments(p) -> None:
    """Flags of `llama-jax train`."""
    from llama_jax.sharding import add_mesh_argument

    d = TrainConfig()
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="training text: .txt/.jsonl files or directories (JSONL 'text' field; "
        "for --task sft, prompt/response or messages records)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="run directory: checkpoints/, metrics.jsonl, "
        "model/ (a llama-jax checkpoint of the final weights); reused to resume",
    )
    p.add_argument(
        "--task",
        choices=("pretrain", "sft"),
        default="pretrain",
        help="pretrain: pack documents; sft: loss on responses only",
    )
    p.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out data")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.05,
        help="without --eval-data, hold out this fraction of the documents",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset", default=None, help="train from scratch with this preset (default: tiny)"
    )
    src.add_argument(
        "--init",
        metavar="CKPT",
        help="fine-tune from a llama-jax checkpoint (from `llama-jax convert`)",
    )
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --init)")
    for flag, field, kind in [
        ("--steps", "steps", int),
        ("--batch-size", "batch_size", int),
        ("--micro-batches", "micro_batches", int),
        ("--seq-len", "seq_len", int),
        ("--lr", "learning_rate", float),
        ("--warmup", "warmup_steps", int),
        ("--min-lr-ratio", "min_lr_ratio", float),
        ("--weight-decay", "weight_decay", float),
        ("--clip", "clip_norm", float),
        ("--seed", "seed", int),
        ("--eval-every", "eval_every", int),
        ("--eval-batches", "eval_batches", int),
        ("--save-every", "save_every", int),
        ("--keep", "keep", int),
        ("--log-every", "log_every", int),
    ]:
        p.add_argument(
            flag,
            dest=field,
            type=kind,
            default=getattr(d, field),
            help=f"default {getattr(d, field)}",
        )
    p.add_argument(
        "--dtype",
        dest="compute_dtype",
        default=d.compute_dtype,
        choices=DTYPES,
        help="matmul dtype (weights and optimizer state stay float32)",
    )
    p.add_argument(
        "--remat",
        default=d.remat,
        choices=sorted(REMAT_POLICIES),
        help="rematerialisation policy of the layer scan",
    )
    add_mesh_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # fmt: skip


def read_data(args, seed: int):
    """(train, eval) raw documents or SFT examples from --data/--eval-data/--task.

    Read before anything else is loaded, so a wrong path or an empty corpus fails first.
    """
    from llama_jax import data

    read = data.read_sft_examples if args.task == "sft" else data.read_documents
    train_items = read(args.data)
    if args.eval_data:
        return train_items, read(args.eval_data)
    if args.eval_fraction > 0 and len(train_items) > 1:
        idx = list(range(len(train_items)))
        train_idx, eval_idx = data.split_documents(idx, args.eval_fraction, seed)
        return [train_items[i] for i in train_idx], [train_items[i] for i in eval_idx]
    return train_items, None


def tokenize_data(args, items, tokenizer, seq_len: int, what: str):
    """A TokenDataset from `read_data` output: packed documents or masked SFT rows."""
    from llama_jax import data

    if args.task == "sft":
        return data.tokenize_sft(items, tokenizer, seq_len)
    try:
        return data.pack_documents(items, tokenizer, seq_len, progress=not args.no_progress)
    except LlamaError as e:
        raise LlamaError(f"{what} data: {e}") from None


def run(args) -> int:
    """`llama-jax train`: train or fine-tune, resumably; exit 0 when done, 143 on SIGTERM."""
    from llama_jax import checkpoint
    from llama_jax.config import get_preset
    from llama_jax.sharding import describe_mesh, make_mesh
    from llama_jax.tokenizer import Tokenizer

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    train_items, eval_items = read_data(args, tc.seed)
    init_params = None
    if args.init:
        cfg = checkpoint.load_config(args.init)
        tok_path = args.tokenizer or str(Path(args.init) / "tokenizer.model")
    else:
        cfg = get_preset(args.preset or "tiny")
        tok_path = args.tokenizer
    if tok_path is None:
        raise LlamaError("--tokenizer is required when training from a preset.")
    if tc.seq_len > cfg.max_seq_len:
        raise LlamaError(
            f"--seq-len {tc.seq_len} is longer than the model's context "
            f"max_seq_len={cfg.max_seq_len}; lower it."
        )
    tokenizer = Tokenizer.load(tok_path)
    if not args.init and tokenizer.vocab_size != cfg.vocab_size:
        # A model trained from scratch takes its vocabulary from its tokenizer.
        print(f"vocab_size {cfg.vocab_size} -> {tokenizer.vocab_size} (the tokenizer's)")
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LlamaError(
            f"The tokenizer {tok_path} has {tokenizer.vocab_size} ids but the model's "
            f"vocab_size is {cfg.vocab_size}; use a matching tokenizer or preset."
        )
    train_ds = tokenize_data(args, train_items, tokenizer, tc.seq_len, "The training")
    eval_ds = None
    if eval_items:
        eval_ds = tokenize_data(args, eval_items, tokenizer, tc.seq_len, "The held-out")
    mesh = make_mesh(args.mesh)
    print(f"{cfg.name}: {cfg.num_params():,} parameters; {describe_mesh(mesh)}; "
          f"{len(train_ds)} training rows of {tc.seq_len} tokens")  # fmt: skip
    if args.init and read_checkpoint_meta(Path(args.out) / "checkpoints") is None:
        model = checkpoint.load(args.init, mesh=mesh, dtype="float32")
        init_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    result = train(cfg, tc, train_ds, args.out, eval_ds, init_params=init_params, mesh=mesh,
                   progress=not args.no_progress)  # fmt: skip
    if result.preempted:
        return 143
    model_dir = Path(args.out) / "model"
    model = result.trainer.model(result.params)
    checkpoint.save(model, model_dir, tokenizer=tok_path, force=True)
    print(f"final weights: {model_dir} (llama-jax checkpoint; `llama-jax export` converts it)")
    return 0
