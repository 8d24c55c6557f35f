"""Rewards for RL post-training: the plugin API, built-in verifiers, and the runner that combines them.

Public API: ``Sample``, ``RewardResult``, ``reward`` (decorator), ``resolve``, ``import_plugin``,
``RewardRunner``, ``check_rewards`` (a driver's preflight), ``RewardsConfig``. Built-in rewards (``math``,
``code``, ``gar``, ``think_format``, ``evo_cot_length``) register on first lookup.
"""

from rewards.api import RewardResult, Sample
from rewards.config import RewardsConfig, RewardSpec
from rewards.registry import import_plugin, registered, resolve, reward
from rewards.runner import RewardRunner, ScoredSample, check_rewards

__all__ = [
    "RewardResult",
    "RewardRunner",
    "RewardSpec",
    "RewardsConfig",
    "Sample",
    "ScoredSample",
    "check_rewards",
    "import_plugin",
    "registered",
    "resolve",
    "reward",
]
