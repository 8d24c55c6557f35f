"""The model against a naive, from-scratch float64 implementation of DESIGN.md's equations.

Everything here is written independently of rlplat's kernels: a token-by-token recurrence for linear attention,
explicit causal softmax attention, a per-token loop over the chosen experts. The model's fp32 logits must be
within 1e-4 (max abs) of it for sequences up to 300 tokens, in both kernel modes.
"""

import math

import pytest
import torch

import kernels
from rlplat.models import RingLinearForCausalLM, preset


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x_TD, rotary_dim, base):
    T = x_TD.shape[0]
    half = rotary_dim // 2
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x_TD[:, :half], x_TD[:, half:rotary_dim]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_TD[:, rotary_dim:]], dim=-1)


def swiglu_ffn(x, p, prefix):
    g = x @ p[prefix + "gate_proj.weight"].T
    u = x @ p[prefix + "up_proj.weight"].T
    return (g * torch.sigmoid(g) * u) @ p[prefix + "down_proj.weight"].T


def naive_logits(model, ids):
    cfg = model.config
    p = {k: v.double() for k, v in model.state_dict().items()}
    H, G, D, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    T = len(ids)
    x = p["model.word_embeddings.weight"][ids]
    for i in range(L):
        pre = f"model.layers.{i}."
        h = rms(x, p[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = h @ p[pre + "attention.query_key_value.weight"].T
        out = torch.zeros(T, H * D, dtype=torch.float64)

        def head_qk(x, head, norm, pre=pre):
            """Head ``head`` of q or k: per-head RMSNorm (QK-norm), then partial RoPE."""
            xh = rms(x[:, head * D : (head + 1) * D], p[pre + f"attention.{norm}.weight"], cfg.rms_norm_eps)
            return rope(xh, cfg.rotary_dim, cfg.rope_theta)

        if (i + 1) % cfg.layer_group_size == 0:  # softmax GQA attention
            q, k, v = qkv.split([H * D, G * D, G * D], dim=-1)
            for head in range(H):
                kv = head // (H // G)
                qh = head_qk(q, head, "query_layernorm")
                kh = head_qk(k, kv, "key_layernorm")
                vh = v[:, kv * D : (kv + 1) * D]
                for t in range(T):
                    s = (kh[: t + 1] @ qh[t]) / math.sqrt(D)
                    w = torch.exp(s - s.max())
                    out[t, head * D : (head + 1) * D] = (w / w.sum()) @ vh[: t + 1]
        else:  # linear attention, token-by-token recurrence
            q, k, v = qkv.split([H * D, H * D, H * D], dim=-1)
            factor = 1 - i / (L - 1) + 1e-5
            for head in range(H):
                lam = math.exp(-((2 ** (-8 / H)) ** (head + 1)) * factor)
                qh = head_qk(q, head, "query_layernorm")
                kh = head_qk(k, head, "key_layernorm")
                vh = v[:, head * D : (head + 1) * D]
                S = torch.zeros(D, D, dtype=torch.float64)
                for t in range(T):
                    S = lam * S + torch.outer(kh[t], vh[t])
                    out[t, head * D : (head + 1) * D] = (qh[t] @ S) / math.sqrt(D)
            gsize = H * D // cfg.group_norm_size
            normed = (
                torch.cat(
                    [
                        rms(out[:, j * gsize : (j + 1) * gsize], 1.0, cfg.rms_norm_eps)
                        for j in range(cfg.group_norm_size)
                    ],
                    dim=-1,
                )
                * p[pre + "attention.g_norm.weight"]
            )
            out = normed * torch.sigmoid(h @ p[pre + "attention.g_proj.weight"].T)
        x = x + out @ p[pre + "attention.dense.weight"].T
        h = rms(x, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        if i < cfg.first_k_dense_replace:
            x = x + swiglu_ffn(h, p, pre + "mlp.")
            continue
        E, per_group = cfg.num_experts, cfg.num_experts // cfg.n_group
        scores = torch.sigmoid(h @ p[pre + "mlp.gate.weight"].T)
        biased = scores + p[pre + "mlp.gate.expert_bias"]
        y = swiglu_ffn(h, p, pre + "mlp.shared_experts.")
        for t in range(T):
            group_score = [
                sorted(biased[t, g * per_group : (g + 1) * per_group].tolist())[-2:]
                for g in range(cfg.n_group)
            ]
            kept = sorted(range(cfg.n_group), key=lambda g: -sum(group_score[g]))[: cfg.topk_group]
            eligible = [e for e in range(E) if e // per_group in kept]
            chosen = sorted(eligible, key=lambda e: -biased[t, e].item())[: cfg.num_experts_per_tok]
            w = scores[t, chosen]
            w = w / w.sum() * cfg.routed_scaling_factor
            for e, we in zip(chosen, w):
                y[t] = y[t] + we * swiglu_ffn(h[t : t + 1], p, pre + f"mlp.experts.{e}.")[0]
        x = x + y
    x = rms(x, p["model.norm.weight"], cfg.rms_norm_eps)
    return x @ p["lm_head.weight"].T


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = RingLinearForCausalLM(preset("tiny"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if "norm" not in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.08)
            else:
                prm.copy_(1 + 0.1 * torch.randn(prm.shape, generator=g))
        for layer in m.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.expert_bias.copy_(
                    torch.randn(layer.mlp.gate.expert_bias.shape, generator=g) * 0.1
                )
    return m.eval()


@pytest.mark.parametrize("invariant", [True, False], ids=["invariant", "plain"])
@pytest.mark.parametrize("T", [1, 65, 300])
def test_logits_match_naive_float64(model, T, invariant):
    ids = torch.randint(0, model.config.vocab_size, (T,), generator=torch.Generator().manual_seed(T))
    with torch.no_grad(), kernels.kernel_mode(batch_invariant=invariant):
        got = model(ids[None])[0]
    want = naive_logits(model, ids)
    err = (got.double() - want).abs().max().item()
    assert want.abs().max() > 0.1, "logits too small for the comparison to mean anything"
    assert err < 1e-4, f"max |logit error| = {err:.2e}"
