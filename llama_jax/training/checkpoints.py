"""Run checkpoints: an Orbax CheckpointManager holding params, optimizer state and metadata."""

from __future__ import annotations

from pathlib import Path

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
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_names=("state", "meta"))  # fmt: skip


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
