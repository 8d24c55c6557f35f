"""Sentence ids for LPO (Ling 2.0 report): split a detokenised response after pause punctuation.

A token closes a sentence when its text, ignoring trailing spaces and tabs, ends with one of
``. , ; : ! ?``, their CJK forms ``。 ， ； ： ！ ？``, the ideographic comma ``、`` or a newline. The next
token starts a new sentence; ids count up from 0 within each response.

Token texts must be the detokenised pieces of the response (e.g. ``tokenizer.decode([token_id])`` per
token, or the difference between successive incremental decodes), not raw vocabulary entries such as
``Ġ.``. A multi-byte character split over byte-level tokens decodes to U+FFFD pieces and does not match;
incremental decoding avoids that.

Deviation from the report (which only says "pause punctuation"): a ``.`` or ``,`` between two digits
(3.14, 1,000) does not end a sentence, so numbers are not cut into one-token "sentences".
"""

from collections.abc import Sequence

import torch

PAUSE_PUNCTUATION = frozenset(".,;:!?。，；：！？、\n")
_DIGIT_SEPARATORS = frozenset(".,")


def sentence_ids(token_texts: Sequence[str]) -> list[int]:
    """Sentence id for each token of one response (pure Python)."""
    ids: list[int] = []
    sentence = 0
    prev_char = ""  # last character of the text before the current token
    for i, text in enumerate(token_texts):
        if not isinstance(text, str):
            raise TypeError(f"token_texts[{i}] must be str, got {type(text).__name__}")
        ids.append(sentence)
        stripped = text.rstrip(" \t")
        if stripped and stripped[-1] in PAUSE_PUNCTUATION:
            char_before = stripped[-2] if len(stripped) >= 2 else prev_char
            next_text = token_texts[i + 1] if i + 1 < len(token_texts) else ""
            inside_number = (
                stripped[-1] in _DIGIT_SEPARATORS
                and stripped == text
                and char_before.isdigit()
                and next_text[:1].isdigit()
            )
            if not inside_number:
                sentence += 1
        if text:
            prev_char = text[-1]
    return ids


def sentence_ids_BT(batch_token_texts: Sequence[Sequence[str]], num_tokens: int) -> torch.Tensor:
    """Right-padded ``[B, num_tokens]`` int64 sentence ids for a batch of responses (padding gets 0)."""
    out_BT = torch.zeros(len(batch_token_texts), num_tokens, dtype=torch.long)
    for b, texts in enumerate(batch_token_texts):
        if len(texts) > num_tokens:
            raise ValueError(f"response {b} has {len(texts)} tokens, more than num_tokens={num_tokens}")
        if texts:
            out_BT[b, : len(texts)] = torch.tensor(sentence_ids(texts), dtype=torch.long)
    return out_BT
