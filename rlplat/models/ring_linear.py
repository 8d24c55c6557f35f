"""Ring-linear-2.0 (BailingMoeLinearV2ForCausalLM): a hybrid linear/softmax-attention sparse MoE decoder.

Architecture only. Every op goes through ``kernels``, whose mode decides precision behaviour and batch
invariance for trainer and rollout alike. FP8 is switched on from outside (``rlplat.models.fp8``), and the HF
checkpoint names are simply the attribute paths below.

Legend: B batch, T new tokens, C hidden, H heads, G kv heads, D head dim, E experts, k experts per token.
Layer i: softmax GQA attention if (i + 1) % layer_group_size == 0, else linear attention. FFN: dense SwiGLU
for i < first_k_dense_replace, else the MoE (sigmoid group-limited router, routed experts, shared expert).
Inputs are right-padded; ``lengths_B`` gives each row's number of real new tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.batch_invariant import linear as invariant_linear
from kernels.fp8 import fp8_linear
from kernels.group_norm_gate import group_rms_norm_gate
from kernels.linear_attention import linear_attention
from kernels.lm_head import lm_head_logits, lm_head_logprobs
from kernels.moe_routing import group_limited_topk
from kernels.rmsnorm import rms_norm
from kernels.rope import apply_rotary, rope_table
from kernels.softmax_attention import softmax_attention
from kernels.swiglu import swiglu
from rlplat.models.cache import LayerCache, ModelCache
from rlplat.models.config import RingLinearConfig


class Linear(nn.Module):
    """Bias-free linear layer; ``fp8`` (set by ``rlplat.models.fp8.enable_fp8``) quantises its GEMM inputs."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.fp8 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight) if self.fp8 else invariant_linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def linear_attention_log_decay(cfg: RingLinearConfig, layer_idx: int) -> torch.Tensor:
    """log λ_h = −s_h · f_l with ALiBi slopes s_h = (2^(−8/H))^(h+1) and the layer factor f_l (see config)."""
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    slopes = torch.tensor([(2.0 ** (-8.0 / H)) ** (h + 1) for h in range(H)], dtype=torch.float64)
    index = layer_idx if cfg.linear_decay_convention == "engine" else layer_idx - 1
    factor = 1.0 - index / max(L - 1, 1) + 1e-5
    return (-slopes * factor).float()


class LinearAttention(nn.Module):
    def __init__(self, cfg: RingLinearConfig, layer_idx: int):
        super().__init__()
        H, D, C = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        self.num_heads, self.head_dim, self.groups = H, D, cfg.group_norm_size
        self.eps = cfg.rms_norm_eps
        self.query_key_value = Linear(C, 3 * H * D)
        self.query_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.g_proj = Linear(C, H * D)
        self.g_norm = RMSNorm(H * D, cfg.rms_norm_eps)
        self.dense = Linear(H * D, C)
        self.register_buffer("log_decay", linear_attention_log_decay(cfg, layer_idx), persistent=False)

    def forward(self, x_BTC, positions_BT, rope, cache: LayerCache | None, lengths_B):
        B, T, _ = x_BTC.shape
        q, k, v = self.query_key_value(x_BTC).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        q = apply_rotary(self.query_layernorm(q), positions_BT, *rope)
        k = apply_rotary(self.key_layernorm(k), positions_BT, *rope)
        scale = self.head_dim**-0.5
        if cache is None:
            o, _ = linear_attention(q, k, v, self.log_decay, scale)
        else:
            start_B = positions_BT[:, 0]
            o, state = linear_attention(
                q, k, v, self.log_decay, scale, cache.linear_state(), start_B, lengths_B
            )
            cache.set_linear_state(state)
        o = group_rms_norm_gate(
            o.reshape(B, T, -1), self.g_proj(x_BTC), self.g_norm.weight, self.groups, self.eps
        )
        return self.dense(o)


class SoftmaxAttention(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        H, G, D, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, D
        self.query_key_value = Linear(C, (H + 2 * G) * D)
        self.query_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.dense = Linear(H * D, C)

    def forward(self, x_BTC, positions_BT, rope, cache: LayerCache | None, lengths_B):
        B, T, _ = x_BTC.shape
        H, G, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.query_key_value(x_BTC).split([H * D, G * D, G * D], dim=-1)
        q = apply_rotary(self.query_layernorm(q.view(B, T, H, D)), positions_BT, *rope)
        k = apply_rotary(self.key_layernorm(k.view(B, T, G, D)), positions_BT, *rope)
        v = v.view(B, T, G, D)
        if cache is not None:
            k, v = cache.append_kv(k, v, positions_BT)
        o = softmax_attention(q, k, v, positions_BT, D**-0.5)
        return self.dense(o.reshape(B, T, H * D))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # Selection-only bias, kept in fp32 whatever the model dtype (see rlplat.models.checkpoint).
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x_NC: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x_NC.float(), self.weight.float())  # fp32 router logits


