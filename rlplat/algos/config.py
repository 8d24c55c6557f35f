"""Typed config for the ``algo:`` section of an experiment (mounted by the trainer).

Field names mirror the function arguments in ``rlplat.algos``; defaults follow the papers cited in each
module (GRPO advantages, token-mean aggregation, PPO clip 0.2, GSPO 3e-4/4e-4, LPO 0.03, TIS cap 2,
IcePop [0.5, 5]). KL and entropy terms are off by default, as in most RLVR recipes.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AdvantageEstimator = Literal["grpo", "rloo", "reinforce_pp"]
PolicyLossName = Literal["ppo", "gspo", "lpo"]
AggModeName = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLEstimatorName = Literal["k1", "k2", "k3"]
CorrectionMethod = Literal["none", "token_tis", "sequence_tis", "icepop", "sequence_mis"]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClipConfig(_Closed):
    """Clip settings of the PPO loss; the GSPO and LPO subclasses only change the defaults."""

    clip_low: float = Field(
        0.2, ge=0.0, lt=1.0, description="Lower clip eps: ratio is clipped at 1 - clip_low."
    )
    clip_high: float = Field(0.2, ge=0.0, description="Upper clip eps: ratio is clipped at 1 + clip_high.")
    dual_clip: float | None = Field(
        None, gt=1.0, description="Dual-clip constant c > 1 for negative advantages; null disables it."
    )


class GSPOClipConfig(ClipConfig):
    clip_low: float = Field(
        3e-4, ge=0.0, lt=1.0, description="Lower clip eps of the sequence ratio (GSPO: 3e-4)."
    )
    clip_high: float = Field(4e-4, ge=0.0, description="Upper clip eps of the sequence ratio (GSPO: 4e-4).")


class LPOClipConfig(ClipConfig):
    clip_low: float = Field(
        0.03, ge=0.0, lt=1.0, description="Lower clip eps of the sentence ratio (Ling 2.0: 0.03)."
    )
    clip_high: float = Field(
        0.03, ge=0.0, description="Upper clip eps of the sentence ratio (Ling 2.0: 0.03)."
    )


class KLConfig(_Closed):
    mode: Literal["none", "loss", "reward"] = Field(
        "none", description="Where the KL to the reference policy goes: nowhere, the loss, or the reward."
    )
    coef: float = Field(0.0, ge=0.0, description="KL coefficient beta.")
    estimator: KLEstimatorName = Field("k3", description="KL estimator: k1, k2 or k3.")


class CorrectionConfig(_Closed):
    method: CorrectionMethod = Field("none", description="Train–inference mismatch correction.")
    use_rollout_logp_as_old: bool = Field(
        False, description="Use rollout log-probs as pi_old (exact backends) instead of recomputing them."
    )
    tis_cap: float = Field(2.0, gt=0.0, description="Truncation C of token/sequence TIS weights.")
    icepop_alpha: float = Field(0.5, gt=0.0, le=1.0, description="IcePop lower bound on pi_train/pi_rollout.")
    icepop_beta: float = Field(5.0, ge=1.0, description="IcePop upper bound on pi_train/pi_rollout.")
    mis_low: float = Field(0.0, ge=0.0, le=1.0, description="Sequence rejection: lower bound on the ratio.")
    mis_high: float = Field(2.0, ge=1.0, description="Sequence rejection: upper bound on the ratio.")
    mis_ratio: Literal["product", "geometric"] = Field(
        "product", description="Sequence ratio: product of token ratios or their geometric mean."
    )


class AlgoConfig(_Closed):
    advantage_estimator: AdvantageEstimator = Field("grpo", description="Advantage estimator.")
    norm_adv_by_std: bool = Field(True, description="GRPO: divide by the group std (false: Dr.GRPO).")
    adv_eps: float = Field(1e-6, gt=0.0, description="Epsilon added to the std when normalising advantages.")
    policy_loss: PolicyLossName = Field(
        "ppo", description="Policy loss: token ratio, sequence ratio or sentence ratio."
    )
    ppo: ClipConfig = Field(default_factory=ClipConfig, description="Clip settings of the PPO loss.")
    gspo: GSPOClipConfig = Field(
        default_factory=GSPOClipConfig, description="Clip settings of the GSPO loss."
    )
    lpo: LPOClipConfig = Field(default_factory=LPOClipConfig, description="Clip settings of the LPO loss.")
    loss_agg_mode: AggModeName = Field("token-mean", description="How per-token losses become one scalar.")
    loss_agg_max_len: int | None = Field(
        None,
        gt=0,
        description="Constant length for seq-mean-token-sum-norm (usually the max response length).",
    )
    kl: KLConfig = Field(default_factory=KLConfig, description="KL to the reference policy.")
    entropy_coef: float = Field(0.0, ge=0.0, description="Entropy bonus coefficient (0 disables it).")
    correction: CorrectionConfig = Field(
        default_factory=CorrectionConfig, description="Train–inference mismatch correction."
    )
    dynamic_sampling: bool = Field(False, description="Drop groups whose correctness has zero variance.")

    @model_validator(mode="after")
    def _check(self) -> "AlgoConfig":
        if self.loss_agg_mode == "seq-mean-token-sum-norm" and self.loss_agg_max_len is None:
            raise ValueError("loss_agg_mode 'seq-mean-token-sum-norm' needs loss_agg_max_len")
        if self.kl.mode != "none" and self.kl.coef == 0.0:
            raise ValueError(f"kl.mode is {self.kl.mode!r} but kl.coef is 0; set a coefficient or mode: none")
        c = self.correction
        if c.method != "none" and c.use_rollout_logp_as_old:
            raise ValueError(
                f"algo.correction.method={c.method} weighs the trainer's recomputed π_old against the rollout's "
                "log-probs, but use_rollout_logp_as_old makes π_old those very log-probs, so it would do nothing: "
                "set algo.correction.use_rollout_logp_as_old=false (or method=none)"
            )
        return self

    def clip(self) -> ClipConfig:
        """Clip settings of the selected policy loss."""
        return getattr(self, self.policy_loss)
