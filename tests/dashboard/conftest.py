import math
import random

import pytest

from rlplat.dashboard import metrics_schema as M
from rlplat.runlog import RunLog, mismatch_summary

STEPS = 20
EVAL_EVERY = 5
ROLLOUTS_PER_STEP = 4
# Every feature the dashboard charts is on: async stream, eval, KL in the loss, IcePop, two reward terms.
FULL_CONFIG = """\
run:
  name: synthetic
  seed: 0
  mode: async
  eval_every: 5
algo:
  kl: {mode: loss, coef: 0.01, estimator: k3}
  correction: {method: icepop}
rollout: {record_routing: true}
rewards:
  terms:
    - {name: math, weight: 1.0}
    - {name: think_format, weight: 0.2, label: format}
"""


def synthetic_metrics(step: int, rng: random.Random) -> dict[str, float]:
    """A run that learns: accuracy rises, entropy falls, a checkpoint every 5 steps."""
    acc = min(1.0, 0.15 + 0.035 * step + rng.uniform(-0.03, 0.03))
    metrics = {
        M.REWARD_MEAN: acc + rng.uniform(-0.02, 0.02),
        M.ACCURACY_TRAIN: acc,
        M.KL_REF: 0.002 * step * (1 + rng.uniform(-0.1, 0.1)),
        M.MISMATCH_MAX_ABS_DLOGP: 0.05 + rng.uniform(0, 0.05),
        M.MISMATCH_MEAN_ABS_DLOGP: 0.004 + rng.uniform(0, 0.002),
        M.MISMATCH_KL: 1e-4 * (1 + rng.random()),
        M.MISMATCH_ROUTING: 0.01 * rng.random(),
        M.ICEPOP_MASKED_FRACTION: 0.001 * rng.random(),
        M.ENTROPY_MEAN: 1.6 * math.exp(-step / 30) + rng.uniform(0, 0.05),
        M.RESPONSE_LENGTH_MEAN: 24 + 0.8 * step + rng.uniform(-2, 2),
        M.THROUGHPUT_ROLLOUT: 900 + rng.uniform(-50, 50),
        M.THROUGHPUT_TRAIN: 2800 + rng.uniform(-100, 100),
        M.TIME_ROLLOUT: 1.2 + rng.uniform(0, 0.2),
        M.TIME_REWARD: 0.1,
        M.TIME_TRAIN: 2.0 + rng.uniform(0, 0.3),
        M.TIME_WEIGHT_SYNC: 0.15,
        M.TIME_CHECKPOINT: 0.8 if step % 5 == 4 else 0.0,
        M.TRAIN_LOSS: 0.05 * math.exp(-step / 10) + rng.uniform(-0.01, 0.01),
        M.TRAIN_GRAD_NORM: 0.8 + rng.uniform(-0.2, 0.2),
        M.TRAIN_LR: 4e-4 * (1 - step / STEPS),
        M.TRAIN_CLIP_FRAC_LOW: 0.01 * rng.random(),
        M.TRAIN_CLIP_FRAC_HIGH: 0.02 * rng.random(),
        M.TRAIN_CLIP_FRAC_DUAL: 0.0,
        M.REWARD_ERRORS: rng.randint(0, 2),
        M.REWARD_TERM_MEAN.format(term="math"): acc,
        M.REWARD_TERM_MEAN.format(term="format"): 0.9 + rng.uniform(-0.05, 0.05),
        M.STREAM_UNDELIVERED: rng.randint(0, 64),
        M.STREAM_PENDING: 32,
        M.REWARD_TIMEOUTS: float(rng.random() < 0.1),
        M.REWARD_CALL_ERRORS: 0.0,
        M.REWARD_LATENCY_MEAN: 0.02 + rng.uniform(0, 0.01),
        M.REWARD_LATENCY_MAX: 0.05 + rng.uniform(0, 0.05),
    }
    metrics[M.TRAIN_CLIP_FRAC] = metrics[M.TRAIN_CLIP_FRAC_LOW] + metrics[M.TRAIN_CLIP_FRAC_HIGH]
    if step % EVAL_EVERY == 0:
        metrics[M.ACCURACY_EVAL] = acc - 0.05
        metrics[M.REWARD_EVAL_MEAN] = acc - 0.04
    return metrics


