"""Prompt datasets for RL: the synthetic arithmetic task, GSM8K-style JSONL files, Hugging Face datasets.

Every source yields ``PromptItem(id, question, answer)``; the prompt text the policy sees is
``prompt_template.format(question=...)``. The train stream is a reproducible shuffle by ``run.seed`` and step,
so a resumed run sees exactly the prompts the uninterrupted run would have.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlplat.data import arith, chain


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["arith", "chain", "jsonl", "hf"] = Field(
        "arith",
        description="arith: synthetic arithmetic; chain: chained addition with a worked solution (long "
        "responses); jsonl: a GSM8K-style file; hf: a Hugging Face dataset.",
    )
    path: str | None = Field(None, description="JSONL file (source=jsonl) or dataset name (source=hf).")
    eval_path: str | None = Field(
        None, description="Held-out JSONL file / HF split; null: a held-out slice of the train data."
    )
    hf_split: str = Field("train", description="HF dataset split for training (source=hf).")
    question_key: str = Field("question", description="Field holding the question text.")
    answer_key: str = Field("answer", description="Field holding the ground-truth answer.")
    prompt_template: str = Field("{question}", description="Prompt text; {question} is replaced.")
    use_chat_template: bool = Field(
        False, description="Wrap the prompt as a user message in the chat template."
    )
    max_operand: int = Field(9, ge=1, description="arith, chain: operands are drawn from 0..max_operand.")
    chain_terms: tuple[int, int] = Field((3, 5), description="chain: [min, max] numbers added per problem.")
    operators: str = Field("+", description="arith: operators to use, from '+-*'.")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Held-out share when no eval_path is given.")
    prompts_per_step: int = Field(
        16, ge=1, description="Prompts per RL step (each gets rollout.sampling.n samples)."
    )
    eval_prompts: int = Field(64, ge=1, description="Held-out prompts scored at each evaluation (greedy).")

    @model_validator(mode="after")
    def _source_needs_path(self) -> DataConfig:
        if self.source in ("jsonl", "hf") and not self.path:
            raise ValueError(f"data.source={self.source} needs data.path")
        if "{question}" not in self.prompt_template:
            raise ValueError("data.prompt_template must contain {question}")
        return self


@dataclass(frozen=True)
class PromptItem:
    id: str
    question: str
    answer: Any  # the reward's label: a string for math, a dict of tests for code
    solution: str | None = None  # what the supervised warm start imitates; None: the answer itself

    @property
    def demonstration(self) -> str:
        return self.solution if self.solution is not None else str(self.answer)


def _read_jsonl(path: str, cfg: DataConfig) -> list[PromptItem]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file {p} does not exist")
    items = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(
                PromptItem(
                    str(row.get("id", f"{p.stem}-{n}")), str(row[cfg.question_key]), row[cfg.answer_key]
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{p}:{n}: expected a JSON object with '{cfg.question_key}' and '{cfg.answer_key}' ({err})"
            ) from err
    if not items:
        raise ValueError(f"data file {p} has no rows")
    return items


def _read_hf(name: str, split: str, cfg: DataConfig) -> list[PromptItem]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("data.source=hf needs the 'datasets' package: pip install datasets") from err
    ds = datasets.load_dataset(name, split=split)
    return [
        PromptItem(f"{name}-{split}-{i}", str(r[cfg.question_key]), r[cfg.answer_key])
        for i, r in enumerate(ds)
    ]


def load_prompts(cfg: DataConfig, seed: int = 0) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, held-out) prompt items."""
    if cfg.source == "arith":
        train, held_out = arith.split(cfg.max_operand, cfg.operators, cfg.eval_fraction)
        as_items = lambda ps, tag: [PromptItem(f"{tag}-{p.question}", p.question, p.answer) for p in ps]
        return as_items(train, "train"), as_items(held_out, "eval")
    if cfg.source == "chain":
        train, held_out = chain.split(cfg.max_operand, *cfg.chain_terms, cfg.eval_fraction)
        as_items = lambda ps, tag: [
            PromptItem(f"{tag}-{p.question}", p.question, p.answer, p.solution) for p in ps
        ]
        return as_items(train, "train"), as_items(held_out, "eval")
    read = (
        (lambda path: _read_jsonl(path, cfg))
        if cfg.source == "jsonl"
        else (lambda split: _read_hf(cfg.path, split, cfg))
    )
    train = read(cfg.path if cfg.source == "jsonl" else cfg.hf_split)
    if cfg.eval_path:
        return train, read(cfg.eval_path)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(train) * cfg.eval_fraction))
    return [train[i] for i in order[cut:]], [train[i] for i in order[:cut]]


def step_prompts(items: list[PromptItem], step: int, per_step: int, seed: int) -> list[PromptItem]:
    """The prompts of RL step ``step``: epoch-wise shuffles, a pure function of (seed, step) for exact resume."""
    per_epoch = max(1, len(items) // per_step)
    epoch, k = divmod(step, per_epoch)
    order = list(range(len(items)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    picked = order[k * per_step : (k + 1) * per_step]
    return [items[i] for i in (picked if len(picked) == per_step else order[:per_step])]
