"""Text data for language models: a local text or JSONL file as fixed-length blocks of token ids.

The file's documents (the whole `.txt` file, or each JSONL line's `"text"`) are tokenised, joined
by a blank line and cut into consecutive blocks of `length + 1` tokens, in file order (the tail
that does not fill a block is dropped). A block gives `(ids[:-1], ids[1:])`, each (length,): the
inputs and the next-token targets that `loss`, `perplexity` and `accuracy` score per token.

Tokenisers: a HuggingFace `tokenizer.json` (read by the `tokenizers` library, which runs no code
from the file), or `byte`: UTF-8 bytes as ids 0..255, for models trained on bytes (the `tinylm`
sample) or when no tokenizer exists.

    >>> blocks = load_text("corpus.txt", length=128, tokenizer="models/tinyllama")
    >>> blocks[0][0].shape
    torch.Size([128])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import Dataset

from prunecore.errors import UserError

__all__ = [
    "BATCH_TOKENS", "BYTE", "TextBlocks", "TextError", "Tokenizer", "batch_size", "load_text", "load_tokenizer",
    "read_documents",
]  # fmt: skip

BYTE = "byte"
MAX_TEXT_BYTES = 1 << 30  # a text file is read whole; larger ones are refused with a clear message
BATCH_TOKENS = 4096  # tokens per batch of blocks (32 blocks of 128): the logits of a batch stay small


def batch_size(length: int) -> int:
    """Blocks of `length` tokens per batch."""
    return max(1, BATCH_TOKENS // length)


class TextError(UserError, ValueError):
    """A text file or tokenizer cannot be used; the message says why."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    name: str = "byte-level (UTF-8 bytes)"
    vocab_size: int = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


@dataclass(frozen=True)
class FileTokenizer:
    """A `tokenizer.json` read with the `tokenizers` library (no code from the file runs)."""

    name: str
    vocab_size: int
    tokenizer: object

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def load_tokenizer(source: str | Path | None) -> Tokenizer:
    """`byte` (or None), a `tokenizer.json` file, or a model folder holding one."""
    if source is None or str(source) == BYTE:
        return ByteTokenizer()
    path = Path(source).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        where = f"model folder {str(path)!r} has no tokenizer.json" if path.is_dir() else f"{str(path)!r} is missing"
        raise TextError(f"missing tokenizer: {where}; save the model's tokenizer there (tokenizer.save_pretrained), "
                        f"or use tokenizer={BYTE!r} for UTF-8 bytes if the model was trained on bytes")  # fmt: skip
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise TextError("a tokenizer.json needs the tokenizers library: pip install 'prunecore[hf]'") from None
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as exc:  # the library raises its own Exception type for a malformed file
        raise TextError(f"tokenizer {str(file)!r} cannot be read: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None
    return FileTokenizer(f"tokenizer {file}", tok.get_vocab_size(with_added_tokens=True), tok)


def read_documents(path: str | Path) -> list[str]:
    """The documents of a `.txt` file (one) or a `.jsonl` file (each line a string or an object with "text")."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise TextError(f"text file {str(path)!r} does not exist")
    if file.stat().st_size > MAX_TEXT_BYTES:
        raise TextError(f"text file {str(path)!r} is over {MAX_TEXT_BYTES >> 30} GiB; give a smaller sample of it")
    try:
        raw = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(f"text file {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    if file.suffix.lower() != ".jsonl":
        return [raw]
    docs = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TextError(f"{str(path)!r} line {n} is not JSON ({exc.msg}); a .jsonl file has one JSON value "
                            "per line")  # fmt: skip
        text = value.get("text") if isinstance(value, dict) else value
        if not isinstance(text, str):
            raise TextError(f"{str(path)!r} line {n} has no text: give a string or an object with a \"text\" string")
        docs.append(text)
    return docs


class TextBlocks(Dataset):
    """Consecutive blocks of `length + 1` token ids; item i is (inputs, next-token targets), each (length,)."""

    def __init__(self, ids: torch.Tensor, length: int, description: str) -> None:
        count = max(0, (ids.numel() - 1) // length)
        # (count, length + 1): block i holds tokens i*length .. (i+1)*length, sharing one token with the next
        self.blocks = (ids[: count * length + 1].unfold(0, length + 1, length).contiguous() if count
                       else torch.empty(0, length + 1, dtype=torch.long))  # fmt: skip
        self.length, self.description = length, description

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.blocks[i]  # (length + 1,)
        return block[:-1], block[1:]


def load_text(path: str | Path, length: int, tokenizer: str | Path | None = None, limit: int | None = None,
              vocab_size: int | None = None, documents: list[str] | None = None) -> TextBlocks:  # fmt: skip
    """Blocks of `length` tokens from a text file (or from `documents` already read), the first `limit` of them.

    `vocab_size` (the model's) checks that every token id fits the model's embedding.
    """
    if length < 1:
        raise TextError(f"the block length must be >= 1 token, got {length}")
    tok = load_tokenizer(tokenizer)
    docs = read_documents(path) if documents is None else documents
    separator = tok.encode("\n\n")
    ids: list[int] = []
    for i, doc in enumerate(docs):
        ids.extend(([] if i == 0 else separator) + tok.encode(doc))
    blocks = TextBlocks(torch.tensor(ids, dtype=torch.long), length, "")
    if len(blocks) == 0:
        raise TextError(f"text {str(path)!r} has {len(ids):,} tokens ({tok.name}), too short for one block of "
                        f"{length + 1}; give more text or a shorter block (the model's input length)")  # fmt: skip
    if limit is not None:
        blocks.blocks = blocks.blocks[:limit]
    top = int(blocks.blocks.max())
    if vocab_size is not None and top >= vocab_size:
        raise TextError(f"{tok.name} gives token id {top}, but the model's vocabulary has {vocab_size} ids: the "
                        "tokenizer is not the model's")  # fmt: skip
    blocks.description = f"text {Path(path).name} ({len(blocks):,} blocks of {length} tokens, {tok.name})"
    return blocks
