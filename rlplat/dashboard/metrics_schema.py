"""The run directory's file formats and the canonical metric keys: the one place the RL loop (writer, through
``rlplat.runlog.RunLog``) and the dashboard (reader) agree on names.

A run directory holds:

- ``config.yaml``: the resolved experiment config (shown collapsed on the dashboard). The dashboard also reads
  the feature switches below (``Switch``) from it, to tell a feature that is off from one with no data yet.
- ``metrics.jsonl``: one JSON object per line, one line per step, appended and fsynced as the step ends::

      {"step": 12, "time": 1767225600.5, "reward/mean": 0.41, "accuracy/train": 0.38, "time/train_s": 2.1, ...}

  ``step`` (int >= 0) and ``time`` (Unix seconds, added by ``RunLog``) are always there; every other value is a
  number, or ``null`` for NaN/inf (strict JSON; the chart shows a gap). Line ``k`` is the state after ``k`` RL
  steps (line 0: the starting, e.g. warm-started, policy). Keys are the constants below; a metric the loop does
  not compute is simply absent, and its chart says why: "off in this run" when config.yaml turns its feature
  off, "no data yet" before the first RL step, "not recorded by this run" after it. Extra keys are allowed
  (they appear in the page's "all metrics" table). ``reward/<term>/{calls,errors,timeouts,latency_mean_s,
  latency_max_s,score_mean}`` count the reward workers' calls since the previous line. Metrics logged on
  some steps only (``accuracy/eval`` every ``eval_every`` steps) are absent on the others. If a step appears twice (a resumed run redid it), the later
  line wins. A line cut short by a crash is skipped by the reader and noted on the page.
- ``rollouts.jsonl``: sampled rollouts, one JSON object per rollout, appended per step (``response`` is the
  decoded text; the page shows an empty one as ∅ and marks special tokens, whitespace and control characters
  visibly)::

      {"step": 12, "prompt": "What is 3+4?", "response": "7", "reward": 1.0,
       "mismatch": {"num_tokens": 2, "max_abs_dlogp": 0.0, "mean_abs_dlogp": 0.0, "kl": 0.0,
                    "masked_fraction": 0.0}}

  ``mismatch`` is the per-token train–inference comparison of that response (``|log pi_train - log
  pi_rollout|`` over its tokens, k3 KL(pi_rollout || pi_train), share of tokens IcePop masked); see
  ``rlplat.runlog.mismatch_summary``. Extra keys (``correct``, ``policy_version``, ...) are kept and shown.
- ``tokenizer/tokenizer.json`` (runs from a preset): its special tokens are the ones the page marks.
- ``dashboard.html``: written by ``RunLog.write_dashboard`` / ``rlplat.dashboard.render_dashboard``.
- ``wandb/``: the wandb run (offline by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
CONFIG_FILE = "config.yaml"
DASHBOARD_FILE = "dashboard.html"
WANDB_DIR = "wandb"
TOKENIZER_FILE = "tokenizer/tokenizer.json"

STEP = "step"
TIME = "time"

REWARD_MEAN = "reward/mean"
REWARD_EVAL_MEAN = "reward/eval_mean"
# Share of samples correct by ``rewards.runner.term_passes`` (a verdict, else score >= the term's
# correct_threshold, so plain-float rewards have one too); absent when no term counts toward accuracy.
ACCURACY_TRAIN = "accuracy/train"
ACCURACY_EVAL = "accuracy/eval"
KL_REF = "kl/ref"
MISMATCH_MAX_ABS_DLOGP = "mismatch/max_abs_dlogp"
MISMATCH_MEAN_ABS_DLOGP = "mismatch/mean_abs_dlogp"
MISMATCH_KL = "mismatch/kl"
# share of (response token, MoE layer) pairs routed to a different expert set by rollout and trainer
MISMATCH_ROUTING = "mismatch/routing_disagreement"
ICEPOP_MASKED_FRACTION = "icepop/masked_fraction"
ENTROPY_MEAN = "entropy/mean"
RESPONSE_LENGTH_MEAN = "response/length_mean"
THROUGHPUT_ROLLOUT = "throughput/rollout_tokens_per_s"
THROUGHPUT_TRAIN = "throughput/train_tokens_per_s"
TIME_ROLLOUT = "time/rollout_s"
TIME_REWARD = "time/reward_s"
TIME_TRAIN = "time/train_s"
TIME_WEIGHT_SYNC = "time/weight_sync_s"
TIME_CHECKPOINT = "time/checkpoint_s"
# The trainer's report, logged by the loop under "train/" (rlplat.train.trainer).
TRAIN_LOSS = "train/loss"
TRAIN_GRAD_NORM = "train/grad_norm"  # before gradient clipping
TRAIN_LR = "train/lr"
TRAIN_CLIP_FRAC = "train/clip_frac"  # any of the three below
TRAIN_CLIP_FRAC_LOW = "train/clip_frac_low"
TRAIN_CLIP_FRAC_HIGH = "train/clip_frac_high"
TRAIN_CLIP_FRAC_DUAL = "train/clip_frac_dual"
TRAIN_KL_IN_REWARD = "train/kl_in_reward"  # algo.kl.mode: reward (kl/ref is the loss-mode KL)
REWARD_ERRORS = "reward/errors"  # samples of the step whose reward raised or timed out
# Mean score of one reward term per step; ``term`` is the term's rewards.terms label (or name).
REWARD_TERM_MEAN = "reward/{term}_mean"
REWARD_TERM_ERRORS = "reward/{term}_errors"  # samples of the step on which that term raised or timed out
STREAM_UNDELIVERED = "stream/undelivered"  # async mode: entries published, not yet read
STREAM_PENDING = "stream/pending"  # async mode: read, not yet acked by a checkpoint
# the reward workers' calls since the previous line, over every reward term (per term: reward/<term>/...)
REWARD_CALL_ERRORS = "reward/call_errors"
REWARD_TIMEOUTS = "reward/timeouts"
REWARD_LATENCY_MEAN = "reward/latency_mean_s"
REWARD_LATENCY_MAX = "reward/latency_max_s"

# Keys of a rollout record and of its ``mismatch`` summary.
ROLLOUT_KEYS = ("step", "prompt", "response", "reward", "mismatch")
ROLLOUT_MISMATCH_KEYS = ("num_tokens", "max_abs_dlogp", "mean_abs_dlogp", "kl", "masked_fraction")


@dataclass(frozen=True)
class Switch:
    """A config.yaml setting that decides whether a metric is logged at all. The metric is off when the
    setting is in config.yaml and ``on(value)`` is false; a setting missing from the file (an older or
    hand-written config) decides nothing, and the chart says "no data yet" or "not recorded by this run"."""

    path: str  # dotted key path in config.yaml
    on: Callable[[Any], bool]
    off: str  # what being off means, shown on the chart: "<off> (<path>: <value>)"


EVAL = Switch("run.eval_every", lambda v: v != 0, "no held-out eval")
KL = Switch("algo.kl.mode", lambda v: v != "none", "no reference policy")
ICEPOP = Switch("algo.correction.method", lambda v: v == "icepop", "IcePop is not the correction")
ASYNC = Switch("run.mode", lambda v: v == "async", "no experience stream in sync mode")
ROUTING = Switch("rollout.record_routing", lambda v: bool(v), "routing is not recorded")


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    switch: Switch | None = None


@dataclass(frozen=True)
class Chart:
    """One chart. A ``per_term`` chart adds one series per reward term after ``series``, its key the
    ``per_term`` template (``REWARD_TERM_MEAN``, ``REWARD_TERM_ERRORS``) filled with the term; the terms are
    found at render time (config.yaml's rewards.terms, and any ``REWARD_TERM_MEAN`` key in metrics.jsonl)."""

    id: str
    title: str
    y_title: str
    series: tuple[Series, ...]
    kind: Literal["line", "stacked_bar"] = "line"
    switch: Switch | None = None
    per_term: str | None = None


CHARTS: tuple[Chart, ...] = (
    Chart(
        "reward",
        "Reward",
        "mean reward",
        (Series(REWARD_MEAN, "train"), Series(REWARD_EVAL_MEAN, "eval", EVAL)),
    ),
    Chart(
        "accuracy",
        "Accuracy",
        "accuracy",
        (Series(ACCURACY_TRAIN, "train"), Series(ACCURACY_EVAL, "held-out eval", EVAL)),
    ),
    Chart(
        "reward_terms",
        "Reward terms",
        "mean score of the term",
        (),
        per_term=REWARD_TERM_MEAN,
    ),
    Chart(
        "reward_errors",
        "Reward errors",
        "samples (raised or timed out)",
        (Series(REWARD_ERRORS, "errors"),),
        per_term=REWARD_TERM_ERRORS,
    ),
    Chart("loss", "Loss", "policy loss + KL and entropy terms", (Series(TRAIN_LOSS, "loss"),)),
    Chart("grad_norm", "Gradient norm", "‖g‖₂ before clipping", (Series(TRAIN_GRAD_NORM, "grad norm"),)),
    Chart("lr", "Learning rate", "learning rate", (Series(TRAIN_LR, "lr"),)),
    Chart(
        "clip_frac",
        "Clip fractions",
        "share of tokens clipped",
        (
            Series(TRAIN_CLIP_FRAC, "any"),
            Series(TRAIN_CLIP_FRAC_LOW, "low (A < 0)"),
            Series(TRAIN_CLIP_FRAC_HIGH, "high (A > 0)"),
            Series(TRAIN_CLIP_FRAC_DUAL, "dual (A < 0)"),
        ),
    ),
    Chart(
        "kl_ref",
        "KL to the reference",
        "KL(π ‖ π_ref)",
        (Series(KL_REF, "in the loss"), Series(TRAIN_KL_IN_REWARD, "in the reward")),
        switch=KL,
    ),
    Chart(
        "mismatch_dlogp",
        "Train–inference mismatch |Δlogp|",
        "|log π_train − log π_rollout|",
        (Series(MISMATCH_MAX_ABS_DLOGP, "max"), Series(MISMATCH_MEAN_ABS_DLOGP, "mean")),
    ),
    Chart("mismatch_kl", "Mismatch KL", "KL(π_rollout ‖ π_train)", (Series(MISMATCH_KL, "mismatch KL"),)),
    Chart(
        "routing_disagreement",
        "Routing disagreement",
        "share of (token, MoE layer) pairs with another expert set",
        (Series(MISMATCH_ROUTING, "rollout vs trainer"),),
        switch=ROUTING,
    ),
    Chart(
        "icepop",
        "IcePop masked fraction",
        "share of tokens masked",
        (Series(ICEPOP_MASKED_FRACTION, "masked fraction"),),
        switch=ICEPOP,
    ),
    Chart(
        "reward_failures",
        "Reward calls that failed",
        "calls per step",
        (Series(REWARD_TIMEOUTS, "timed out"), Series(REWARD_CALL_ERRORS, "raised or returned an error")),
    ),
    Chart(
        "reward_latency",
        "Reward latency",
        "seconds per call",
        (Series(REWARD_LATENCY_MEAN, "mean"), Series(REWARD_LATENCY_MAX, "max")),
    ),
    Chart("entropy", "Entropy", "mean token entropy (nats)", (Series(ENTROPY_MEAN, "entropy"),)),
    Chart("response_length", "Response length", "tokens", (Series(RESPONSE_LENGTH_MEAN, "mean length"),)),
    Chart(
        "throughput",
        "Throughput",
        "tokens/s",
        (Series(THROUGHPUT_ROLLOUT, "rollout"), Series(THROUGHPUT_TRAIN, "training")),
    ),
    Chart(
        "step_time",
        "Step time breakdown",
        "seconds",
        (
            Series(TIME_ROLLOUT, "rollout"),
            Series(TIME_REWARD, "reward"),
            Series(TIME_TRAIN, "train"),
            Series(TIME_WEIGHT_SYNC, "weight sync"),
            Series(TIME_CHECKPOINT, "checkpoint"),
        ),
        kind="stacked_bar",
    ),
    Chart(
        "stream",
        "Async experience stream",
        "entries",
        (Series(STREAM_UNDELIVERED, "not yet read"), Series(STREAM_PENDING, "read, not yet acked")),
        switch=ASYNC,
    ),
)

CANONICAL_KEYS: tuple[str, ...] = tuple(s.key for chart in CHARTS for s in chart.series)
