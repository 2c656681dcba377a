"""The sample text: English prose from the Python documentation, for the `tinylm` language model.

Source: the `pydoc_data.topics` module of the Python 3.11.7 standard library (the text `help()`
shows for statements, operators and data-model topics; 79 topics, 488 KB). It ships with every
CPython, so it is available offline; it is copied here (`text/python_docs.jsonl.gz`, one
`{"topic", "text"}` line per topic, SHA-256 below) so that the data does not change with the
Python version. Licence: the Python documentation is distributed under the PSF License
Agreement (Python Software Foundation License Version 2); see sample_models/README.md.

A fixed split by topic (in sorted topic order): topic i is `heldout` when i % 10 == 3,
`calibration` when i % 10 == 7, else `train`. The model is trained on `train` only; held-out
perplexity is measured on `heldout`, never trained on. Tokens are UTF-8 bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

__all__ = ["CORPUS", "SHA256", "TEXT_SPLITS", "documents"]

CORPUS = Path(__file__).parent / "text" / "python_docs.jsonl.gz"
SHA256 = "5e95bd6a26616d0d26da4bd5381c91243ea5eeb5d7bf0894c3524cee1ad1b9bf"
TEXT_SPLITS = ("train", "heldout", "calibration")
TextSplit = Literal["train", "heldout", "calibration"]


@lru_cache(maxsize=1)
def _topics() -> tuple[tuple[str, str], ...]:
    raw = CORPUS.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise RuntimeError(f"the sample text {CORPUS} is corrupt or was changed (SHA-256 {digest[:12]}...); "
                           "restore it with git checkout")  # fmt: skip
    rows = [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line]
    return tuple((row["topic"], row["text"]) for row in rows)


def documents(split: TextSplit) -> list[str]:
    """The topics of one split, in sorted topic order."""
    if split not in TEXT_SPLITS:
        raise ValueError(f"unknown text split {split!r}; choose one of {', '.join(TEXT_SPLITS)}")
    which = {"heldout": 3, "calibration": 7}
    out = []
    for i, (_, text) in enumerate(_topics()):
        rest = i % 10
        name = "heldout" if rest == which["heldout"] else "calibration" if rest == which["calibration"] else "train"
        if name == split:
            out.append(text)
    return out
