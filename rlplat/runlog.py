"""The writer side of a run directory: ``metrics.jsonl``, ``rollouts.jsonl``, ``dashboard.html`` and wandb.

File formats and metric keys are defined in ``rlplat.dashboard.metrics_schema``; the loop logs with those
constants::

    from rlplat.dashboard import metrics_schema as M

    with RunLog(run_dir, wandb=cfg.wandb, config=cfg.model_dump()) as log:
        for step in ...:
            log.log_rollouts(step, [{"prompt": p, "response": r, "reward": x, "mismatch": mismatch_summary(...)}])
            log.log_metrics(step, {M.REWARD_MEAN: 0.4, M.TIME_TRAIN: 1.2, ...})
            log.write_dashboard(every_s=15)  # at most that often: a page re-reads the whole run
        log.write_dashboard()

Every line is flushed and fsynced before the call returns, so a crash loses at most the step being written; a
line cut short by a crash is ended with a newline when the run resumes (and skipped by the reader). wandb is
offline by default (files under ``RUN_DIR/wandb``, no network); ``mode: online`` uploads, ``disabled`` skips it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rlplat.algos.ratios import MAX_LOG_RATIO
from rlplat.dashboard import metrics_schema as ms


class WandbConfig(BaseModel):
    """Weights & Biases logging of the same metrics (mount it into the experiment config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="offline: files under RUN_DIR/wandb (sync later); online: upload; disabled: none.",
    )
    project: str = Field("rlplat", description="wandb project name.")
    entity: str | None = Field(None, description="wandb team or user; null for the account's default.")
    name: str | None = Field(None, description="wandb run name; null for the run directory's name.")
    tags: list[str] = Field(default_factory=list, description="wandb run tags.")


def mismatch_summary(
    train_logp: Sequence[float],
    rollout_logp: Sequence[float],
    keep: Sequence[bool] | None = None,
) -> dict[str, float | int]:
    """Per-token train–inference mismatch of one response, for a rollout record's ``mismatch`` field.

    ``train_logp`` / ``rollout_logp``: the response tokens' log-probs under the trainer and the rollout engine
    (lists; call ``.tolist()`` on tensors). ``keep``: IcePop's keep mask for those tokens, if it ran. KL is the
    k3 estimate of KL(pi_rollout || pi_train), as in ``rlplat.algos.metrics.mismatch_metrics``, with the
    log-ratio bounded by 20 as there (``rlplat.algos.ratios``): ``math.expm1`` raises OverflowError past 709.
    """
    if len(train_logp) != len(rollout_logp):
        raise ValueError(
            f"train_logp has {len(train_logp)} tokens but rollout_logp has {len(rollout_logp)}; pass the "
            "log-probs of the same response tokens"
        )
    if keep is not None and len(keep) != len(train_logp):
        raise ValueError(f"keep has {len(keep)} entries for {len(train_logp)} tokens")
    n = len(train_logp)
    d = [float(t) - float(r) for t, r in zip(train_logp, rollout_logp)]
    c = [min(x, MAX_LOG_RATIO) for x in d]
    return {
        "num_tokens": n,
        "max_abs_dlogp": max((abs(x) for x in d), default=0.0),
        "mean_abs_dlogp": sum(abs(x) for x in d) / n if n else 0.0,
        "kl": sum(math.expm1(x) - x for x in c) / n if n else 0.0,
        "masked_fraction": (sum(not k for k in keep) / n if n else 0.0) if keep is not None else 0.0,
    }


