"""Rewards for RL post-training: the plugin API, built-in verifiers, and the runner that combines them.

Public API: ``Sample``, ``RewardResult``, ``reward`` (decorator), ``resolve``, ``RewardRunner``,
``RewardsConfig``. Built-in rewards (``math``, ``code``, ``gar``, ``think_format``,
``evo_cot_length``) register on first lookup.
"""

from rewards.api import RewardResult, Sample
from rewards.registry import registered, resolve, reward
from rewards.runner import RewardRunner, ScoredSample
from rlplat.reward_config import RewardsConfig, RewardSpec

__all__ = [
    "RewardResult",
    "RewardRunner",
    "RewardSpec",
    "RewardsConfig",
    "Sample",
    "ScoredSample",
    "registered",
    "resolve",
    "reward",
]
