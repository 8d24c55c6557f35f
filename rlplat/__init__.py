"""rlplat: RL post-training for hybrid linear/softmax-attention MoE models with bitwise rollout/trainer alignment."""

__version__ = "0.1.0"
