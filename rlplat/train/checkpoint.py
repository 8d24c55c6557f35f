"""Exact, atomic trainer checkpoints, HF export, and Warmup-Stable-Merge checkpoint averaging.

A checkpoint is a directory ``<root>/step-<k>/`` holding ``trainer.pt`` (model, fp32 master weights and
AdamW moments per parameter, reference model, step, version), ``rng.pt`` (torch CPU, CUDA, python
``random``, numpy), ``meta.json`` (step, version, the caller's data position) and, on request, ``hf/``
(``save_pretrained``). It is written into a temporary sibling directory and renamed into place, then
``<root>/latest`` is replaced atomically; a crash at any point leaves the previous checkpoint as the latest,
never a half-written one. Under data parallelism only rank 0 writes (every rank holds the same weights; the
optimizer's shards are gathered first, so a checkpoint does not depend on the number of ranks).

Resume is exact: a run stopped after step k and resumed from its checkpoint ends bitwise equal to a run that
never stopped (tested on CPU), because every tensor of the training state is saved as is and every random
stream is restored.

Warmup-Stable-Merge (Tian et al., "WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging", 2025;
used in Ling 2.0): averaging checkpoints θ_0..θ_k with coefficients c emulates a learning-rate decay. For a
decay schedule w_1 ≥ … ≥ w_k in [0, 1] (w_i: the relative learning rate of the i-th update after θ_0),
    c_0 = 1 − w_1,  c_j = w_j − w_{j+1} (1 ≤ j < k),  c_k = w_k,
which sum to 1. Schedules here: linear w_i = 1 − (i−1)/k, cosine w_i = (1 + cos(π(i−1)/k))/2,
inverse-sqrt w_i = 1/√i. Explicit ``--weights`` are taken as merge coefficients and must sum to 1.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlplat.models import load_pretrained, save_pretrained, to_precision

if TYPE_CHECKING:
    from rlplat.train.trainer import Trainer

LATEST = "latest"
TRAINER_FILE = "trainer.pt"
RNG_FILE = "rng.pt"
META_FILE = "meta.json"
HF_DIR = "hf"
MERGE_SCHEDULES = ("linear", "cosine", "inverse-sqrt")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    trainer: Trainer, root: str | Path, data_position: Any = None, keep_last: int | None = None
) -> Path | None:
    """Write ``<root>/step-<k>`` atomically and point ``<root>/latest`` at it; returns its path.

    ``data_position`` is any JSON-serialisable value (e.g. the index of the next batch) handed back by
    ``load_checkpoint``. Every data-parallel rank must call it (it gathers the optimizer's shards); ranks
    other than 0 write nothing and return None.
    """
    try:
        json.dumps(data_position)
    except TypeError as err:
        raise ValueError(f"data_position must be JSON-serialisable, got {data_position!r}") from err
    # a collective: the optimizer's shards are gathered from the data-parallel ranks, kept by rank 0 only
    state = trainer.state_dict(keep_optimizer=trainer.dp.rank == 0)
    if trainer.dp.rank != 0:
        return None
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{trainer.step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        if not trainer.config.checkpoint.save_optimizer:
            state["optimizer"] = None
        torch.save(state, tmp / TRAINER_FILE)
        torch.save(rng_state(), tmp / RNG_FILE)
        meta = {
            "step": trainer.step,
            "version": trainer.version,
            "precision": trainer.precision,
            "data_position": data_position,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if trainer.config.checkpoint.export_hf:
            save_pretrained(trainer.model, tmp / HF_DIR)
        if final.exists():  # a re-save of the same step replaces it (the old one stays latest until then)
            old = root / f".old-{name}-{uuid.uuid4().hex}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(root / LATEST, name + "\n")
    keep = keep_last if keep_last is not None else trainer.config.checkpoint.keep_last
    for old in sorted(root.glob("step-*"))[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``<root>/latest`` points at, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / TRAINER_FILE).exists() else None


def load_checkpoint(trainer: Trainer, path: str | Path, restore_rng: bool = True) -> Any:
    """Restore ``trainer`` (and the random streams) from a checkpoint directory or a root with ``latest``;
    returns the saved data position."""
    path = Path(path)
    if (path / LATEST).exists() and not (path / TRAINER_FILE).exists():
        resolved = latest_checkpoint(path)
        if resolved is None:
            raise ValueError(f"{path / LATEST} points at a checkpoint that does not exist")
        path = resolved
    if not (path / TRAINER_FILE).exists():
        raise ValueError(f"{path} is not a trainer checkpoint (no {TRAINER_FILE}); pass a step-* directory")
    # on the host: each rank then takes its shard of the optimizer state, not the whole of it on its device
    state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    if state["optimizer"] is None:
        raise ValueError(f"{path} was saved without optimizer state (checkpoint.save_optimizer: false)")
    trainer.load_state_dict(state)
    if restore_rng:
        set_rng_state(torch.load(path / RNG_FILE, weights_only=True))
    return json.loads((path / META_FILE).read_text())["data_position"]


def export_hf(trainer: Trainer, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write the current policy as an HF checkpoint directory (config.json + safetensors)."""
    return save_pretrained(trainer.model, out, tokenizer_dir=tokenizer_dir)


# -- Warmup-Stable-Merge ------------------------------------------------------------------------------------


def decay_weights(schedule: str, k: int) -> list[float]:
    """w_1..w_k of a decay schedule (relative learning rate of each update after the first checkpoint)."""
    if k < 1:
        raise ValueError(f"a decay schedule needs k >= 1 updates, got {k}")
    if schedule == "linear":
        return [1.0 - (i - 1) / k for i in range(1, k + 1)]
    if schedule == "cosine":
        return [(1.0 + math.cos(math.pi * (i - 1) / k)) / 2.0 for i in range(1, k + 1)]
    if schedule == "inverse-sqrt":
        return [1.0 / math.sqrt(i) for i in range(1, k + 1)]
    raise ValueError(f"unknown merge schedule {schedule!r}; choose one of {', '.join(MERGE_SCHEDULES)}")


def merge_coefficients(w: list[float]) -> list[float]:
    """WSM coefficients c_0..c_k from decay weights w_1..w_k (c_0 = 1 − w_1, c_j = w_j − w_{j+1}, c_k = w_k)."""
    if not w:
        return [1.0]
    if any(not 0.0 <= x <= 1.0 for x in w) or any(a < b for a, b in itertools.pairwise(w)):
        raise ValueError(f"decay weights must be non-increasing values in [0, 1], got {w}")
    return [1.0 - w[0], *(w[j] - w[j + 1] for j in range(len(w) - 1)), w[-1]]


def merge_checkpoints(
    paths: list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    schedule: str = "linear",
) -> tuple[Path, list[float]]:
    """Average HF checkpoint directories (oldest first) into ``out``; returns (out, coefficients).

    Trainer checkpoints (``step-*`` with an ``hf/`` export) are accepted too. Tensors are averaged in fp32
    and stored in the first checkpoint's dtype; the config and tokenizer come from the first checkpoint.
    """
    if not paths:
        raise ValueError("merge needs at least one checkpoint")
    dirs = [_hf_dir(Path(p)) for p in paths]
    if weights is None:
        coeffs = merge_coefficients(decay_weights(schedule, len(dirs) - 1)) if len(dirs) > 1 else [1.0]
    else:
        if len(weights) != len(dirs):
            raise ValueError(f"--weights has {len(weights)} values for {len(dirs)} checkpoints")
        if abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"merge weights must sum to 1, got {sum(weights)} ({weights})")
        coeffs = list(weights)
    models = [load_pretrained(d, dtype=torch.float32) for d in dirs]
    first = models[0]
    states = [m.state_dict() for m in models]
    for d, s in zip(dirs[1:], states[1:], strict=True):
        if s.keys() != states[0].keys() or any(s[k].shape != states[0][k].shape for k in s):
            raise ValueError(f"{d} does not have the tensors of {dirs[0]}; merge checkpoints of one model")
    merged = {}
    for name in states[0]:
        acc = torch.zeros_like(states[0][name], dtype=torch.float64)
        for c, s in zip(coeffs, states, strict=True):
            acc += c * s[name].double()
        merged[name] = acc.float()
    first.load_state_dict(merged)
    dtype = load_pretrained_dtype(dirs[0])
    if dtype != torch.float32:
        first = to_precision(first, "bf16")
    save_pretrained(first, out, tokenizer_dir=dirs[0])
    return Path(out), coeffs


def load_pretrained_dtype(path: Path) -> torch.dtype:
    cfg = json.loads((path / "config.json").read_text())
    return torch.bfloat16 if cfg.get("torch_dtype") == "bfloat16" else torch.float32


def _hf_dir(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    if (path / HF_DIR / "config.json").exists():
        return path / HF_DIR
    raise ValueError(
        f"{path} is not an HF checkpoint (no config.json) nor a trainer checkpoint with {HF_DIR}/"
    )
