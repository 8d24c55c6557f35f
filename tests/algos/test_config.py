from typing import get_args

import pytest
from pydantic import ValidationError

from rlplat.algos.aggregation import AGG_MODES
from rlplat.algos.config import AggModeName, AlgoConfig, KLEstimatorName
from rlplat.algos.kl import KL_ESTIMATORS


def test_defaults_validate_and_pick_the_loss_clip():
    cfg = AlgoConfig()
    assert cfg.advantage_estimator == "grpo" and cfg.loss_agg_mode == "token-mean"
    assert (cfg.clip().clip_low, cfg.clip().clip_high) == (0.2, 0.2)
    lpo = AlgoConfig(policy_loss="lpo")
    assert (lpo.clip().clip_low, lpo.clip().clip_high) == (0.03, 0.03)
    gspo = AlgoConfig.model_validate({"policy_loss": "gspo", "gspo": {"clip_high": 5e-4}})
    # Overriding one bound keeps the GSPO default of the other.
    assert (gspo.clip().clip_low, gspo.clip().clip_high) == (3e-4, 5e-4)


def test_unknown_keys_fail_with_their_path():
    with pytest.raises(ValidationError, match=r"correction\.icepop_gamma"):
        AlgoConfig.model_validate({"correction": {"icepop_gamma": 1.0}})
    with pytest.raises(ValidationError, match="loss_agg"):
        AlgoConfig.model_validate({"loss_agg": "token-mean"})


def test_choices_are_closed_and_cross_checked():
    with pytest.raises(ValidationError):
        AlgoConfig(loss_agg_mode="mean-of-means")
    with pytest.raises(ValidationError, match="loss_agg_max_len"):
        AlgoConfig(loss_agg_mode="seq-mean-token-sum-norm")
    assert AlgoConfig(loss_agg_mode="seq-mean-token-sum-norm", loss_agg_max_len=4096).loss_agg_max_len == 4096
    with pytest.raises(ValidationError, match=r"kl\.coef"):
        AlgoConfig.model_validate({"kl": {"mode": "loss"}})
    with pytest.raises(ValidationError):
        AlgoConfig.model_validate({"ppo": {"dual_clip": 1.0}})
    # a correction needs the trainer's own π_old: with the rollout's log-probs as π_old it would do nothing
    with pytest.raises(ValidationError, match="use_rollout_logp_as_old=false"):
        AlgoConfig.model_validate({"correction": {"method": "token_tis", "use_rollout_logp_as_old": True}})


def test_config_literals_match_the_functions():
    # The config stays import-light (no torch); these tuples keep it in step with the modules.
    assert get_args(AggModeName) == AGG_MODES
    assert get_args(KLEstimatorName) == KL_ESTIMATORS


def test_every_field_has_a_description():
    from rlplat.algos import config

    for model in (
        config.AlgoConfig,
        config.ClipConfig,
        config.GSPOClipConfig,
        config.LPOClipConfig,
        config.KLConfig,
        config.CorrectionConfig,
    ):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
