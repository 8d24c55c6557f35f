"""The one bound on a log-ratio before it is exponentiated: ``clamp_log_ratio``, to ±``MAX_LOG_RATIO`` = 20.

A ratio pi / pi_old = exp(log pi - log pi_old) overflows float32 at a log-ratio of 88.7 (float64 at 709.8):
exp gives inf, the loss inf, its backward NaN (exp's backward multiplies by inf), and the trainer refuses the
whole step. One stale or corrupted token is enough. verl clamps the log-ratio to [-20, 20] before ``exp`` in
its PPO loss (``compute_policy_loss_vanilla``, "Clamp negative_approx_kl for stability") and in its k3 KL
(``kl_penalty``, "low_var_kl"); rlplat does the same, in every place that exponentiates a log-ratio that can
carry a gradient or reach a metric:

- ``losses``: the PPO token ratio and the GSPO / LPO unit ratio (the clamp wraps the whole exponent, gradient
  term included, so a clamped token gets zero gradient);
- ``kl``: the k3 estimator e^-x - 1 + x, x = log pi - log pi_ref, bounded on its overflowing side only
  (x >= -20, in both terms);
- ``corrections``: no clamp needed. TIS truncates ``min(log-ratio, log C)`` before ``exp`` (the top cannot
  overflow, the bottom underflows to a weight of 0), and IcePop and MIS compare log-ratios with log bounds
  without exponentiating. All are detached (no gradient).
- ``rlplat.engine.alignment`` and ``rlplat.runlog.mismatch_summary`` bound their k3 mismatch KL the same way
  (train - rollout <= 20), so the alignment report, the trainer's ``mismatch/kl`` and the rollout records
  agree and stay finite JSON.

Why 20: exp(20) = 4.85e8 and exp(-20) = 2.1e-9 are far outside every clip range (PPO 1 ± 0.2, dual-clip c
~3, IcePop [0.5, 5]), so any token the clamp changes is one that clipping, masking or truncation already
treats as an extreme. Within |log-ratio| <= 20 values and gradients are exactly the unclamped ones. Beyond it
the value saturates at exp(±20) (finite in float32, with room to multiply by an advantage) and the token
contributes no gradient (clamp's derivative is 0 there) instead of NaN.

Deviations from verl, both in k3: x > 20 is not clamped, because e^-x underflows harmlessly to 0 there and
k3 ~ x - 1 keeps its true value and its gradient, which pulls pi back toward pi_ref; and the k3 value is not
clamped to [-10, 10], because k3 reaches 10 at x = -2.6 and that clamp would silence the KL gradient (and
hide the KL in metrics) long before anything overflows.

Works on any tensor (``Tensor.clamp``); this module imports nothing, so ``rlplat.runlog`` can share the bound.
"""

MAX_LOG_RATIO = 20.0


def clamp_log_ratio(log_ratio):
    """``log_ratio`` clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO] (a tensor; zero gradient outside)."""
    return log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
