"""`llama-jax chat`: an interactive conversation with history, streamed as it is written.

The whole dialog is re-encoded in the model family's chat format every turn (Llama 2
chat's `[INST]`, Llama 3's header tokens) and generated from with a fresh cache, so a
turn costs one prefill of the history. When the history no longer fits the context,
the oldest exchanges are dropped (the system prompt is kept) and the user is told.

Type `/reset` to forget the history, `/exit` (or end the input) to leave.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from llama_jax.cli.generate import add_sampling_arguments, load_for_generation
from llama_jax.errors import LlamaError
from llama_jax.inference.generate import CACHE_FULL, generate_text


def fit_history(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], int]:
    """Drop the oldest user/assistant exchanges until the prompt has at most `budget` ids.

    Args:
      tokenizer: the model's Tokenizer.
      messages: the dialog, ending with the new user message.
      budget: the most prompt tokens allowed.
    Returns:
      (the messages kept, the number of messages dropped).
    Raises:
      LlamaError: the system prompt and the last message alone are too long.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system) :]
    dropped = 0
    while len(tokenizer.encode_dialog(system + rest)) > budget:
        if len(rest) <= 1:
            raise LlamaError(
                f"The message is too long: with the system prompt it needs more than {budget} "
                "tokens, the room left in the model's context for a prompt. Shorten it."
            )
        rest = rest[2:]  # one user message and the assistant's answer
        dropped += 2
    return system + rest, dropped


def chat_loop(
    model,
    tokenizer,
    read: Callable[[str], str],
    write: Callable[[str], None],
    *,
    system: str | None = None,
    max_new_tokens: int = 512,
    **sampling,
) -> list[dict]:
    """Run a conversation until `read` raises EOFError or returns "/exit".

    Args:
      model: the Transformer.
      tokenizer: its Tokenizer.
      read: returns the user's next message (given a prompt string), like `input`.
      write: prints a piece of text (the answer is streamed through it).
      system: an optional system prompt.
      max_new_tokens: the longest answer.
      **sampling: temperature, top_k, top_p, seed, cache_len, cache_dtype for
        `generate_text`.
    Returns:
      the final dialog.
    """
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    budget = model.cfg.max_seq_len - min(max_new_tokens, model.cfg.max_seq_len // 2)
    while True:
        try:
            text = read("you> ")
        except EOFError:
            write("\n")
            return messages
        if text.strip() == "/exit":
            return messages
        if text.strip() == "/reset":
            messages = list(start)
            write("[history cleared]\n")
            continue
        if not text.strip():
            continue
        try:
            messages, dropped = fit_history(
                tokenizer, [*messages, {"role": "user", "content": text}], budget
            )
        except LlamaError as e:
            write(f"[{e}]\n")
            continue
        if dropped:
            write(f"[the oldest {dropped} messages no longer fit the context: dropped]\n")
        write("llama> ")
        answer, reason = generate_text(
            model,
            tokenizer,
            messages,
            max_new_tokens,
            chat=True,
            on_text=lambda row, piece: write(piece),
            return_finish_reasons=True,
            **sampling,
        )
        write("\n")
        if reason == CACHE_FULL:
            write("[the answer was cut: the context is full]\n")
        messages.append({"role": "assistant", "content": answer})


def add_arguments(p) -> None:
    """Flags of `llama-jax chat`."""
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(p, max_new_tokens=512)


def run(args) -> int:
    """`llama-jax chat`: read messages from the terminal, stream the answers."""
    import jax

    from llama_jax.sharding import is_main_process

    if jax.process_count() > 1:
        raise LlamaError(
            "chat reads one terminal, but this is a multi-process run: every host would wait "
            "for input. Use `llama-jax generate` (every host runs it, process 0 prints)."
        )
    model, tokenizer = load_for_generation(args)
    show = is_main_process()

    def write(text):
        if show:
            sys.stdout.write(text)
            sys.stdout.flush()

    if show:
        print("[chat: /reset clears the history, /exit or Ctrl-D leaves]", file=sys.stderr)
    chat_loop(
        model,
        tokenizer,
        input,
        write,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        cache_len=args.cache_len,
        cache_dtype=args.cache_dtype,
    )
    return 0
