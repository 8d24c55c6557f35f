"""Async mode: rollout and reward run ahead of training, and their samples reach the trainer through Redis.

A producer thread samples step k (rollout workers, then reward workers) as soon as the trainer has finished
step k − ``max_staleness``, and publishes the step's scored samples to the experience stream
(``rlplat.buffer``), each tagged with its step and the policy version that generated it. The loop's
``take(k)`` reads them back through the stream's consumer group. Steps k and k + 1 therefore overlap:
generation of the next batch runs while the trainer works on this one, with weights at most
``max_staleness`` versions old (0 makes async mode sample exactly like sync mode, one step at a time).

Nothing is lost on a crash, and nothing is trained twice:

- entries are acked only when a checkpoint commits the steps that used them (``commit``), so a trainer
  killed between checkpoints leaves them pending in the group;
- a checkpoint's data position is the next step, and every entry carries its step, so on restart
  (``start``) pending entries of steps below it were committed (their ack was lost in the crash) and are
  acked now, and the rest are handed back to the loop, which trains those steps again on the same samples;
- the producer publishes a step's entries and its progress mark in one transaction, and resumes after the
  mark, so no step is sampled twice or skipped.

Replayed steps reproduce the lost ones: a step's prompts are a function of its index and the training is
deterministic, so the replayed weights (and versions) are the ones the lost trainer had.

A stream entry is one scored sample as JSON (``to_records`` / ``from_records``): its step, prompt and
sample index, response token ids, rollout log-probs (float32 → JSON → float32 is exact), text, reward,
correctness, whether a reward erred, and the step's rollout and reward times; the step's first record also
carries the step's reward summary (per-term means and errors, the first error's text).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch

from actors.reward import Scores
from rewards.summary import RewardSummary
from rlplat.buffer import Entry, ExperienceStream
from rlplat.train.batch import SampleGroups


def to_records(
    parts: list[SampleGroups], scores: Scores, step: int, rollout_s: float, reward_s: float
) -> list[dict]:
    """One JSON-able record per sample of ``parts`` (in order, with its score), for the stream. The step's
    reward summary rides on its first record only (prompt 0, sample 0): it holds error texts, and a step's
    records are published, and read back, together."""
    records = []
    for part in parts:
        n, texts = part.group_size, part.texts or [""] * len(part.response_lengths_S)
        for tokens, logp, text, version in zip(
            part.responses(), part.logprobs(), texts, part.versions_S.tolist(), strict=True
        ):
            k = len(records)
            records.append({
                "step": step, "prompt": k // n, "sample": k % n, "tokens": tokens, "logprobs": logp.tolist(),
                "text": text, "version": version, "score": scores.rewards[k], "correct": scores.correct[k],
                "reward_error": scores.errors[k], "rollout_s": rollout_s, "reward_s": reward_s,
            })  # fmt: skip
    if records:
        records[0]["reward_summary"] = scores.summary.as_dict()
    return records


def from_records(records: list[dict], prompts: list[list[int]]) -> tuple[SampleGroups, Scores]:
    """The samples of a step's records (sorted by prompt and sample) and their scores; ``prompts`` are the
    step's prompt token ids."""
    samples = SampleGroups.pack(
        prompts,
        [r["tokens"] for r in records],
        [torch.tensor(r["logprobs"], dtype=torch.float32) for r in records],
        [r["version"] for r in records],
        [r["text"] for r in records],
    )
    scores = Scores(
        [r["score"] for r in records],
        [r["correct"] for r in records],
        [r["reward_error"] for r in records],
        RewardSummary.from_dict(records[0]["reward_summary"]),
    )
    return samples, scores


class AsyncRollout:
    """The producer thread and the consumer side of one run's experience stream."""

    def __init__(
        self,
        stream: ExperienceStream,
        sample: Callable[[int], tuple[list[dict], int]],
        steps: int,
        max_staleness: int,
    ):
        self.stream, self.sample = stream, sample
        self.steps, self.max_staleness = steps, max_staleness
        self.mark_key = f"{stream.cfg.stream}:last_step"
        self._cond = threading.Condition()
        self._trained = 0  # steps whose update the rollout workers have (the producer may sample ≤ this + s)
        self._stop = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._buffer: dict[int, list[Entry]] = {}
        self._uncommitted: list[str] = []  # ids of trained entries no checkpoint covers yet

    # The consumer side, on the loop's thread.
    def start(self, next_step: int) -> None:
        """Recover what a previous process left in the stream, then start producing."""
        self.rewind(next_step)
        mark = self.stream.client.get(self.mark_key)
        first = next_step if mark is None else max(next_step, int(mark) + 1)
        self._thread = threading.Thread(
            target=self._produce, args=(first,), name="rollout-producer", daemon=True
        )
        self._thread.start()

    def rewind(self, next_step: int) -> None:
        """Continue from ``next_step`` (a checkpoint's): ack committed entries, keep the rest for replay."""
        self._buffer.clear()
        self._uncommitted.clear()
        committed = []
        for entry in self.stream.recover_pending():
            if entry.sample["step"] < next_step:
                committed.append(entry.id)
            else:
                self._buffer.setdefault(entry.sample["step"], []).append(entry)
        self.stream.ack(committed)
        self.trained(next_step)

    def take(self, step: int) -> tuple[list[dict], list[str]]:
        """The records of ``step``'s scored samples (by prompt, then sample) and their entry ids; waits for
        the producer."""
        want = None
        while want is None or len(self._buffer.get(step, [])) < want:
            if self._error is not None:
                raise RuntimeError(f"the rollout producer failed: {self._error}") from self._error
            for entry in self.stream.read(count=1024, block_ms=200):
                self._buffer.setdefault(entry.sample["step"], []).append(entry)
            got = self._buffer.get(step, [])
            want = got[0].sample["samples_in_step"] if got else None
        entries = sorted(self._buffer.pop(step), key=lambda e: (e.sample["prompt"], e.sample["sample"]))
        return [{**e.sample, "version": e.policy_version} for e in entries], [e.id for e in entries]

    def trained(self, steps_done: int, entry_ids: Sequence[str] = ()) -> None:
        """The rollout workers now hold the weights after ``steps_done`` steps; ``entry_ids`` were used."""
        self._uncommitted.extend(entry_ids)
        with self._cond:
            self._trained = steps_done
            self._cond.notify_all()

    def commit(self) -> None:
        """A checkpoint now covers every trained step: ack their entries."""
        self.stream.ack(self._uncommitted)
        self._uncommitted.clear()

    def metrics(self) -> dict[str, int]:
        return self.stream.metrics()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.stream.close()

    # The producer side, on its own thread.
    def _produce(self, first: int) -> None:
        try:
            for step in range(first, self.steps):
                with self._cond:
                    self._cond.wait_for(lambda k=step: self._stop or self._trained >= k - self.max_staleness)
                    if self._stop:
                        return
                started = time.perf_counter()
                flat, version = self.sample(step)
                for s in flat:
                    s["samples_in_step"] = len(flat)
                    s["produce_s"] = time.perf_counter() - started
                self.stream.publish(flat, version, mark=(self.mark_key, str(step)))
        except BaseException as err:  # handed to the loop, which raises it from take()
            self._error = err
