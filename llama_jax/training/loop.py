"""The training loop: `train()` runs, evaluates, checkpoints and resumes a run."""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax

from llama_jax.config import LlamaConfig
from llama_jax.errors import LlamaError
from llama_jax.perf import model_flops_per_token, peak_flops
from llama_jax.training.checkpoints import checkpoint_manager, restore_newest_intact, save_step
from llama_jax.training.data import TokenDataset
from llama_jax.training.step import TrainConfig, Trainer

# Fields that fix the trajectory of a run: resuming with any of them changed would not
# continue the same run.
_RESUME_KEYS = (
    "batch_size",
    "seq_len",
    "seed",
    "micro_batches",
    "lora_rank",
    "lora_targets",
    "base_quantization",
)


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
      params: the final parameters (float32, on the mesh; with LoRA the adapters).
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
            k: (v, getattr(cfg, k))
            for k, v in dataclasses.asdict(saved_cfg).items()
            if getattr(cfg, k) != getattr(saved_cfg, k)
        }
        raise LlamaError(
            f"The checkpoint in {where} was trained with a different model config "
            f"(field: (saved, now) = {diff}); use the same config to resume, or a new --out."
        )
    default = TrainConfig()
    for key in _RESUME_KEYS:
        # Lists in JSON, tuples in the config; runs saved before a key existed had its default.
        saved = meta["train_config"].get(key, getattr(default, key))
        saved = tuple(saved) if isinstance(saved, list) else saved
        if saved != getattr(tc, key):
            raise LlamaError(
                f"The checkpoint in {where} was trained with {key}={saved}, "
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
    extra_meta: dict | None = None,
) -> TrainResult:
    """Train (or resume training) and checkpoint to `out_dir`.

    Args:
      cfg: model architecture.
      tc: hyper-parameters.
      train_data: rows of length tc.seq_len + 1 (see data.py).
      out_dir: the run's directory: checkpoints/ (Orbax) and metrics.jsonl. If it holds a
        checkpoint, the run resumes from the latest one.
      eval_data: held-out rows, evaluated every tc.eval_every steps and at the end.
      init_params: starting weights (fine-tuning) instead of random ones. With LoRA
        (tc.lora_rank > 0) they are the frozen base, needed again when resuming, since
        the run's checkpoints hold the adapters only; None: a random base.
      mesh: a Mesh with axes data/fsdp/tensor, or None for one device.
      on_step: called as on_step(step, metrics) after every logged step (every
        tc.log_every steps; metrics hold python floats); for notebooks and tests.
      progress: show a tqdm progress bar.
      log: where one-line messages go.
      extra_meta: JSON-ready entries added to every checkpoint's metadata (the CLI
        records the LoRA base checkpoint's path there).
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
        **(extra_meta or {}),
    }

    manager = checkpoint_manager(out_dir / "checkpoints", tc)
    if trainer.lora:
        trainer.set_base(init_params)
        init_params = None  # the base is set; init_params gives fresh adapters
    check = lambda saved: _check_resume(saved, cfg, tc, data_fp, out_dir / "checkpoints")
    resumed = restore_newest_intact(manager, trainer, check, log)
    if resumed is not None:
        start, params, opt_state = resumed
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
                step - 1,
                tc.batch_size,
                tc.seed,
                tc.micro_batches,
                jax.process_index(),
                jax.process_count(),
            )
            batch = trainer.put_batch(host_batch)
            params, opt_state, m = trainer.step(params, opt_state, batch, step)
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
                    "step": step,
                    "loss": m["loss"],
                    "lr": float(trainer.schedule(step - 1)),
                    "grad_norm": m["grad_norm"],
                    "tokens_per_s": rate,
                    "mfu": rate / tokens_per_step * flops_per_step / peak,
                }
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
            save_step(manager, step, params, opt_state, {**meta, "step": step})
            if stop["sigterm"]:
                if manager.latest_step() != step:
                    save_step(manager, step, params, opt_state, {**meta, "step": step}, force=True)
                say(f"SIGTERM: saved step {step}; run the same command again to resume")
                break
        else:
            evaluate(tc.steps)
            if manager.latest_step() != tc.steps and start < tc.steps:
                save_step(
                    manager, tc.steps, params, opt_state, {**meta, "step": tc.steps}, force=True
                )
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
