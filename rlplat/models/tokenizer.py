"""Tokenizer files of an HF model directory, through the ``tokenizers`` library (no transformers needed)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise ValueError(
            f"{path} has no tokenizer.json; save one with the model or point at the tokenizer file"
        )
    return Tokenizer.from_file(str(file))
