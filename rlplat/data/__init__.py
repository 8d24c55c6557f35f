"""Data: tokenizers, prompt sets and the experience records that flow from rollout to the trainer."""
