"""RL objectives as pure torch functions: advantages, policy losses, loss aggregation, KL, train–inference
corrections, dynamic sampling and metrics. Nothing here knows about models, Ray or distributed training;
the trainer (``rlplat/train``) composes these functions and does the all-reduces.

Conventions shared by every module (shape legend):

- ``B`` sequences (responses) in a batch, ``T`` response tokens, right-padded.
- ``mask_BT``: 1/True marks a real response token, 0/False padding. Values at padding positions are
  ignored (they may even be NaN or -inf) and outputs are zero there.
- Groups: ``group_size`` n with the ``n`` responses to one prompt stored contiguously, so row ``b`` belongs
  to group ``b // n`` and ``B`` must be a multiple of ``n`` (the ``[num_prompts, n]`` layout flattened).
- ``*_logp_BT``: log-probabilities of the sampled tokens.
- Non-finite log-probs or rewards at valid positions raise ``ValueError`` naming the tensor
  (``validation.check_finite``); all-masked inputs give zeros, never NaN.
"""
