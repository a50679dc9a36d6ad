"""Text <-> token ids for `kiln generate`, through the `tokenizers` library (an optional extra).

A checkpoint directory's `tokenizer.json` (what Hugging Face checkpoints ship) is the
tokenizer; `--tokenizer FILE` names one explicitly (for a model spec, or another file). Without
one, `kiln generate` takes `--prompt-ids` and prints token ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
INSTALL_HINT = "pip install 'torch-kiln[tokenizers]'"


class TokenizerError(ValueError):
    """No tokenizer where one is needed, the library missing, or a file it cannot read."""


def tokenizer_path(model: str, explicit: str | None = None) -> str | None:
    """The tokenizer file for `model`: `explicit` if given (it must exist), else
    <model>/tokenizer.json when `model` is a directory that has one, else None."""
    if explicit is not None:
        if not os.path.isfile(explicit):
            raise TokenizerError(f"--tokenizer {explicit!r}: no such file")
        return explicit
    candidate = os.path.join(model, TOKENIZER_FILE)
    return candidate if os.path.isdir(model) and os.path.isfile(candidate) else None


@dataclass
class TextCodec:
    """A loaded tokenizer: `encode(text)` -> ids (with the tokenizer's special tokens, e.g. BOS,
    as Hugging Face's own tokenizers add by default), `decode(ids)` -> text without them."""

    tokenizer: Any
    path: str

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_codec(path: str) -> TextCodec:
    """The tokenizer in `path` (a tokenizer.json); a clear error without the library."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError(f"reading {path} needs the `tokenizers` library: {INSTALL_HINT}") from None
    try:
        return TextCodec(Tokenizer.from_file(path), path)
    except Exception as exc:  # the library raises its own Exception type for a bad file
        raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from None


def tokenizers_available() -> bool:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True
