"""What every rollout backend returns: one ``Sample`` per response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class Sample:
    """One response. ``logprobs[i]`` is the log-prob of ``tokens[i]`` under the policy the trainer will use
    (softmax of logits / temperature over the whole vocabulary, no top-k/top-p truncation), fp32.

    finish_reason: ``eos`` (the model's EOS token, kept as the last token), ``stop`` (a stop token, kept, or a
    stop string, contained in ``text``; ``stop_reason`` says which) or ``length`` (max_new_tokens or the
    context length). ``routes`` (when the engine records routing): the expert ids [len(tokens), L MoE
    layers, k] of the position that scored each token.
    """

    prompt_index: int
    sample_index: int
    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: torch.Tensor
    finish_reason: FinishReason
    version: int
    stop_reason: int | str | None = None
    text: str | None = None
    routes: torch.Tensor | None = None
