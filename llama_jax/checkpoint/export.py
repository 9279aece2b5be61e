"""`llama-jax export CKPT OUT --to hf|meta`: a llama-jax checkpoint back to PyTorch layouts.

    llama-jax export ~/ckpt/l3-8b ~/hf/l3-8b --to hf     # LlamaForCausalLM.from_pretrained
    llama-jax export ~/ckpt/l3-8b ~/meta/l3-8b --to meta # params.json + consolidated.00.pth

Blocks are read one at a time from the checkpoint and streamed into the output files,
so host memory stays near one block.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator

import numpy as np

from llama_jax.checkpoint import layout, store
from llama_jax.checkpoint.configs import config_to_hf
from llama_jax.checkpoint.safetensors_io import SafetensorsWriter
from llama_jax.checkpoint.torch_zip import write_pth
from llama_jax.errors import LlamaError

MAX_SHARD_BYTES = 5 * 2**30


def check_float(path: str, quantization: str | None) -> None:
    """Refuse an int8 checkpoint: Hugging Face and Meta layouts hold float weights.

    Args:
      path: the llama-jax checkpoint directory (absolute).
      quantization: what its llama_jax.json records (`store.read_header`).
    Raises:
      LlamaError: naming the checkpoint and what to export instead.
    """
    if quantization is not None:
        raise LlamaError(
            f'{path}: this checkpoint holds {quantization} weights ("quantization": '
            f'"{quantization}" in {store.CONFIG_FILE}), which Hugging Face and Meta '
            "checkpoints cannot hold; export the float checkpoint it was quantized from."
        )


def meta_tensors(path: str, cfg) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Meta name, Meta-layout array) in `layout.meta_names` order, a block at a time.

    For a float checkpoint (`export` has refused an int8 one with `check_float`).
    """
    block, block_index = None, None
    for name in layout.meta_names(cfg):
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            if i != block_index:
                block, block_index = store.read_layer_host(path, cfg, i, None), i
            parts = name.split(".")[2:-1]  # ["attention", "wq"] or ["attention_norm"]
            group, leaf = (parts[0], parts[1]) if len(parts) == 2 else (parts[0], "weight")
            _, w = layout.param_to_meta(("layers", group, leaf), block[group][leaf], cfg, i)
        else:
            key = {
                "tok_embeddings.weight": ("tok_embeddings",),
                "norm.weight": ("norm", "weight"),
                "output.weight": ("output",),
            }[name]
            _, w = layout.param_to_meta(key, store.read_top_host(path, cfg, key, None), cfg)
        yield name, w


def export(
    src_ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    to: str = "hf",
    force: bool = False,
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict:
    """Write a llama-jax checkpoint as a Hugging Face or a Meta model directory.

    Args:
      src_ckpt: a llama-jax checkpoint directory.
      out_dir: the directory to create (atomically; only complete output appears).
      to: "hf" (config.json + model*.safetensors, loadable by transformers'
        `LlamaForCausalLM.from_pretrained`) or "meta" (params.json + consolidated.00.pth
        in Meta's rotary convention, loadable by Meta's llama code).
      force: replace an existing `out_dir`.
      progress: show a progress bar per tensor and a closing summary.
      max_shard_bytes: HF only; larger models are split into several safetensors files
        with a model.safetensors.index.json.
    Returns:
      A summary dict: parameters, dtype, bytes, seconds, out.
    Raises:
      LlamaError: among others, for an int8 checkpoint (before anything is written).
    """
    from tqdm.auto import tqdm

    from llama_jax.checkpoint.convert import human_bytes

    t0 = time.perf_counter()
    if to not in ("hf", "meta"):
        raise LlamaError(f"--to {to!r}: expected 'hf' or 'meta'.")
    src = os.path.abspath(os.path.expanduser(os.fspath(src_ckpt)))
    cfg, quantization = store.read_header(src)
    check_float(src, quantization)
    out = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    store.check_destination(out, force, protect=(src,))
    names = layout.meta_names(cfg)
    totals = {"parameters": 0, "bytes": 0}

    with (
        store.atomic_directory(out, force, protect=(src,)) as tmp,
        tqdm(total=len(names), unit="tensor", desc=f"export {to}", disable=not progress) as bar,
    ):

        def counted():
            for name, w in meta_tensors(src, cfg):
                totals["parameters"] += w.size
                totals["bytes"] += w.nbytes
                bar.update(1)
                bar.set_postfix_str(name, refresh=False)
                yield name, w

        if to == "meta":
            with open(os.path.join(tmp, "params.json"), "w") as f:
                json.dump(layout.meta_params(cfg), f, indent=2)
            write_pth(os.path.join(tmp, "consolidated.00.pth"), _with_tied_output(counted(), cfg))
        else:
            _write_hf(tmp, cfg, counted(), max_shard_bytes)
        tok = os.path.join(src, store.TOKENIZER_FILE)
        if os.path.isfile(tok):
            shutil.copyfile(tok, os.path.join(tmp, store.TOKENIZER_FILE))
    seconds = time.perf_counter() - t0
    summary = {
        "parameters": totals["parameters"],
        "dtype": cfg.param_dtype,
        "bytes": totals["bytes"],
        "seconds": seconds,
        "out": out,
    }
    if progress:
        print(
            f"exported {to} -> {out}: {summary['parameters']:,} parameters, {cfg.param_dtype}, "
            f"{human_bytes(summary['bytes'])} in {seconds:.1f} s"
        )
    return summary


def _with_tied_output(tensors, cfg):
    """Meta's model always has an output layer: give a tied model's embedding to it too."""
    embedding = None
    for name, w in tensors:
        if name == "tok_embeddings.weight":
            embedding = w
        yield name, w
    if cfg.tie_word_embeddings:
        yield "output.weight", embedding


def _write_hf(tmp: str, cfg, tensors, max_shard_bytes: int) -> None:
    """config.json + model.safetensors (or model-0000i-of-0000n.safetensors + index)."""
    from llama_jax.checkpoint.convert import _np_dtype

    dtype = _np_dtype(cfg.param_dtype)
    specs = []
    for name in layout.meta_names(cfg):
        specs.append((layout.meta_to_hf_name(name), dtype, layout.meta_shape(name, cfg)))
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[2])) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    n = len(shards)
    files = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map = {}
    it = iter(tensors)
    for file, shard in zip(files, shards, strict=True):
        writer = SafetensorsWriter(os.path.join(tmp, file), shard)
        for _ in shard:
            meta_name, w = next(it)
            name, w = layout.meta_to_hf_tensor(meta_name, w, cfg)
            writer.write(name, np.ascontiguousarray(w))
            weight_map[name] = file
        writer.close()
    if n > 1:
        total = sum(int(np.prod(s[2])) * dtype.itemsize for s in specs)
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
