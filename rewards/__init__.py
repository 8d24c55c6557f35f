"""Rewards for RL post-training: the plugin API, built-in verifiers, and the runner that combines them.

Public API: ``Sample``, ``RewardResult``, ``reward`` (decorator), ``resolve``, ``import_plugin``,
``RewardRunner``, ``check_rewards`` (a driver's preflight), ``RewardsConfig``, and ``summarize`` /
``reward_metrics`` (a step's per-term means, error counts and accuracy, for the RL loop's metrics).
Built-in rewards (``math``, ``code``, ``gar``, ``think_format``, ``evo_cot_length``) register on first
lookup.
"""

from rewards.api import RewardResult, Sample
from rewards.registry import import_plugin, registered, resolve, reward
from rewards.runner import RewardRunner, ScoredSample, check_rewards
from rewards.summary import RewardSummary, TermSummary, reward_metrics, summarize
from rlplat.reward_config import RewardsConfig, RewardSpec

__all__ = [
    "RewardResult",
    "RewardRunner",
    "RewardSpec",
    "RewardSummary",
    "RewardsConfig",
    "Sample",
    "ScoredSample",
    "TermSummary",
    "check_rewards",
    "import_plugin",
    "registered",
    "resolve",
    "reward",
    "reward_metrics",
    "summarize",
]