def synthetic_rollouts(step: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(ROLLOUTS_PER_STEP):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        answer = a + b if rng.random() < 0.2 + 0.03 * step else a + b + 1
        n = rng.randint(3, 9)
        rollout_logp = [-rng.random() for _ in range(n)]
        train_logp = [x + rng.uniform(-0.02, 0.02) for x in rollout_logp]
        out.append(
            {
                "prompt": f"Q{i}: What is {a} + {b}? Answer with <answer>N</answer>.",
                "response": f"{a} + {b} = {answer}\n<answer>{answer}</answer>",
                "reward": float(answer == a + b),
                "mismatch": mismatch_summary(train_logp, rollout_logp, [True] * n),
                "policy_version": step,
            }
        )
    return out


def write_synthetic_run(run_dir, steps: int = STEPS, seed: int = 0) -> None:
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / M.CONFIG_FILE).write_text(FULL_CONFIG)
    with RunLog(run_dir, wandb={"mode": "disabled"}) as log:
        for step in range(steps):
            log.log_rollouts(step, synthetic_rollouts(step, rng))
            log.log_metrics(step, synthetic_metrics(step, rng))


@pytest.fixture
def synthetic_run(tmp_path):
    run_dir = tmp_path / "run-synthetic"
    write_synthetic_run(run_dir)
    return run_dir


# A sync run as `rlplat run` logs it with its features off: no eval (eval_every 0), no KL (no reference
# policy), no correction (no IcePop), no async stream, and per-term reward means not logged (yet).
OFF_CONFIG = """\
run: {name: sync, mode: sync, eval_every: 0, max_staleness: 1}
algo:
  kl: {mode: none, coef: 0.0, estimator: k3}
  correction: {method: none}
rewards:
  terms:
    - {name: math, weight: 1.0, label: null}
"""
OFF_KEYS = (
    M.KL_REF,
    M.ICEPOP_MASKED_FRACTION,
    M.ACCURACY_EVAL,
    M.REWARD_EVAL_MEAN,
    M.STREAM_UNDELIVERED,
    M.STREAM_PENDING,
    M.REWARD_TERM_MEAN.format(term="math"),
    M.REWARD_TERM_MEAN.format(term="format"),
)
# Responses that plain text would hide (test_browser.SHOWN says what the table must show instead): empty (the
# first token was <eos>, which is not decoded), a decoded special token, whitespace only, a control character.
HIDDEN_RESPONSES = ("", "<eos>", "  \n", "7\x00")


def write_sync_run(run_dir, steps: int = 6, seed: int = 1) -> None:
    from rlplat.data.tokenizers import make_char_tokenizer, save_tokenizer

    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / M.CONFIG_FILE).write_text(OFF_CONFIG)
    save_tokenizer(make_char_tokenizer(), run_dir / "tokenizer")
    with RunLog(run_dir, wandb={"mode": "disabled"}) as log:
        for step in range(1, steps + 1):
            rollouts = [
                {"prompt": f"What is {step} + {i}?", "response": text, "reward": 0.0, "label": str(step + i)}
                for i, text in enumerate(HIDDEN_RESPONSES)
            ]
            log.log_rollouts(step, rollouts)
            metrics = {k: v for k, v in synthetic_metrics(step, rng).items() if k not in OFF_KEYS}
            log.log_metrics(step, metrics)


@pytest.fixture
def sync_run(tmp_path):
    run_dir = tmp_path / "run-sync"
    write_sync_run(run_dir)
    return run_dir
