"""Tokenizers of the LLaMA family behind one interface.

Three kinds exist. Two are a `tokenizer.model`, told apart by content:

- Llama 1 and 2: a SentencePiece BPE model (a protobuf): 32,000 pieces, byte fallback,
  `<unk>` 0, `<s>` (BOS) 1, `</s>` (EOS) 2, no pad token.
- Llama 3, 3.1, 3.2: a tiktoken rank file (text, one `base64(token bytes) rank` per line)
  of 128,000 byte-level BPE tokens, split by Llama 3's regular expression, followed by
  256 special tokens (`<|begin_of_text|>` = 128000, ..., `<|eot_id|>` = 128009, ...).

The third is Hugging Face's `tokenizer.json` (`HFTokenizer`, read by the `tokenizers`
library), which nearly every LLaMA-architecture model on the Hub ships, with its special
tokens and chat template in `tokenizer_config.json` and its stop ids in
`generation_config.json`. `Tokenizer.load(DIR)` picks whichever DIR holds.

All add BOS exactly once (`encode(text, bos=True)`), and never turn special-token text
inside user input into special ids: "<|eot_id|>" typed by a user is ordinary text.
Chat prompts are built from token ids (`encode_dialog`), in the format each model was
fine-tuned on: Llama 2 chat's `[INST]`/`<<SYS>>`, Llama 3 instruct's header tokens, or
for `tokenizer.json` the checkpoint's own Jinja `chat_template`, rendered in a sandbox
as transformers renders it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from llama_jax.errors import LlamaError

# Llama 3's pre-tokenizer pattern (Meta's llama3 tokenizer.py): contractions, words with an
# optional leading non-letter, numbers of at most three digits, punctuation runs, newlines.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256

# The named special tokens of Llama 3.1/3.2, in id order after the base vocabulary. The
# rest of the 256 are `<|reserved_special_token_N|>`. Llama 3.0 has the same ids for the
# tokens it uses (begin/end of text, the header tokens and eot).
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model hands over to a tool (Llama 3.1)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)

# Meta's tiktoken wrapper cuts input into pieces this long before encoding, because the
# pattern is slow on very long runs of whitespace or non-whitespace.
_TIKTOKEN_MAX_CHARS = 400_000
_MAX_NO_WHITESPACE_CHARS = 25_000

# Llama 2 chat markers (Meta's llama/generation.py).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

ROLES = ("system", "user", "assistant", "ipython", "tool")

# Where `Tokenizer.load(DIR)` looks, in order.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")

# Upper bounds on what is read into memory from a tokenizer directory: the largest real
# files are a few tens of MB (tokenizer.json of 256k-token vocabularies).
_MAX_TOKENIZER_BYTES = 512 * 2**20
_MAX_CONFIG_BYTES = 64 * 2**20


def find_tokenizer_file(directory: str | os.PathLike) -> Path | None:
    """The tokenizer file `Tokenizer.load(directory)` would read, or None.

    Args:
      directory: a checkpoint or model directory.
    Returns:
      the path of its `tokenizer.model`, `tokenizer.json` or `original/tokenizer.model`
      (first found, in that order), or None.
    """
    for name in TOKENIZER_FILES:
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    return None


def _read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of `path`, refusing files larger than `limit` before reading them."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise LlamaError(
                f"{path} is {size:,} bytes, more than the {limit:,} a tokenizer file can be; "
                "is it the right file?"
            )
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise LlamaError(f"Cannot read {path}: {e.strerror or e}.") from None


def read_json_file(path: str | os.PathLike, limit: int = _MAX_CONFIG_BYTES) -> dict:
    """A JSON object from `path`, read with a size bound.

    Args:
      path: the file.
      limit: the largest size accepted, in bytes.
    Returns:
      the object as a dict.
    Raises:
      LlamaError: too large, unreadable, not JSON, or not an object.
    """
    path = Path(path)
    data = _read_bounded(path, limit)
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise LlamaError(f"{path}: not valid JSON ({e}); the file is damaged.") from None
    if not isinstance(obj, dict):
        raise LlamaError(f"{path}: expected a JSON object, found {type(obj).__name__}.")
    return obj


def llama3_special_tokens() -> list[str]:
    """The 256 special-token strings of Llama 3, in id order."""
    n_reserved = NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIALS)
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)]
    return [*LLAMA3_NAMED_SPECIALS, *reserved]


def _check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise LlamaError("The dialog is empty: pass at least one {'role', 'content'} message.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LlamaError(f"Message {i} must be a dict with 'role' and 'content'; got {m!r}.")
        if m["role"] not in ROLES:
            raise LlamaError(f"Message {i} has role {m['role']!r}; use one of {ROLES}.")


class Tokenizer:
    """Text <-> token ids for any LLaMA model; load one with `Tokenizer.load(path)`.

    Attributes:
      kind: "sentencepiece" (Llama 1/2), "tiktoken" (Llama 3) or "hf" (tokenizer.json).
      bos_id, eos_id: begin/end of sequence ids.
      pad_id: an id safe to use for padding (padding is always masked out): Llama 3's
        `<|finetune_right_pad_id|>`, or SentencePiece's pad, else `<unk>`.
      stop_ids: the ids that end generation (Llama 3: `<|end_of_text|>`, `<|eot_id|>` and
        `<|eom_id|>`; Llama 1/2: `</s>`).
      vocab_size: number of ids, special tokens included.
    """

    kind: str
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: set[int]
    vocab_size: int

    @staticmethod
    def load(path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer file of any kind, or the tokenizer a directory holds.

        A directory is searched for `tokenizer.model` (Meta's layout and llama-jax
        checkpoints), then `tokenizer.json` (Hugging Face), then
        `original/tokenizer.model` (Hugging Face's Llama 3 repositories).

        Args:
          path: a SentencePiece model, a tiktoken rank file, a `tokenizer.json`, or a
            directory holding one of them.
        Returns:
          a `SentencePieceTokenizer`, `TiktokenTokenizer` or `HFTokenizer`.
        Raises:
          LlamaError: the file is missing or is none of these kinds.
        """
        p = Path(path)
        if p.is_dir():
            found = find_tokenizer_file(p)
            if found is None:
                raise LlamaError(
                    f"{p} is a directory without tokenizer.model, tokenizer.json or "
                    "original/tokenizer.model; pass the tokenizer file or a checkpoint "
                    "directory that holds one."
                )
            p = found
        if not p.is_file():
            raise LlamaError(f"Tokenizer file {p} does not exist.")
        if p.suffix == ".json":
            return HFTokenizer(p)
        data = _read_bounded(p, _MAX_TOKENIZER_BYTES)
        if not data:
            raise LlamaError(f"Tokenizer file {p} is empty.")
        ranks = _parse_rank_file(data)
        if ranks is not None:
            return TiktokenTokenizer(ranks, source=str(p))
        return SentencePieceTokenizer(data, source=str(p))

    # -- the interface both kinds implement ------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token text in it is encoded as ordinary text.

        Args:
          text: the string to encode.
          bos: prepend the BOS id (once; never twice).
          eos: append the EOS id.
        Returns:
          a list of ints.
        """
        ids = self._encode_plain(text)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (special tokens of Llama 3 decode to their names)."""
        raise NotImplementedError

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True):
        """Token ids of a chat in the format the model family was fine-tuned on.

        Args:
          messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
          add_generation_prompt: end with the prompt for the assistant's next turn
            (Llama 3: the assistant header). Llama 2 chat always ends with `[/INST]` after
            the last user message.
        Returns:
          a list of ints starting with BOS.
        """
        raise NotImplementedError

    def format_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat prompt as text (BOS/EOS written as `<s>`/`</s>` for Llama 2)."""
        raise NotImplementedError

    def stream_decoder(self) -> StreamDecoder:
        """A `StreamDecoder` that turns ids arriving one at a time into text pieces."""
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenisation for streaming.

    A token may hold half a UTF-8 character (byte fallback, byte-level BPE) and
    SentencePiece drops the leading space of the first piece, so pieces cannot be
    decoded one by one. This decodes everything received and emits the new suffix once
    it no longer ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one id; returns the text that became final (possibly "")."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text) :], text
        return new

    def flush(self) -> str:
        """Whatever is left (an incomplete character decodes to U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return new


# -- SentencePiece (Llama 1, 2) ---------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2: SentencePiece BPE with byte fallback."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        import sentencepiece as spm

        self.source = source
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise LlamaError(
                f"{source} is neither a SentencePiece model (Llama 1/2) nor a tiktoken rank "
                f"file (Llama 3): {str(e).strip() or type(e).__name__}. Pass the "
                "tokenizer.model that came with the weights."
            ) from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise LlamaError(f"SentencePiece model {source} has no BOS/EOS pieces.")
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else max(self.sp.unk_id(), 0)
        self.stop_ids = {self.eos_id}

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def _turns(self, messages: Sequence[dict]) -> list[tuple[str, str | None]]:
        """(user text, assistant answer or None) pairs, the system prompt folded in."""
        _check_messages(messages)
        msgs = list(messages)
        if msgs[0]["role"] == "system":
            if len(msgs) < 2:
                raise LlamaError("A Llama 2 chat needs a user message after the system prompt.")
            first = B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]
            msgs = [{"role": msgs[1]["role"], "content": first}, *msgs[2:]]
        for i, m in enumerate(msgs):
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want:
                raise LlamaError(
                    "Llama 2 chat needs an optional system message, then alternating user and "
                    f"assistant messages starting and ending with user; message {i} is "
                    f"{m['role']!r}."
                )
        if msgs[-1]["role"] != "user":
            raise LlamaError("The last message of a Llama 2 chat prompt must be from the user.")
        pairs = [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2], strict=False)]
        return [*pairs, (msgs[-1]["content"], None)]

    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True):
        # Meta's chat_completion: every finished exchange is `<s>[INST] u [/INST] a </s>`,
        # the open one `<s>[INST] u [/INST]`, each encoded separately.
        ids: list[int] = []
        for user, answer in self._turns(messages):
            if answer is None:
                ids += self.encode(f"{B_INST} {user.strip()} {E_INST}", bos=True, eos=False)
            else:
                text = f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "
                ids += self.encode(text, bos=True, eos=True)
        return ids

    def format_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        out = []
        for user, answer in self._turns(messages):
            if answer is None:
                out.append(f"<s>{B_INST} {user.strip()} {E_INST}")
            else:
                out.append(f"<s>{B_INST} {user.strip()} {E_INST} {answer.strip()} </s>")
        return "".join(out)


