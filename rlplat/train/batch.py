"""``TrainBatch``: what the controller hands the trainer for one optimizer step.

Legend: B sequences (n responses per prompt stored contiguously, rows g*n .. g*n+n-1), T positions.
Every [B, T] tensor is aligned with the model's output positions: position t of row b predicts token
``input_ids_BT[b, t + 1]``. So ``response_mask_BT[b, t]`` is 1 when that next token is a response token,
``rollout_logp_BT[b, t]`` is the rollout's log-prob of it, and the last column is always masked (nothing
follows it). Prompt and response are concatenated and right-padded; any pad id works (padding is masked).

Bad input, one policy:
- structural errors (shapes, dtypes, ids outside the vocabulary, a mask on the last column, rewards and
  advantages both or neither given, a batch that is not whole groups, a batch with no response token at all)
  raise ``ValueError`` at construction (``__post_init__``), saying what to fix;
- an empty response (no masked token) is legal: it carries no loss and is counted in the metrics;
- non-finite rewards, advantages or log-probs at response tokens are found by ``bad_rows``; the trainer then
  raises, or (``trainer.bad_samples: skip``) drops the sample's whole group and records it. NaN at padding is
  ignored (the algos never read padding).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


def _tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"TrainBatch.{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


@dataclass
class TrainBatch:
    input_ids_BT: torch.Tensor  # int64 prompt + response, right-padded
    response_mask_BT: torch.Tensor  # bool/0-1: the target input_ids[b, t+1] is a response token
    rollout_logp_BT: torch.Tensor  # float: rollout log-prob of input_ids[b, t+1]
    group_size: int = 1  # responses per prompt
    rewards_B: torch.Tensor | None = None  # raw scalar rewards; the trainer computes advantages
    advantages_BT: torch.Tensor | None = None  # or precomputed per-token advantages
    correctness_B: torch.Tensor | None = None  # raw correctness for dynamic sampling (default: rewards_B)
    sentence_ids_BT: torch.Tensor | None = None  # LPO: sentence id of each target token
    old_logp_BT: torch.Tensor | None = None  # pi_old log-probs the caller already recomputed
    policy_version: int = 0  # weight version the rollout sampled with

    def __post_init__(self) -> None:
        ids = _tensor("input_ids_BT", self.input_ids_BT)
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"TrainBatch.input_ids_BT must be an integer [B, T] tensor, got {ids.dtype} {tuple(ids.shape)}"
            )
        B, T = ids.shape
        if B == 0 or T < 2:
            raise ValueError(f"TrainBatch needs B >= 1 rows of T >= 2 tokens, got {tuple(ids.shape)}")
        mask = _tensor("response_mask_BT", self.response_mask_BT)
        if mask.shape != ids.shape:
            raise ValueError(
                f"TrainBatch.response_mask_BT has shape {tuple(mask.shape)}, expected {tuple(ids.shape)} "
                "(same as input_ids_BT)"
            )
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or not ((mask == 0) | (mask == 1)).all():
                raise ValueError("TrainBatch.response_mask_BT must be bool or hold only integer 0/1")
            self.response_mask_BT = mask = mask != 0
        if mask[:, -1].any():
            raise ValueError(
                "TrainBatch.response_mask_BT is set in the last column, which predicts no token: position t "
                "scores input_ids[:, t + 1], so shift the response mask left by one"
            )
        if not mask.any():
            raise ValueError("TrainBatch has no response token at all (response_mask_BT is all 0)")
        self._check_float("rollout_logp_BT", self.rollout_logp_BT, (B, T))
        if (self.rewards_B is None) == (self.advantages_BT is None):
            raise ValueError("TrainBatch needs exactly one of rewards_B (raw rewards) and advantages_BT")
        if self.rewards_B is not None:
            self._check_float("rewards_B", self.rewards_B, (B,), allow_int=True)
        if self.advantages_BT is not None:
            self._check_float("advantages_BT", self.advantages_BT, (B, T))
        if self.old_logp_BT is not None:
            self._check_float("old_logp_BT", self.old_logp_BT, (B, T))
        if self.correctness_B is not None:
            self._check_float("correctness_B", self.correctness_B, (B,), allow_int=True)
        if self.sentence_ids_BT is not None:
            s = _tensor("sentence_ids_BT", self.sentence_ids_BT)
            if s.shape != (B, T) or s.is_floating_point() or s.dtype == torch.bool:
                raise ValueError(
                    f"TrainBatch.sentence_ids_BT must be an integer [B, T] = {(B, T)} tensor, "
                    f"got {s.dtype} {tuple(s.shape)}"
                )
        if not isinstance(self.group_size, int) or self.group_size < 1 or B % self.group_size:
            raise ValueError(
                f"TrainBatch: B={B} rows must be whole groups of group_size={self.group_size} "
                "(n responses per prompt, stored contiguously)"
            )
        if not isinstance(self.policy_version, int) or self.policy_version < 0:
            raise ValueError(f"TrainBatch.policy_version must be an int >= 0, got {self.policy_version!r}")

    @staticmethod
    def _check_float(name: str, x: object, shape: tuple[int, ...], allow_int: bool = False) -> None:
        x = _tensor(name, x)
        if tuple(x.shape) != shape:
            raise ValueError(f"TrainBatch.{name} has shape {tuple(x.shape)}, expected {shape}")
        if not (x.is_floating_point() or allow_int):
            raise ValueError(f"TrainBatch.{name} must be a floating-point tensor, got {x.dtype}")

    @property
    def batch_size(self) -> int:
        return self.input_ids_BT.shape[0]

    @property
    def targets_BT(self) -> torch.Tensor:
        """input_ids shifted left by one; the last column (always masked) repeats the last token."""
        ids = self.input_ids_BT.long()
        return torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)

    @property
    def lengths_B(self) -> torch.Tensor:
        """Real tokens per row (prompt + response): the last scored target's index + 1; 0 for empty responses."""
        T = self.input_ids_BT.shape[1]
        pos_BT = torch.arange(T, device=self.input_ids_BT.device).expand_as(self.response_mask_BT)
        return torch.where(self.response_mask_BT, pos_BT + 2, 0).amax(dim=1)

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask_BT.sum())

    def bad_rows(self) -> torch.Tensor:
        """Bool [B]: rows with a non-finite reward, advantage or log-prob at a response token."""
        m = self.response_mask_BT
        bad = torch.zeros(self.batch_size, dtype=torch.bool, device=m.device)
        for x in (self.rollout_logp_BT, self.advantages_BT, self.old_logp_BT):
            if x is not None:
                bad |= (~torch.isfinite(x) & m).any(dim=1)
        for x in (self.rewards_B, self.correctness_B):
            if x is not None and x.is_floating_point():
                bad |= ~torch.isfinite(x)
        return bad

    def to(self, device: torch.device | str) -> TrainBatch:
        """The batch with every tensor on ``device`` (no copy when already there)."""
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **changes)

    def select(self, rows: torch.Tensor) -> TrainBatch:
        """The sub-batch of ``rows`` (int indices); group_size is kept if rows are whole groups, else 1."""
        rows = rows.to(self.input_ids_BT.device).long()
        n = self.group_size
        whole = len(rows) % n == 0 and bool(
            (rows.view(-1, n) == rows.view(-1, n)[:, :1] + torch.arange(n, device=rows.device)).all()
            and (rows.view(-1, n)[:, 0] % n == 0).all()
        )
        changes = {
            f.name: getattr(self, f.name)[rows]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **changes, group_size=n if whole else 1)