def sum_slots(slots_NkC: torch.Tensor) -> torch.Tensor:
    """A token's k weighted expert outputs [N, k, C] summed slot by slot, in a fixed order, so its output
    never depends on the batch or on where the experts ran (the Megatron trainer sums with this too)."""
    out = slots_NkC[:, 0]
    for s in range(1, slots_NkC.shape[1]):
        out = out + slots_NkC[:, s]
    return out


class MoE(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)
        )
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            if cfg.num_shared_experts > 0
            else None
        )

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = x_BTC.reshape(-1, x_BTC.shape[-1])
        weights_Nk, ids_Nk = group_limited_topk(
            self.gate(x),
            self.gate.expert_bias,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.routed_scaling_factor,
            cfg.norm_topk_prob,
        )
        slots_NkC = x.new_zeros(*ids_Nk.shape, x.shape[-1], dtype=torch.float32)
        for e in ids_Nk.unique().tolist():
            rows, slot = (ids_Nk == e).nonzero(as_tuple=True)
            y = self.experts[e](x[rows]).float() * weights_Nk[rows, slot, None]
            slots_NkC = slots_NkC.index_put((rows, slot), y)
        out = sum_slots(slots_NkC)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).float()
        return out.to(x_BTC.dtype).view_as(x_BTC)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RingLinearConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = (
            SoftmaxAttention(cfg) if cfg.is_softmax_layer(layer_idx) else LinearAttention(cfg, layer_idx)
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, positions_BT, rope, cache, lengths_B):
        h = x + self.attention(self.input_layernorm(x), positions_BT, rope, cache, lengths_B)
        return h + self.mlp(self.post_attention_layernorm(h))


class RingLinearModel(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_table(cfg.max_position_embeddings, cfg.rotary_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)


class RingLinearForCausalLM(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        self.config = cfg
        self.model = RingLinearModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Tensors of multi-token-prediction layers: kept and saved back, not run (see checkpoint.py).
        self.mtp_tensors: dict[str, torch.Tensor] = {}
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        for m in self.modules():
            if isinstance(m, Router):
                m.expert_bias.zero_()

    def hidden_states(self, input_ids_BT, cache: ModelCache | None = None, lengths_B=None) -> torch.Tensor:
        """Final-norm hidden states [B, T, C]. With a cache, tokens continue each row at its cached length."""
        B, T = input_ids_BT.shape
        vocab = self.config.vocab_size
        if input_ids_BT.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {input_ids_BT.dtype}")
        if input_ids_BT.numel() and (int(input_ids_BT.min()) < 0 or int(input_ids_BT.max()) >= vocab):
            raise ValueError(f"input_ids must be token ids in [0, {vocab}); got values outside that range")
        start = cache.lengths_B if cache is not None else input_ids_BT.new_zeros(B)
        positions = start[:, None] + torch.arange(T, device=input_ids_BT.device)[None, :]
        if positions.numel() and int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"sequence reaches position {int(positions.max())} but max_position_embeddings is "
                f"{self.config.max_position_embeddings}; shorten the input or raise max_position_embeddings"
            )
        rope = (self.model.rope_cos, self.model.rope_sin)
        x = self.model.word_embeddings(input_ids_BT)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, rope, cache.layers[i] if cache is not None else None, lengths_B)
        if cache is not None:
            cache.lengths_B = start + (lengths_B if lengths_B is not None else T)
        return self.model.norm(x)

    def forward(self, input_ids_BT, cache: ModelCache | None = None, lengths_B=None) -> torch.Tensor:
        """Logits [B, T, vocab] in fp32."""
        return lm_head_logits(self.hidden_states(input_ids_BT, cache, lengths_B), self.lm_head.weight)

    def token_logprobs(
        self,
        input_ids_BT,
        targets_BT,
        temperature: float = 1.0,
        cache: ModelCache | None = None,
        lengths_B=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of ``targets`` at every position and the entropy, fp32 [B, T], via the fused LM head."""
        h = self.hidden_states(input_ids_BT, cache, lengths_B)
        B, T, C = h.shape
        logp, entropy = lm_head_logprobs(
            h.reshape(B * T, C), self.lm_head.weight, targets_BT.reshape(-1), temperature
        )
        return logp.view(B, T), entropy.view(B, T)

    def new_cache(self, batch: int) -> ModelCache:
        return ModelCache.empty(batch, self.config.num_hidden_layers, self.lm_head.weight.device)


def count_parameters(cfg: RingLinearConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = RingLinearForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    return total, total - inactive
