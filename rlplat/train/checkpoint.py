"""One checkpoint protocol for every trainer backend, and Warmup-Stable-Merge checkpoint averaging.

A checkpoint is a directory ``<root>/step-<k>/`` holding ``meta.json`` (step, version, the caller's data
position) and whatever files the backend writes: the torch ``Trainer`` writes ``trainer.pt`` (model, fp32
master weights and AdamW moments per parameter, reference model, step, version), ``rng.pt`` and, on request,
``hf/``; the Megatron backend, one model file and one trainer file per shard. A backend takes part through the
small ``Checkpointable`` interface; ``save_checkpoint`` is the one commit, for both:

1. every rank writes its part into the staging directory ``<root>/.tmp-step-<k>`` (``write_checkpoint``, a
   collective: it returns once every part is written, True on the one rank that commits);
2. that rank writes ``meta.json``, renames the staging directory to ``step-<k>`` and replaces ``<root>/latest``
   atomically, then deletes checkpoints beyond ``keep_last``;
3. every rank waits for the commit (``barrier``), so no rank reads a checkpoint that is not there yet.

A crash at any point leaves the previous checkpoint as the latest, never a half-written one: ``latest`` only
ever names a renamed, complete directory, and a checkpoint is one when it has ``meta.json``.

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
from typing import Any, Protocol

import torch

from rlplat.models import load_pretrained, save_pretrained, to_precision

LATEST = "latest"
META_FILE = "meta.json"
TRAINER_FILE = "trainer.pt"  # the torch backend's state
RNG_FILE = "rng.pt"  # the torch backend's random streams
HF_DIR = "hf"
MERGE_SCHEDULES = ("linear", "cosine", "inverse-sqrt")


class Checkpointable(Protocol):
    """A trainer backend's side of ``save_checkpoint`` and ``load_checkpoint``; every rank of the job calls
    them with the same arguments."""

    @property
    def step(self) -> int:
        """Optimizer steps taken: names the checkpoint directory."""
        ...

    @property
    def version(self) -> int: ...

    @property
    def keep_last(self) -> int:
        """How many checkpoints to keep under the root (older ones are deleted after a commit)."""
        ...

    def write_checkpoint(self, staging: Path) -> bool:
        """Write this rank's part of the training state into ``staging`` (the rank that commits creates it
        empty); return once every rank's part is written: True on the one rank that commits."""
        ...

    def read_checkpoint(self, directory: Path) -> None:
        """Restore the training state from a committed checkpoint directory."""
        ...

    def barrier(self) -> None:
        """Wait for every rank of the job."""
        ...


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


def empty_directory(path: Path) -> Path:
    """``path`` as a new empty directory: what a crashed earlier attempt left there is removed first."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    trainer: Checkpointable, root: str | Path, data_position: Any = None, keep_last: int | None = None
) -> Path | None:
    """Write ``<root>/step-<k>`` atomically and point ``<root>/latest`` at it (module docstring); returns its
    path on the rank that commits, None on the others.

    ``data_position`` is any JSON-serialisable value (e.g. the index of the next batch) handed back by
    ``load_checkpoint``. ``keep_last`` defaults to the trainer's.
    """
    try:
        json.dumps(data_position)
    except TypeError as err:
        raise ValueError(f"data_position must be JSON-serialisable, got {data_position!r}") from err
    root = Path(root)
    name = f"step-{trainer.step:08d}"
    final, staging = root / name, root / f".tmp-{name}"
    try:
        commits = trainer.write_checkpoint(staging)
        if commits:
            meta = {"step": trainer.step, "version": trainer.version, "data_position": data_position}
            (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            _commit(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if commits:
        keep = keep_last if keep_last is not None else trainer.keep_last
        for old in sorted(root.glob("step-*"))[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    trainer.barrier()
    return final if commits else None


def _commit(staging: Path, final: Path) -> None:
    """Rename the complete staging directory to ``final``, then point ``latest`` at it."""
    if final.exists():  # a re-save of the same step replaces it (the old one stays latest until then)
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex}")
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)
    _atomic_write_text(final.parent / LATEST, final.name + "\n")


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``<root>/latest`` points at, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / META_FILE).exists() else None


def load_checkpoint(trainer: Checkpointable, path: str | Path) -> Any:
    """Restore ``trainer`` from a checkpoint directory or a root with ``latest``; returns the saved data
    position."""
    path = Path(path)
    if (path / LATEST).exists() and not (path / META_FILE).exists():
        resolved = latest_checkpoint(path)
        if resolved is None:
            raise ValueError(f"{path / LATEST} points at a checkpoint that does not exist")
        path = resolved
    if not (path / META_FILE).exists():
        raise ValueError(f"{path} is not a trainer checkpoint (no {META_FILE}); pass a step-* directory")
    trainer.read_checkpoint(path)
    return load_data_position(path)


def load_data_position(path: str | Path) -> Any:
    """The data position a committed checkpoint directory holds, without loading its tensors."""
    return json.loads((Path(path) / META_FILE).read_text())["data_position"]


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
    and stored in the first checkpoint's dtype; the config and tokenizer come from the first checkpoint (for a
    run's own checkpoints, the tokenizer from the run's ``tokenizer/``).
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
    save_pretrained(first, out, tokenizer_dir=_tokenizer_dir(dirs[0]))
    return Path(out), coeffs


def _tokenizer_dir(hf_dir: Path) -> Path:
    """Where the tokenizer of an HF checkpoint lies: beside its weights, or, for a run's own checkpoint
    (``RUN/checkpoints/step-*/hf``, whose model may have been built from a preset), the run's ``tokenizer/``."""
    hf_dir = hf_dir.resolve()  # `rlplat merge step-A step-B` from inside checkpoints/ has no parents to walk
    if (
        (hf_dir / "tokenizer.json").exists()
        or hf_dir.name != HF_DIR
        or hf_dir.parents[1].name != "checkpoints"
    ):
        return hf_dir
    run_tokenizer = hf_dir.parents[2] / "tokenizer"
    return run_tokenizer if (run_tokenizer / "tokenizer.json").exists() else hf_dir


def load_pretrained_dtype(path: Path) -> torch.dtype:
    cfg = json.loads((path / "config.json").read_text())
    return torch.bfloat16 if cfg.get("torch_dtype") == "bfloat16" else torch.float32


def _hf_dir(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    if (path / HF_DIR / "config.json").exists():
        return path / HF_DIR
    if (path / LATEST).exists():
        raise ValueError(f"{path} holds checkpoints; pass its step-* directories (oldest first)")
    if (path / TRAINER_FILE).exists():
        # trainer.pt holds the weights without the model config that makes them loadable on their own
        raise ValueError(
            f"{path} is a trainer checkpoint without an HF export ({HF_DIR}/); merge reads HF weights: turn on "
            "trainer.checkpoint.export_hf=true (on a new run, or `rlplat run --resume RUN_DIR "
            "trainer.checkpoint.export_hf=true` for the checkpoints from then on) and pass its step-* directories"
        )
    raise ValueError(
        f"{path} is not an HF checkpoint (no config.json) nor a trainer checkpoint with {HF_DIR}/"
    )