def _finite_or_none(value: Any, where: str) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        # numpy / torch scalars
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        else:
            raise TypeError(f"{where} must be a number, got {type(value).__name__}: {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf; the chart shows a gap
    return value


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return step


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _jsonable(value.item())
    return value


class RunLog:
    """Appends a run's metrics and sampled rollouts to its directory, and to wandb (see the module docstring)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        wandb: WandbConfig | Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = self._open_append(ms.METRICS_FILE)
        self._rollouts = self._open_append(ms.ROLLOUTS_FILE)
        settings = wandb if isinstance(wandb, WandbConfig) else WandbConfig.model_validate(wandb or {})
        # wandb adds a file handler (its debug log, under this run directory) to its logger and never removes it
        self._wandb_log_handlers = list(logging.getLogger("wandb").handlers)
        self._wandb_run = self._init_wandb(settings, config) if settings.mode != "disabled" else None
        self._dashboard_written: float | None = None  # time.monotonic() of the last write_dashboard

    def _open_append(self, name: str) -> IO[bytes]:
        f = (self.run_dir / name).open("ab+")
        # A crash mid-line leaves a partial last line; end it so the next record starts on its own line.
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                self._write_line(f, b"")
        return f

    @staticmethod
    def _write_line(f: IO[bytes], data: bytes) -> None:
        f.write(data + b"\n")
        f.flush()
        os.fsync(f.fileno())

    def _init_wandb(self, settings: WandbConfig, config: Mapping[str, Any] | None):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "wandb logging needs the wandb package: pip install wandb (or set wandb.mode=disabled)"
            ) from err
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or self.run_dir.name,
            tags=settings.tags or None,
            config=dict(config) if config is not None else None,
            dir=str(self.run_dir),  # wandb writes into <dir>/wandb
            mode=settings.mode,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    @property
    def wandb_run(self):
        """The wandb run (``None`` when disabled); its files are under ``RUN_DIR/wandb``."""
        return self._wandb_run

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one line ``{"step", "time", **metrics}`` to metrics.jsonl (keys: ``metrics_schema``)."""
        step = _check_step(step)
        record: dict[str, Any] = {ms.STEP: step, ms.TIME: time.time()}
        for key, value in metrics.items():
            if key in (ms.STEP, ms.TIME):
                raise ValueError(f"'{key}' is written by RunLog; leave it out of the metrics dict")
            record[str(key)] = _finite_or_none(value, f"metric {key!r}")
        self._write_line(self._metrics, json.dumps(record, allow_nan=False).encode())
        if self._wandb_run is not None:
            self._wandb_run.log(
                {k: v for k, v in record.items() if k not in (ms.STEP, ms.TIME) and v is not None}, step=step
            )

    def log_rollouts(self, step: int, rollouts: Iterable[Mapping[str, Any]]) -> None:
        """Append sampled rollouts (``prompt``, ``response``, ``reward``, ``mismatch``, extras) to rollouts.jsonl."""
        step = _check_step(step)
        lines, rows = [], []
        for i, rollout in enumerate(rollouts):
            missing = [k for k in ("prompt", "response", "reward") if k not in rollout]
            if missing:
                raise ValueError(f"rollout {i} of step {step} has no {', '.join(missing)}")
            record = {ms.STEP: step, **_jsonable(dict(rollout))}
            record[ms.STEP] = step
            lines.append(json.dumps(record, allow_nan=False).encode())
            mm = record.get("mismatch") if isinstance(record.get("mismatch"), dict) else {}
            rows.append(
                [step, str(record["prompt"]), str(record["response"]), record["reward"]]
                + [mm.get(k) for k in ms.ROLLOUT_MISMATCH_KEYS]
            )
        if not lines:
            return
        # One write and one fsync for the whole step.
        self._write_line(self._rollouts, b"\n".join(lines))
        if self._wandb_run is not None:
            import wandb

            columns = [
                "step",
                "prompt",
                "response",
                "reward",
                *(f"mismatch/{k}" for k in ms.ROLLOUT_MISMATCH_KEYS),
            ]
            self._wandb_run.log({"rollouts": wandb.Table(columns=columns, data=rows)}, step=step)

    def write_dashboard(self, every_s: float = 0.0) -> Path | None:
        """Regenerate ``RUN_DIR/dashboard.html`` from the files written so far; with ``every_s``, only if the
        last regeneration is that many seconds old (a page re-reads the whole run: 0.08 s and 5 MB by the
        default run's step 250, growing with the run), else None."""
        from rlplat.dashboard.render import render_dashboard

        now = time.monotonic()
        if self._dashboard_written is not None and now - self._dashboard_written < every_s:
            return None
        self._dashboard_written = now
        return render_dashboard(self.run_dir)

    def close(self) -> None:
        for f in (self._metrics, self._rollouts):
            if not f.closed:
                f.close()
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.finish()
            # finish() leaves wandb's service process and WANDB_SERVICE behind for the next run in this process;
            # a run log is the process's only wandb user, so its end is wandb's end
            wandb.teardown()
            self._wandb_run = None
            wandb_log = logging.getLogger("wandb")
            for handler in [h for h in wandb_log.handlers if h not in self._wandb_log_handlers]:
                wandb_log.removeHandler(handler)
                handler.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
