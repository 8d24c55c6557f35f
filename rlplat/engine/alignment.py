"""Rollout–trainer alignment: sample with a rollout backend, rescore the same tokens with the trainer's forward.

The trainer's forward is ``model.token_logprobs`` over prompt + response, all sequences in one right-padded
batch, at the sampling temperature: exactly what the trainer computes for its loss. The report compares the
two log-probs of every response token:
- ``max_abs_logprob_diff`` / ``mean_abs_logprob_diff``: |trainer − rollout|;
- ``mismatch_kl``: the k3 estimator of KL(rollout ‖ trainer), mean over tokens of r − 1 − log r with
  r = exp(trainer − rollout) (samples come from the rollout policy, so this is unbiased and ≥ 0), with
  trainer − rollout bounded by 20 as in the trainer's ``mismatch/kl`` (``rlplat.algos.ratios``), so one wild
  token gives a large finite number, not inf (which JSON cannot carry);
- ``exact``: every log-prob bitwise equal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

import kernels
from rlplat.algos.ratios import MAX_LOG_RATIO
from rlplat.engine.backend import RolloutBackend
from rlplat.engine.config import AlignmentConfig, SamplingParams
from rlplat.engine.sample import Sample
from rlplat.models import RingLinearForCausalLM


def alignment_requests(
    alignment: AlignmentConfig, sampling: SamplingParams, vocab_size: int, special_ids: Sequence[int] = ()
) -> tuple[list[list[int]], list[SamplingParams]]:
    """Random prompts of mixed lengths (no special tokens) and per-prompt sampling with mixed response budgets."""
    gen = torch.Generator().manual_seed(alignment.seed)
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(special_ids)))
    (p_lo, p_hi), (m_lo, m_hi) = alignment.prompt_length, alignment.max_new_tokens
    prompts, params = [], []
    for _ in range(alignment.num_prompts):
        length = int(torch.randint(p_lo, p_hi + 1, (), generator=gen))
        prompts.append(allowed[torch.randint(len(allowed), (length,), generator=gen)].tolist())
        budget = int(torch.randint(m_lo, m_hi + 1, (), generator=gen))
        params.append(
            SamplingParams.model_validate(
                {**sampling.model_dump(), "n": alignment.n, "seed": alignment.seed, "max_new_tokens": budget}
            )
        )
    return prompts, params


@torch.no_grad()
def trainer_logprobs(
    model: RingLinearForCausalLM, samples: Sequence[Sample], temperature: float
) -> list[torch.Tensor]:
    """Each sample's response-token log-probs from one padded forward over prompt + response."""
    device = model.lm_head.weight.device
    seqs = [s.prompt_tokens + s.tokens for s in samples]
    T = max(len(s) for s in seqs) - 1
    ids_BT = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    targets_BT = torch.zeros_like(ids_BT)
    for i, seq in enumerate(seqs):
        ids_BT[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        targets_BT[i, : len(seq) - 1] = torch.tensor(seq[1:])
    logp_BT, _ = model.token_logprobs(ids_BT, targets_BT, temperature)
    out = []
    for i, s in enumerate(samples):
        start = len(s.prompt_tokens) - 1  # position whose next token is the first response token
        out.append(logp_BT[i, start : start + len(s.tokens)].cpu())
    return out


def compare(rollout: Sequence[torch.Tensor], trainer: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Diff statistics of two lists of per-sequence log-prob tensors (see the module docstring)."""
    exact = all(torch.equal(a, b) for a, b in zip(rollout, trainer))
    r = torch.cat(list(rollout)).double()
    t = torch.cat(list(trainer)).double()
    log_ratio = t - r
    clamped = log_ratio.clamp_max(MAX_LOG_RATIO)  # below, exp underflows to 0 and k3 ~ -log_ratio - 1
    return {
        "num_sequences": len(rollout),
        "num_tokens": int(r.numel()),
        "max_abs_logprob_diff": float(log_ratio.abs().max()) if r.numel() else 0.0,
        "mean_abs_logprob_diff": float(log_ratio.abs().mean()) if r.numel() else 0.0,
        "mismatch_kl": float((clamped.exp() - 1 - clamped).mean()) if r.numel() else 0.0,
        "exact": exact,
    }


def check_alignment(
    backend: RolloutBackend,
    trainer: RingLinearForCausalLM,
    prompts: Sequence[Sequence[int]],
    sampling: Sequence[SamplingParams],
    *,
    rollout_batch_invariant: bool | None = None,
    trainer_batch_invariant: bool | None = None,
) -> dict[str, Any]:
    """Sample with ``backend``, rescore with ``trainer``; each side runs in its own kernel mode (None: the
    process's), as a rollout worker and a trainer worker do in their own processes."""
    temperatures = {sp.logprob_temperature for sp in sampling}
    if len(temperatures) != 1:
        raise ValueError(
            f"check_alignment needs one temperature for all prompts (the trainer's), got {temperatures}"
        )
    with kernels.kernel_mode(batch_invariant=rollout_batch_invariant):
        samples = [s for group in backend.generate(prompts, sampling) for s in group]
    with kernels.kernel_mode(batch_invariant=trainer_batch_invariant):
        rescored = trainer_logprobs(trainer, samples, temperatures.pop())
    report = compare([s.logprobs for s in samples], rescored)
    report["finish_reasons"] = dict(Counter(s.finish_reason for s in samples))
    report["policy_version"] = backend.version
    return report
