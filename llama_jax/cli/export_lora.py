"""`llama-jax export-lora RUN OUT`: a LoRA run's adapter for peft, or merged into its base.

    llama-jax export-lora runs/lora adapter/            # adapter_config.json + safetensors
    llama-jax export-lora runs/lora merged/ --merge     # a llama-jax checkpoint, base + A B

The adapter directory loads in PyTorch with `PeftModel.from_pretrained(model, "adapter/")`
onto the base exported by `llama-jax export BASE hf/`. The merged checkpoint is a plain
model: `llama-jax generate`, `export` and `train --init` take it like any other.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flax import nnx

from llama_jax.errors import LlamaError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `llama-jax export-lora`."""
    p.add_argument("run", help="the --out directory of `llama-jax train --lora-rank ...`")
    p.add_argument("out", help="directory to create")
    p.add_argument(
        "--merge",
        action="store_true",
        help="write base + adapter as a llama-jax checkpoint instead of a peft adapter",
    )
    p.add_argument("--base", help="the base checkpoint (default: the run's --init)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def load_run(run: str | os.PathLike, step: int | None = None):
    """The adapters and settings of a LoRA run's checkpoint.

    Args:
      run: the run directory (holding checkpoints/).
      step: which checkpoint; default the latest.
    Returns:
      (adapters as a nested dict, LlamaConfig, TrainConfig, the run's metadata).
    Raises:
      LlamaError: no checkpoint there, the step is missing, or the run is not LoRA.
    """
    from llama_jax.config import LlamaConfig
    from llama_jax.training.checkpoints import (
        checkpoint_manager,
        read_checkpoint_meta,
        restore_step,
    )
    from llama_jax.training.step import TrainConfig, Trainer

    where = Path(run).expanduser() / "checkpoints"
    try:
        meta = read_checkpoint_meta(where, step)
    except FileNotFoundError:
        meta = None
    if meta is None:
        raise LlamaError(
            f"{where}: no training checkpoint{'' if step is None else f' at step {step}'}; "
            "give the --out directory of a `llama-jax train --lora-rank ...` run."
        )
    tc = TrainConfig(**meta["train_config"])
    if not tc.lora_rank:
        raise LlamaError(
            f"{run} is a full fine-tuning run (lora_rank 0), not LoRA: its final weights are "
            "in model/; use `llama-jax export` on them."
        )
    cfg = LlamaConfig.from_dict(meta["model_config"])
    trainer = Trainer(cfg, tc)
    manager = checkpoint_manager(where, tc)
    try:
        adapters, _, _ = restore_step(manager, meta["step"], trainer)
    finally:
        manager.close()
    return adapters, trainer.cfg, tc, meta


def run(args: argparse.Namespace) -> int:
    """`llama-jax export-lora`: write the adapter (peft) or the merged checkpoint."""
    from llama_jax import checkpoint
    from llama_jax.checkpoint.store import read_quantization
    from llama_jax.model import Transformer
    from llama_jax.training import lora

    adapters, cfg, tc, meta = load_run(args.run, args.step)
    settings = (tc.lora_targets, tc.lora_rank, tc.lora_alpha, tc.lora_dropout)
    base = args.base or meta.get("lora_base")
    if not args.merge:
        # The adapters alone: the base's weights are never read (an abstract model).
        model = nnx.eval_shape(
            lambda: lora.apply_lora(Transformer(cfg, rngs=nnx.Rngs(0)), *settings)
        )
        lora.set_lora_state(model, adapters)
        path = lora.export_peft(model, args.out, base_model=base, force=args.force)
        print(
            f"wrote {path} (peft LoRA adapter, rank {tc.lora_rank} on {','.join(tc.lora_targets)})"
        )
        return 0
    if base is None or not os.path.isdir(base):
        raise LlamaError(
            f"The base checkpoint {base!r} of this run is not a directory; give it with --base."
        )
    if read_quantization(base) is not None:
        raise LlamaError(
            f"The base checkpoint {base} holds int8 weights; merging needs float ones. Give "
            "the float checkpoint it was quantized from with --base."
        )
    model = lora.apply_lora(checkpoint.load(base), *settings)
    lora.set_lora_state(model, adapters)
    merged = lora.merge(model)
    # With the base's tokenizer files, so the merged checkpoint generates like the base.
    path = checkpoint.save(merged, args.out, tokenizer_from=base, force=args.force)
    print(f"wrote {path} (llama-jax checkpoint: {base} with the adapter merged)")
    return 0