# -- tiktoken (Llama 3) ------------------------------------------------------------------------

_RANK_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")


def _parse_rank_file(data: bytes) -> dict[bytes, int] | None:
    """The ranks of a tiktoken file, or None when `data` is not one."""
    lines = data.splitlines()
    if not lines or not all(_RANK_LINE.match(line) for line in lines if line):
        return None
    ranks = {}
    for line in lines:
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def write_rank_file(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write mergeable ranks as a tiktoken rank file (the Llama 3 `tokenizer.model` format)."""
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in ranks.items()]
    _atomic_write(Path(path), b"\n".join(sorted(lines, key=lambda x: int(x.split()[1]))) + b"\n")


class TiktokenTokenizer(Tokenizer):
    """Llama 3: byte-level BPE (tiktoken) with Llama 3's split pattern and 256 specials."""

    kind = "tiktoken"

    def __init__(self, mergeable_ranks: dict[bytes, int], source: str = "<ranks>"):
        import tiktoken

        self.source = source
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise LlamaError(
                f"tiktoken rank file {source} does not number its {n} tokens 0..{n - 1}; "
                "it is damaged or not a Llama 3 tokenizer.model."
            )
        self.special_tokens = {tok: n + i for i, tok in enumerate(llama3_special_tokens())}
        self.model = tiktoken.Encoding(
            name=Path(source).name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = n + len(self.special_tokens)
        sp = self.special_tokens
        self.bos_id = sp["<|begin_of_text|>"]
        self.eos_id = sp["<|end_of_text|>"]
        self.eot_id = sp["<|eot_id|>"]
        self.eom_id = sp["<|eom_id|>"]
        self.pad_id = sp["<|finetune_right_pad_id|>"]
        self.stop_ids = {self.eos_id, self.eot_id, self.eom_id}

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in range(0, len(text), _TIKTOKEN_MAX_CHARS):
            chunk = text[i : i + _TIKTOKEN_MAX_CHARS]
            for piece in _split_long_runs(chunk, _MAX_NO_WHITESPACE_CHARS):
                ids += self.model.encode(piece, allowed_special=set(), disallowed_special=())
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.model.decode([int(i) for i in ids])

    def encode_special(self, name: str) -> int:
        """The id of a special token such as `"<|eot_id|>"`."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise LlamaError(f"{name!r} is not a Llama 3 special token.") from None

    def _encode_header(self, role: str) -> list[int]:
        sp = self.special_tokens
        return [
            sp["<|start_header_id|>"],
            *self._encode_plain(role),
            sp["<|end_header_id|>"],
            *self._encode_plain("\n\n"),
        ]

    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True):
        # Meta's ChatFormat: <|begin_of_text|>, then per message
        # <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, then the
        # assistant's header for the model to continue.
        # Content is kept verbatim (Meta's current ChatFormat strips nothing), and a tool's
        # answer goes under the `ipython` header, the role Llama 3.1 was trained with.
        _check_messages(messages)
        ids = [self.bos_id]
        for m in messages:
            ids += self._encode_header(_llama3_role(m["role"]))
            ids += self._encode_plain(m["content"])
            ids.append(self.eot_id)
        if add_generation_prompt:
            ids += self._encode_header("assistant")
        return ids

    def format_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        out = ["<|begin_of_text|>"]
        for m in messages:
            out.append(f"<|start_header_id|>{_llama3_role(m['role'])}<|end_header_id|>\n\n")
            out.append(f"{m['content']}<|eot_id|>")
        if add_generation_prompt:
            out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(out)


def _llama3_role(role: str) -> str:
    """The header Llama 3 writes for a role: Meta's ChatFormat maps `tool` to `ipython`."""
    return "ipython" if role == "tool" else role


def _split_long_runs(s: str, max_len: int):
    """Split `s` where a run of only-whitespace or only-non-whitespace exceeds max_len."""
    start, run, in_space = 0, 0, None
    for i, ch in enumerate(s):
        space = ch.isspace()
        run = run + 1 if space == in_space else 1
        in_space = space
        if run > max_len:
            yield s[start:i]
            start, run = i, 1
    yield s[start:]


# -- Hugging Face tokenizer.json ----------------------------------------------------------------

# Private-use characters that fence special-token text found in chat messages, so that
# after rendering it can be told apart from the special tokens the template writes.
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_raise(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _template_tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _template_strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


def compile_chat_template(template: str):
    """Compile a Hugging Face `chat_template` the way transformers does, in a Jinja sandbox.

    The environment matches transformers' `apply_chat_template`: an
    `ImmutableSandboxedEnvironment` (a template cannot reach Python internals or mutate
    its inputs) with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
    `{% generation %}` block that renders its body, and the globals and filters templates
    use: `raise_exception`, `strftime_now`, and a `tojson` that does not escape HTML.

    Args:
      template: the Jinja source.
    Returns:
      a `jinja2.Template`.
    Raises:
      LlamaError: the template does not parse.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # transformers uses `{% generation %}...{% endgeneration %}` to find the assistant's
        # tokens for training masks; for rendering it is transparent.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
                lineno
            )

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _template_tojson
    env.globals["raise_exception"] = _template_raise
    env.globals["strftime_now"] = _template_strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise LlamaError(f"The chat_template does not parse as Jinja: {e}.") from None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, with the configs that sit beside it.

    Read from the same directory, each optional and read with a size bound:

    - `tokenizer_config.json`: `bos_token`, `eos_token`, `pad_token` (strings or
      `{"content": ...}`), `add_bos_token`, and the Jinja `chat_template`;
    - `generation_config.json`: `eos_token_id` (an int or a list), the ids that end
      generation besides EOS (Llama 3 instruct: `<|eot_id|>`; chat models: end of turn);
    - `special_tokens_map.json`: BOS/EOS/PAD when `tokenizer_config.json` lacks them.

    `encode(text, bos=True)` adds BOS only if this tokenizer adds one itself (its
    post-processor, or `add_bos_token` in tokenizer_config.json): many tokenizer.json
    models have no BOS, and transformers feeds them none.
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        self.source = str(path)
        directory = path.parent
        data = _read_bounded(path, _MAX_TOKENIZER_BYTES)
        try:
            self.tok = RustTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception with serde's text
            raise LlamaError(
                f"{path} is not a tokenizer.json the tokenizers library can read: "
                f"{str(e).strip() or type(e).__name__}. Pass the file that came with the weights."
            ) from None
        config = self._optional_json(directory / "tokenizer_config.json")
        special_map = self._optional_json(directory / "special_tokens_map.json")
        generation = self._optional_json(directory / "generation_config.json")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

        def special(name: str) -> int | None:
            text = _token_text(config.get(name)) or _token_text(special_map.get(name))
            if text is None:
                return None
            token_id = self.tok.token_to_id(text)
            if token_id is None:
                raise LlamaError(
                    f"{directory / 'tokenizer_config.json'}: {name} {text!r} is not in "
                    f"{path.name}; the files are from different models."
                )
            return token_id

        self.special_token_texts = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(name)) or _token_text(special_map.get(name)))
        }
        bos, eos, pad = special("bos_token"), special("eos_token"), special("pad_token")
        stops = generation.get("eos_token_id")
        stops = stops if isinstance(stops, list) else [] if stops is None else [stops]
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in stops):
            raise LlamaError(
                f"{directory / 'generation_config.json'}: eos_token_id {stops!r} must be ids "
                f"below the vocabulary size {self.vocab_size}."
            )
        if eos is None:
            if not stops:
                raise LlamaError(
                    f"{directory}: no eos_token in tokenizer_config.json or "
                    "special_tokens_map.json and no eos_token_id in generation_config.json, "
                    "so generation could never stop; copy those files from the model."
                )
            eos = stops[0]
        self.eos_id = eos
        self.stop_ids = {eos, *stops}
        self.pad_id = pad if pad is not None else eos
        self.add_bos = self._adds_bos(config.get("add_bos_token"), bos)
        # Without a BOS token of its own the model never sees one; eos stands in for the
        # attribute so code that reads bos_id keeps working, and encode never adds it.
        self.bos_id = bos if bos is not None else eos
        self.chat_template = self._pick_template(config.get("chat_template"), directory)
        self._template = None
        added = self.tok.get_added_tokens_decoder()
        # Added tokens a user's text could spell: those marked special, and any other added
        # token the chat template writes (transformers' notion of control tokens).
        literal = self.chat_template or ""
        self.control_tokens = sorted(
            (
                t.content
                for t in added.values()
                if t.special or (t.content in literal and not t.content.isspace())
            ),
            key=len,
            reverse=True,
        )

    @staticmethod
    def _optional_json(path: Path) -> dict:
        return read_json_file(path) if path.is_file() else {}

    def _adds_bos(self, flag, bos: int | None) -> bool:
        if bos is None:
            return False
        if isinstance(flag, bool):
            return flag
        # No flag: whatever the post-processor of tokenizer.json does.
        return self.tok.encode("a", add_special_tokens=True).ids[:1] == [bos]

    @staticmethod
    def _pick_template(template, directory: Path) -> str | None:
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None:
            jinja = directory / "chat_template.jinja"
            if jinja.is_file():
                template = _read_bounded(jinja, _MAX_CONFIG_BYTES).decode("utf-8", "replace")
        if template is not None and not isinstance(template, str):
            raise LlamaError(f"{directory}: chat_template must be a string.")
        return template

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token text in it is encoded as ordinary text.

        Args:
          text: the string to encode.
          bos: prepend BOS if this tokenizer uses one (see the class docstring).
          eos: append the EOS id.
        Returns:
          a list of ints.
        """
        ids = self._encode_plain(text)
        if bos and self.add_bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode(self, text: str, *, specials: bool) -> list[int]:
        self.tok.encode_special_tokens = not specials
        try:
            return list(self.tok.encode(text, add_special_tokens=False).ids)
        finally:
            self.tok.encode_special_tokens = False

    def _encode_plain(self, text: str) -> list[int]:
        return self._encode(text, specials=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def format_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat rendered by the checkpoint's `chat_template`, as transformers renders it.

        Args:
          messages: [{"role": ..., "content": str}, ...]; roles are the template's business.
          add_generation_prompt: end with the template's prompt for the assistant's turn.
        Returns:
          the rendered text, special tokens written out.
        Raises:
          LlamaError: no chat template, or the template refuses the messages.
        """
        return self._render(_plain_messages(messages), add_generation_prompt)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        if self.chat_template is None:
            raise LlamaError(
                f"{self.source}: tokenizer_config.json has no chat_template, so this model "
                "has no chat format; use generate with a plain prompt instead."
            )
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **self.special_token_texts,
            )
        except jinja2.exceptions.TemplateError as e:
            raise LlamaError(f"The model's chat_template refused this dialog: {e}") from None

    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True):
        """Token ids of the chat rendered by the checkpoint's `chat_template`.

        The ids are those of transformers' `apply_chat_template(..., tokenize=True)`. Where
        a message spells a special token (a user typing "<|im_end|>"), that text is encoded
        as ordinary text, as transformers does with `sanitize_control_tokens=True`: only
        the template itself writes special tokens.

        Args:
          messages: [{"role": ..., "content": str}, ...].
          add_generation_prompt: end with the template's prompt for the assistant's turn.
        Returns:
          a list of ints (BOS only if the template writes it).
        """
        messages = _plain_messages(messages)
        pattern = "|".join(re.escape(t) for t in self.control_tokens)
        if not pattern or not any(re.search(pattern, m["content"]) for m in messages):
            return self._encode(self._render(messages, add_generation_prompt), specials=True)
        marked = [
            {
                **m,
                "content": re.sub(pattern, lambda x: _MARK_START + x[0] + _MARK_END, m["content"]),
            }
            for m in messages
        ]
        text = self._render(marked, add_generation_prompt)
        # [template text, marked token, template text, ...]; a lone marker (a template that
        # cut a marked token apart) is dropped but still separates the text around it.
        pieces = re.split(f"{_MARK_START}({pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]", text)
        ids = self._encode(pieces[0], specials=True)
        for i, piece in enumerate(pieces[1:], start=1):
            if piece:
                ids += self._encode_piece(piece, specials=i % 2 == 0)
        return ids

    def _encode_piece(self, piece: str, specials: bool) -> list[int]:
        # Encoded after a newline and the newline removed again, so a SentencePiece-style
        # tokenizer does not add the space it puts at the start of a text; where the
        # newline merges with the piece's start, the piece is encoded alone.
        newline = self._encode("\n", specials=True)
        ids = self._encode("\n" + piece, specials=specials)
        if ids[: len(newline)] == newline:
            return ids[len(newline) :]
        return self._encode(piece, specials=specials)


def _plain_messages(messages: Sequence[dict]) -> list[dict]:
    """The dialog as plain dicts of plain values, checked: what a template may see."""
    if not messages:
        raise LlamaError("The dialog is empty: pass at least one {'role', 'content'} message.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise LlamaError(f"Message {i} must be a dict with a 'role' string; got {m!r}.")
        if not isinstance(m.get("content"), str):
            raise LlamaError(f"Message {i} must have a 'content' string; got {m!r}.")
        try:  # a template sees plain JSON values only, never live Python objects
            out.append(json.loads(json.dumps(m)))
        except (TypeError, ValueError) as e:
            raise LlamaError(f"Message {i} holds a value that is not plain JSON: {e}.") from None
    return out


# -- training a Llama-style SentencePiece model ------------------------------------------------


def train_sentencepiece(
    text: Iterable[str] | str | os.PathLike | Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    vocab_size: int,
    *,
    max_sentence_length: int = 4192,
    character_coverage: float = 0.99995,
    num_threads: int = 2,
    input_sentence_size: int = 0,
) -> SentencePieceTokenizer:
    """Train a SentencePiece BPE model with Llama 2's settings and write it to `out_path`.

    Llama's trainer spec: BPE, byte fallback (so no text is ever `<unk>`), digits split,
    no normalisation, whitespace-only pieces allowed, `<unk>` 0, `<s>` 1, `</s>` 2, no pad.

    Args:
      text: an iterator of strings (lines or documents), or a text file path, or a list of
        text file paths.
      out_path: where to write the `.model` file (written atomically).
      vocab_size: number of pieces; at least 259 + the distinct characters kept (the 256
        byte pieces and three specials are part of it).
      max_sentence_length: longer input lines are skipped by the trainer (in bytes).
      character_coverage: share of characters given their own piece; the rest use bytes.
      num_threads: trainer threads.
      input_sentence_size: sample at most this many lines (0: use all).
    Returns:
      the trained tokenizer, loaded.
    """
    import sentencepiece as spm

    out_path = Path(out_path)
    kwargs = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_unicode_script=True,
        split_by_number=True,
        split_by_whitespace=True,
        character_coverage=character_coverage,
        max_sentence_length=max_sentence_length,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=num_threads,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    import io

    buf = io.BytesIO()
    if isinstance(text, str | os.PathLike):
        files = [str(text)]
    elif isinstance(text, list | tuple) and text and all(_is_file(t) for t in text):
        files = [str(t) for t in text]
    else:
        files = None
    for f in files or ():
        if not Path(f).is_file():
            raise LlamaError(f"Training text file {f} does not exist.")
    try:
        if files is not None:
            spm.SentencePieceTrainer.train(input=",".join(files), model_writer=buf, **kwargs)
        else:
            lines = (line for doc in text for line in doc.splitlines() if line.strip())
            spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=buf, **kwargs)
    except RuntimeError as e:
        raise LlamaError(f"SentencePiece training failed: {str(e).strip()}") from None
    _atomic_write(out_path, buf.getvalue())
    return SentencePieceTokenizer(buf.getvalue(), source=str(out_path))


def _is_file(t) -> bool:
    """Whether t names an existing file (False for text, however long)."""
    if not isinstance(t, str | os.PathLike) or "\n" in str(t):
        return False
    try:
        return Path(t).is_file()
    except OSError:  # e.g. a line of text longer than a file name may be
        return False


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a failure never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
