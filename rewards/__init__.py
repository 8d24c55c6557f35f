"""Rewards for RL post-training: the plugin API, built-in verifiers, and the runner that combines them.

Public API: ``Sample``, ``RewardResult``, ``reward`` (decorator), ``resolve``, ``import_plugin``,
``RewardRunner``, ``RewardsConfig``. Built-in rewards (``math``, ``code``, ``gar``, ``think_format``,
``evo_cot_length``) register on first lookup.
"""

from rewards.api import RewardResult, Sample
from rewards.config import RewardsConfig, RewardSpec
from rewards.registry import import_plugin, registered, resolve, reward
from rewards.runner import RewardRunner, ScoredSample

__all__ = [
    "RewardResult",
    "RewardRunner",
    "RewardSpec",
    "RewardsConfig",
    "Sample",
    "ScoredSample",
    "import_plugin",
    "registered",
    "resolve",
    "reward",
]
