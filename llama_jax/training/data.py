"""Training data: read text or JSONL, tokenise, pack or mask, and batch deterministically.

Two kinds of example, one array layout:

    pretraining   documents are tokenised as BOS + text + EOS, concatenated, and cut into
                  rows of T + 1 tokens (T inputs, each predicting the next); every target
                  counts in the loss.
    fine-tuning   (SFT) each JSONL record is a prompt/response pair or a list of chat
                  turns; a row holds one example, right-padded, and only the response
                  tokens (the assistant turns) carry loss weight: the prompt teaches
                  nothing, it is only conditioned on.

A `TokenDataset` is the resulting `tokens [R, T + 1]` and `weights [R, T]` (weight of each
target) plus a batching rule that depends only on (seed, step): sample g of the run is
row `permutation(seed, epoch)[g mod R]` with `epoch = g div R`. Resuming from step s
therefore needs nothing but s, and every host of a multi-host run computes the same
global batch and keeps its own slice of it.

Dimension letters (see model.py): B batch, T sequence length; M micro-batches, R rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from llama_jax.errors import LlamaError

TEXT_KEY = "text"


# Reading --------------------------------------------------------------------------------


def _expand(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by `paths`, directories expanded recursively in sorted order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file())
            files.extend(f for f in found if not _hidden_or_binary(f.relative_to(p), f))
        elif p.is_file():
            files.append(p)
        else:
            raise LlamaError(
                f"Data path {str(p)!r} does not exist; pass a text/JSONL file or a directory."
            )
    return files


def _hidden_or_binary(rel: Path, path: Path) -> bool:
    """Skipped inside directories: hidden paths, __pycache__, files with a NUL byte early on.

    (Like `grep -I`: a directory of sources often holds compiled or binary files.)
    """
    if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
        return True
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlamaError(
            f"Data file {str(path)!r} is not UTF-8 text (byte {e.start}); "
            "convert it or leave it out."
        ) from None


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamaError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None
        if not isinstance(record, dict):
            raise LlamaError(
                f"{path}:{lineno}: each JSONL line must be an object, got {record!r:.60}."
            )
        yield lineno, record


def read_documents(
    paths: str | os.PathLike | Sequence[str | os.PathLike], text_key: str = TEXT_KEY
) -> list[str]:
    """Documents for pretraining: one per plain-text file, one per line of a .jsonl file.

    Args:
      paths: files or directories (searched recursively, sorted, so the order is fixed;
        hidden files, __pycache__ and binary files inside directories are skipped).
        A file ending in `.jsonl` holds one JSON object per line with the text under
        `text_key`; any other file is one UTF-8 document.
      text_key: the JSONL field holding the text.
    Returns:
      The non-empty documents, in order.
    Raises:
      LlamaError: a path does not exist, a file is not UTF-8 or not valid JSONL, a record
        lacks `text_key`, or the corpus holds no text at all.
    """
    files = _expand(paths)
    docs: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            for lineno, record in _read_jsonl(f):
                if not isinstance(record.get(text_key), str):
                    raise LlamaError(
                        f"{f}:{lineno}: no string field {text_key!r} (fields: {sorted(record)})."
                    )
                docs.append(record[text_key])
        else:
            docs.append(_read_text(f))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LlamaError(f"The corpus {[str(p) for p in files] or paths} holds no text.")
    return docs


@dataclasses.dataclass(frozen=True)
class Turn:
    """One segment of a fine-tuning example; `train` marks the tokens that carry loss."""

    role: str
    content: str
    train: bool


def read_sft_examples(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[list[Turn]]:
    """Fine-tuning examples from JSONL files.

    Each line is either `{"prompt": ..., "response": ...}` or
    `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`.
    Responses and assistant turns are trained on; everything else is prompt.

    Args:
      paths: .jsonl files or directories of them.
    Returns:
      One list of `Turn`s per example.
    Raises:
      LlamaError: missing path, bad JSON, a record of neither shape, no examples.
    """
    examples: list[list[Turn]] = []
    for f in _expand(paths):
        for lineno, r in _read_jsonl(f):
            if isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str):
                examples.append(
                    [Turn("user", r["prompt"], False), Turn("assistant", r["response"], True)]
                )
            elif isinstance(r.get("messages"), list) and r["messages"]:
                turns = []
                for m in r["messages"]:
                    if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
                        raise LlamaError(f"{f}:{lineno}: each message needs a string 'content'.")
                    role = m.get("role")
                    if role not in ("system", "user", "assistant"):
                        raise LlamaError(
                            f"{f}:{lineno}: message role {role!r} is not system/user/assistant."
                        )
                    turns.append(Turn(role, m["content"], role == "assistant"))
                if not any(t.train for t in turns):
                    raise LlamaError(f"{f}:{lineno}: the conversation has no assistant turn.")
                examples.append(turns)
            else:
                raise LlamaError(
                    f"{f}:{lineno}: expected 'prompt' and 'response' strings or a 'messages' "
                    f"list, got fields {sorted(r)}."
                )
    if not examples:
        raise LlamaError(f"No fine-tuning examples found in {paths}.")
    return examples


# Tokenising -----------------------------------------------------------------------------


def encoder_of(tokenizer) -> Callable[[str], list[int]]:
    """A function text -> ids that adds no BOS/EOS, whatever the tokenizer's defaults.

    Works with `llama_jax.tokenizer.Tokenizer` (encode(text, bos=False, eos=False)) and any
    object whose `encode(text)` returns plain ids.
    """
    try:
        tokenizer.encode("a", bos=False, eos=False)
        return lambda text: list(tokenizer.encode(text, bos=False, eos=False))
    except TypeError:
        return lambda text: list(tokenizer.encode(text))


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    pad = pad() if callable(pad) else pad
    # SentencePiece reports -1 when the model has no pad piece; padded targets carry zero
    # weight, so any valid id will do.
    return tokenizer_id(tokenizer, "eos_id") if pad is None or pad < 0 else int(pad)


def tokenizer_id(tokenizer, name: str) -> int:
    """`tokenizer.bos_id` / `eos_id` whether it is an attribute or a method."""
    value = getattr(tokenizer, name)
    return int(value() if callable(value) else value)


def chat_segments(turns: Sequence[Turn], tokenizer) -> list[tuple[list[int], bool]]:
    """Token ids of one example in its model family's chat format, with a train flag each.

    Llama 3 tokenizers (tiktoken, with `<|eot_id|>`): `<|begin_of_text|>`, then per turn
    `<|start_header_id|>role<|end_header_id|>\n\n` + content + `<|eot_id|>`; an assistant
    turn's content and `<|eot_id|>` are trained. Any other tokenizer gets Llama 2's format:
    each exchange is `<s>[INST] user [/INST] answer </s>`, a system turn folded into the next
    user turn inside <<SYS>> tags; the answer and its `</s>` are trained.

    Args:
      turns: the example (from `read_sft_examples`).
      tokenizer: a `llama_jax.tokenizer.Tokenizer` or an object with encode/bos_id/eos_id.
    Returns:
      [(ids, train)] segments; their concatenation is the example.
    """
    encode = encoder_of(tokenizer)
    bos, eos = tokenizer_id(tokenizer, "bos_id"), tokenizer_id(tokenizer, "eos_id")
    special = getattr(tokenizer, "special_tokens", None) or {}
    segments: list[tuple[list[int], bool]] = []
    if "<|eot_id|>" in special:
        start, end = special["<|start_header_id|>"], special["<|end_header_id|>"]
        segments.append(([bos], False))
        for t in turns:
            segments.append(([start, *encode(t.role), end, *encode("\n\n")], False))
            segments.append(([*encode(t.content.strip()), special["<|eot_id|>"]], t.train))
        return segments
    system = ""
    for t in turns:
        if t.role == "system":
            system = f"<<SYS>>\n{t.content}\n<</SYS>>\n\n"
        elif t.role == "user":
            segments.append(([bos, *encode(f"[INST] {system}{t.content.strip()} [/INST]")], False))
            system = ""
        else:
            segments.append(([*encode(t.content.strip()), eos], True))
    return segments


def pack_documents(
    docs: Sequence[str], tokenizer, seq_len: int, progress: bool = False
) -> TokenDataset:
    """Tokenise documents and pack them into rows of seq_len + 1 tokens.

    Args:
      docs: document texts.
      tokenizer: has `encode` and `bos_id`/`eos_id` (see `encoder_of`).
      seq_len: T, the number of positions trained per row.
      progress: show a tqdm bar while tokenising.
    Returns:
      A TokenDataset whose targets all have weight 1. The stream's tail that does not
      fill a row is dropped.
    Raises:
      LlamaError: the corpus is shorter than one row.
    """
    encode = encoder_of(tokenizer)
    bos, eos = tokenizer_id(tokenizer, "bos_id"), tokenizer_id(tokenizer, "eos_id")
    if progress:
        from tqdm.auto import tqdm

        docs = tqdm(docs, desc="tokenising", unit="doc")
    stream = np.concatenate(
        [np.asarray([bos, *encode(d), eos], np.int32) for d in docs] or [np.zeros(0, np.int32)]
    )
    rows = len(stream) // (seq_len + 1)
    if rows == 0:
        raise LlamaError(
            f"The corpus has {len(stream)} tokens, fewer than one training row of "
            f"seq_len + 1 = {seq_len + 1}; add text or lower --seq-len."
        )
    tokens = stream[: rows * (seq_len + 1)].reshape(rows, seq_len + 1)
    return TokenDataset(tokens, np.ones((rows, seq_len), np.float32))


def tokenize_sft(examples: Sequence[Sequence[Turn]], tokenizer, seq_len: int) -> TokenDataset:
    """Tokenise fine-tuning examples, one per row, with loss weight on the responses only.

    A row is the example in its chat format (`chat_segments`; the end-of-turn token of
    each answer is trained, so the model learns to stop), then padding with weight 0.
    Examples longer than seq_len + 1 tokens are cut at the end.

    Args:
      examples: lists of Turns (from `read_sft_examples`).
      tokenizer: a `llama_jax.tokenizer.Tokenizer` (or has encode/bos_id/eos_id/pad_id).
      seq_len: T.
    Returns:
      A TokenDataset; weights[r, t] is 1 where target tokens[r, t + 1] is response text.
    Raises:
      LlamaError: an example has no response token left inside seq_len.
    """
    pad = _pad_id(tokenizer)
    tokens = np.full((len(examples), seq_len + 1), pad, np.int32)
    weights = np.zeros((len(examples), seq_len), np.float32)
    for r, turns in enumerate(examples):
        ids: list[int] = []
        train: list[bool] = []
        for piece, is_train in chat_segments(turns, tokenizer):
            ids += piece
            train += [is_train] * len(piece)
        ids, train = ids[: seq_len + 1], train[: seq_len + 1]
        tokens[r, : len(ids)] = ids
        # Target t is token t + 1, so its weight is the train flag of token t + 1.
        weights[r, : len(ids) - 1] = train[1:]
        if not weights[r].any():
            raise LlamaError(
                f"Fine-tuning example {r} has no response token within seq_len={seq_len} "
                "(the prompt fills it); raise --seq-len or shorten the prompt."
            )
    return TokenDataset(tokens, weights)


# Batching -------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenDataset:
    """Rows of tokens and the loss weight of each target.

    Attributes:
      tokens: [R, T + 1] int32; inputs are tokens[:, :-1], targets tokens[:, 1:].
      weights: [R, T] float32 loss weight of each target (0 for prompt and padding).
    """

    tokens: np.ndarray
    weights: np.ndarray

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, np.int32)
        self.weights = np.asarray(self.weights, np.float32)
        R, T1 = self.tokens.shape
        if self.weights.shape != (R, T1 - 1):
            raise LlamaError(
                f"TokenDataset weights have shape {self.weights.shape}, expected {(R, T1 - 1)}."
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        """T, the number of trained positions per row."""
        return self.tokens.shape[1] - 1

    def fingerprint(self) -> str:
        """A short hash of the contents, recorded in checkpoints to detect changed data."""
        h = hashlib.sha256(self.tokens.tobytes())
        h.update(self.weights.tobytes())
        return h.hexdigest()[:16]

    def row_indices(self, start: int, count: int, seed: int) -> np.ndarray:
        """Rows of global samples start .. start + count - 1 of a run with this seed.

        Each epoch visits every row once, in an order drawn from (seed, epoch) alone.

        Args:
          start: index of the first sample (step * batch size).
          count: number of samples.
          seed: data-order seed.
        Returns:
          [count] int64 row indices.
        """
        R = len(self)
        g = np.arange(start, start + count)
        epochs = g // R
        out = np.empty(count, np.int64)
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([seed, int(epoch)]).permutation(R)
            sel = epochs == epoch
            out[sel] = perm[g[sel] % R]
        return out

    def batch(
        self,
        step: int,
        batch_size: int,
        seed: int,
        micro_batches: int = 1,
        process_index: int = 0,
        process_count: int = 1,
    ) -> dict[str, np.ndarray]:
        """This host's part of the global batch of `step`.

        Args:
          step: the training step; the batch is a pure function of (step, seed).
          batch_size: B, rows per step over all hosts.
          seed: data-order seed.
          micro_batches: M; B is split into M micro-batches of B / M rows.
          process_index, process_count: this host and the number of hosts; each host
            keeps a contiguous 1 / process_count of every micro-batch.
        Returns:
          {"tokens", "targets": [M, B / M / hosts, T] int32, "weights": same, float32}.
        """
        if batch_size % (micro_batches * process_count):
            raise LlamaError(
                f"batch size {batch_size} is not divisible by micro-batches ({micro_batches}) "
                f"x hosts ({process_count})."
            )
        rows = self.row_indices(step * batch_size, batch_size, seed)
        rows = rows.reshape(micro_batches, process_count, -1)[:, process_index]  # [M, b]
        tokens = self.tokens[rows]  # [M, b, T + 1]
        return {
            "tokens": tokens[..., :-1],
            "targets": tokens[..., 1:],
            "weights": self.weights[rows],
        }


def split_documents(
    docs: Sequence[str], eval_fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Hold out a deterministic random fraction of documents (at least one) for evaluation.

    Returns:
      (train documents, eval documents), each in the original order.
    Raises:
      LlamaError: fewer than two documents, or eval_fraction outside (0, 1).
    """
    if not 0 < eval_fraction < 1:
        raise LlamaError(f"eval fraction must be in (0, 1), got {eval_fraction}.")
    if len(docs) < 2:
        raise LlamaError(
            "Holding out evaluation documents needs at least two documents; pass --eval-data."
        )
    n_eval = min(len(docs) - 1, max(1, round(len(docs) * eval_fraction)))
    held = set(np.random.default_rng([seed, 7]).permutation(len(docs))[:n_eval].tolist())
    train = [d for i, d in enumerate(docs) if i not in held]
    return train, [d for i, d in enumerate(docs) if i in held]
