"""Rollout: the embedded generation engine, the backend interface both backends satisfy, and the alignment check.

``NativeEngine`` (engine.py) generates with rlplat's own model and kernels and is the alignment reference;
``RolloutBackend`` / ``make_backend`` (backend.py) is what the RL loop talks to; ``build_policy`` (policy.py)
builds the model the same way for rollout and trainer; ``check_alignment`` (alignment.py) measures the
rollout–trainer log-prob mismatch.
"""

from rlplat.engine.backend import RolloutBackend, make_backend
from rlplat.engine.config import AlignmentConfig, RolloutConfig, SamplingParams
from rlplat.engine.engine import NativeEngine, sample_token
from rlplat.engine.policy import build_policy
from rlplat.engine.sample import FinishReason, Sample

__all__ = [
    "AlignmentConfig",
    "FinishReason",
    "NativeEngine",
    "RolloutBackend",
    "RolloutConfig",
    "Sample",
    "SamplingParams",
    "build_policy",
    "make_backend",
    "sample_token",
]
