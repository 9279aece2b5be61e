"""Training: the loss and the sharded step, the loop, run checkpoints, data.

step          TrainConfig, AdamW, loss, train_step, Trainer (jitted and sharded)
loop          train(): evaluate, log, checkpoint, resume
checkpoints   the Orbax CheckpointManager of a run
data          text/JSONL -> packed or prompt-masked rows, batches by (seed, step)
"""

from llama_jax.training.checkpoints import checkpoint_manager, read_checkpoint_meta
from llama_jax.training.loop import TrainResult, train
from llama_jax.training.step import (
    TrainConfig,
    Trainer,
    decay_mask,
    learning_rate_schedule,
    loss_sums,
    make_optimizer,
    train_step,
    training_config,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "checkpoint_manager",
    "decay_mask",
    "learning_rate_schedule",
    "loss_sums",
    "make_optimizer",
    "read_checkpoint_meta",
    "train",
    "train_step",
    "training_config",
]
