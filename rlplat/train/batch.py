"""``SampleGroups``, the compact form rollout workers return samples in, and ``TrainBatch``, the padded batch of
one optimizer step, which each trainer rank builds from them (``TrainBatch.from_groups``).

Legend: B sequences (n responses per prompt stored contiguously, rows g*n .. g*n+n-1), T positions; for
``SampleGroups``: G prompts, S = G·n samples, P prompt tokens and R response tokens in all; L MoE layers and
k experts per token in routing records.
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

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch


@dataclass
class SampleGroups:
    """n samples for each of G prompts, in prompt order (sample j of prompt g is sample g·n + j), packed: token
    ids and log-probs concatenated, with their lengths, no padding. This is what travels between workers (as
    a Ray object ref) instead of a padded batch."""

    prompt_ids_P: torch.Tensor  # int64: the G prompts' token ids, concatenated
    prompt_lengths_G: torch.Tensor  # int64, each ≥ 1
    response_ids_R: torch.Tensor  # int64: the S responses' token ids, concatenated
    response_logp_R: torch.Tensor  # float32: the rollout's log-prob of each response token
    response_lengths_S: torch.Tensor  # int64
    versions_S: torch.Tensor  # int64: policy version that generated each sample
    texts: list[str] | None = None  # the S responses decoded (what text rewards read)
    # int16 expert ids of each response token's scoring position (engines that record routing), else None
    response_routes_RLk: torch.Tensor | None = None

    def __post_init__(self) -> None:
        G, S = len(self.prompt_lengths_G), len(self.response_lengths_S)
        if G == 0 or S % G or self.prompt_lengths_G.min() < 1:
            raise ValueError(
                f"SampleGroups needs non-empty prompts and n samples each, got {G} prompts, {S} samples"
            )
        if int(self.prompt_lengths_G.sum()) != len(self.prompt_ids_P):
            raise ValueError("SampleGroups.prompt_lengths_G does not add up to prompt_ids_P")
        R = int(self.response_lengths_S.sum())
        if len(self.response_ids_R) != R or len(self.response_logp_R) != R:
            raise ValueError(
                "SampleGroups.response_lengths_S does not add up to response_ids_R / response_logp_R"
            )
        if len(self.versions_S) != S or (self.texts is not None and len(self.texts) != S):
            raise ValueError(f"SampleGroups needs one version (and text) per sample, {S} samples")
        routes = self.response_routes_RLk
        if routes is not None and (routes.dim() != 3 or len(routes) != R):
            raise ValueError(
                f"SampleGroups.response_routes_RLk must be [R={R}, L, k] (one record per response token), "
                f"got {tuple(routes.shape)}"
            )

    @classmethod
    def pack(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        logprobs: Sequence[torch.Tensor],
        versions: Sequence[int],
        texts: Sequence[str] | None = None,
        routes: Sequence[torch.Tensor] | None = None,
    ) -> SampleGroups:
        """From per-prompt and per-sample lists (``len(responses)`` a multiple of ``len(prompts)``);
        ``routes``: per sample, expert ids [len(response), L, k], or None when not recorded."""
        long = lambda xs: torch.tensor(list(xs), dtype=torch.long)
        return cls(
            long(t for p in prompts for t in p),
            long(map(len, prompts)),
            long(t for r in responses for t in r),
            torch.cat([lp.float().reshape(-1) for lp in logprobs]) if logprobs else torch.zeros(0),
            long(map(len, responses)),
            long(versions),
            None if texts is None else list(texts),
            None if routes is None else torch.cat(list(routes)).to(torch.int16),
        )

    @property
    def num_groups(self) -> int:
        return len(self.prompt_lengths_G)

    @property
    def group_size(self) -> int:
        return len(self.response_lengths_S) // self.num_groups

    def responses(self) -> list[list[int]]:
        """Each sample's response token ids."""
        return [r.tolist() for r in self.response_ids_R.split(self.response_lengths_S.tolist())]

    def logprobs(self) -> list[torch.Tensor]:
        """Each sample's rollout log-probs."""
        return list(self.response_logp_R.split(self.response_lengths_S.tolist()))


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
    # rollout's expert ids [B, T, L, k] (int16) of the position scoring each target; set at response positions
    rollout_routes_BTLk: torch.Tensor | None = None
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
        routes = self.rollout_routes_BTLk
        if routes is not None and (routes.dim() != 4 or tuple(routes.shape[:2]) != (B, T)):
            raise ValueError(
                f"TrainBatch.rollout_routes_BTLk must be [B, T, L, k] with B, T = {(B, T)}, got "
                f"{tuple(routes.shape)}"
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

    @classmethod
    def from_groups(
        cls,
        parts: Sequence[SampleGroups],
        rewards_B: torch.Tensor,
        correctness_B: torch.Tensor | None = None,
    ) -> TrainBatch:
        """The padded batch of ``parts``, in order: row b is prompt + response of sample b, right-padded with 0;
        the response mask and the rollout log-probs sit at the positions that predict the response tokens.
        ``rewards_B`` / ``correctness_B`` (one per sample) as in the constructor; policy_version: the oldest."""
        n = parts[0].group_size
        if any(p.group_size != n for p in parts):
            raise ValueError(f"TrainBatch.from_groups: every part needs group_size {n} (whole groups)")
        prompt_ids = torch.cat([p.prompt_ids_P for p in parts])
        prompt_len_G = torch.cat([p.prompt_lengths_G for p in parts])
        resp_ids = torch.cat([p.response_ids_R for p in parts])
        resp_logp = torch.cat([p.response_logp_R for p in parts]).float()
        resp_len_B = torch.cat([p.response_lengths_S for p in parts])
        plen_B = prompt_len_G.repeat_interleave(n)
        pstart_B = (prompt_len_G.cumsum(0) - prompt_len_G).repeat_interleave(n)
        rstart_B = resp_len_B.cumsum(0) - resp_len_B
        B, T = len(resp_len_B), int((plen_B + resp_len_B).max())
        t_BT = torch.arange(T).expand(B, T)
        in_prompt_BT = t_BT < plen_B[:, None]
        in_resp_BT = ~in_prompt_BT & (t_BT < (plen_B + resp_len_B)[:, None])
        input_ids_BT = torch.zeros(B, T, dtype=torch.long)
        input_ids_BT[in_prompt_BT] = prompt_ids[(pstart_B[:, None] + t_BT)[in_prompt_BT]]
        input_ids_BT[in_resp_BT] = resp_ids[(rstart_B[:, None] - plen_B[:, None] + t_BT)[in_resp_BT]]
        # position t predicts token t + 1: the response mask and log-probs are the response's, one to the left
        mask_BT = torch.zeros(B, T, dtype=torch.bool)
        mask_BT[:, :-1] = in_resp_BT[:, 1:]
        rollout_logp_BT = torch.zeros(B, T)
        resp_index = (rstart_B[:, None] - plen_B[:, None] + 1 + t_BT)[mask_BT]
        rollout_logp_BT[mask_BT] = resp_logp[resp_index]
        routes_BTLk = None
        if all(p.response_routes_RLk is not None for p in parts):  # routing recorded on every worker
            routes_RLk = torch.cat([p.response_routes_RLk for p in parts])  # type: ignore[misc]
            routes_BTLk = routes_RLk.new_zeros(B, T, *routes_RLk.shape[1:])
            routes_BTLk[mask_BT] = routes_RLk[resp_index]
        return cls(
            input_ids_BT,
            mask_BT,
            rollout_logp_BT,
            group_size=n,
            rewards_B=rewards_B,
            correctness_B=correctness_B,
            policy_version=int(torch.cat([p.versions_S for p in parts]).min()),
            rollout_routes_BTLk=routes_BTLk,
        )

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
