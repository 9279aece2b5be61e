"""Run checkpoints: an Orbax CheckpointManager holding params, optimizer state and metadata."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax

from llama_jax.errors import LlamaError
from llama_jax.training.step import TrainConfig, Trainer


def checkpoint_manager(directory: str | Path, tc: TrainConfig):
    """An Orbax CheckpointManager: async saves every `save_every` steps, keep `keep`."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=tc.keep,
        save_interval_steps=tc.save_every or tc.steps,
        enable_async_checkpointing=True,
        create=True,
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_names=("state", "meta")
    )


def save_step(manager, step: int, params, opt_state, meta: dict, force: bool = False) -> bool:
    import orbax.checkpoint as ocp

    args = ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
        meta=ocp.args.JsonSave(meta),
    )
    return manager.save(step, args=args, force=force)


def restore_step(manager, step: int, trainer: Trainer):
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


def meta_args():
    import orbax.checkpoint as ocp

    return ocp.args.Composite(meta=ocp.args.JsonRestore())


def restore_newest_intact(manager, trainer: Trainer, check: Callable[[dict], None], say):
    """Restore the newest step that reads back whole; set damaged newer steps aside.

    A run killed mid-save, a full disk or a deleted file can leave the newest step
    unreadable. Each damaged step is moved, untouched, to `damaged/<step>` beside the
    checkpoints directory (so the manager's later saves do not collide with it) and the
    next older step is tried. With several processes the damaged step is skipped but
    left in place (no process may move files the others are reading).

    Args:
      manager: the run's CheckpointManager.
      trainer: gives the restore target (shapes, dtypes, shardings).
      check: called with a step's metadata before its arrays are read; raises a
        LlamaError when the step belongs to another run (that is not damage).
      say: where the warnings go.
    Returns:
      (step, params, opt_state), or None when the manager holds no step.
    Raises:
      LlamaError: steps exist but none can be read.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    directory = Path(manager.directory)
    for step in steps:
        try:
            check(manager.restore(step, args=meta_args())["meta"])
            params, opt_state, _ = restore_step(manager, step, trainer)
            return step, params, opt_state
        except LlamaError:
            raise
        except Exception as e:  # a damaged step can fail in any of Orbax's layers
            where = "left it in place"
            if jax.process_count() == 1:
                aside = directory.parent / "damaged" / str(step)
                aside.parent.mkdir(exist_ok=True)
                if aside.exists():
                    aside = aside.with_name(f"{step}-{os.getpid()}")
                os.replace(directory / str(step), aside)
                manager.reload()
                where = f"moved it to {aside}"
            say(
                f"warning: checkpoint step {step} in {directory} cannot be read "
                f"({type(e).__name__}: {str(e)[:200]}); {where} and trying the previous step."
            )
    if steps:
        raise LlamaError(
            f"No checkpoint step in {directory} can be read (tried {steps}; see the warnings "
            "above for where they are now). Start a new run with another --out."
        )
    return None
