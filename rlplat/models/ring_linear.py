"""Ring-linear-2.0 (BailingMoeLinearV2ForCausalLM): a hybrid linear/softmax-attention sparse MoE decoder.

Architecture only. Every op goes through ``kernels``, whose mode decides precision behaviour and batch
invariance for trainer and rollout alike. The HF checkpoint names are simply the attribute paths below.
Applied from outside: FP8 (``rlplat.models.fp8``) and parallelism. The blocks take the layers that
parallelism splits — projections, embedding, LM head, routed experts — from a ``LayerFactory``;
``LOCAL_LAYERS`` builds each of them whole in this process, and the Megatron backend
(``rlplat.train.megatron.parallelize``) builds these same blocks from tensor- and expert-parallel layers,
then gives each block its rank's share of the heads, as torchtitan's ``parallelize.py`` does. So the forwards
below work on whatever heads a rank holds: ``num_heads``, ``num_kv_heads``, ``groups`` and ``log_decay``
are those of this block's projections.

Legend: B batch, T new tokens, C hidden, H heads, G kv heads, D head dim, E experts, k experts per token.
Layer i: softmax GQA attention if (i + 1) % layer_group_size == 0, else linear attention. FFN: dense SwiGLU
for i < first_k_dense_replace, else the MoE (sigmoid group-limited router, routed experts, shared expert).
Inputs are right-padded; ``lengths_B`` gives each row's number of real new tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from kernels.batch_invariant import linear as invariant_linear
from kernels.fp8 import fp8_linear
from kernels.group_norm_gate import group_rms_norm_gate
from kernels.linear_attention import linear_attention
from kernels.lm_head import lm_head_logits, lm_head_logprobs
from kernels.moe_routing import expert_rows, group_limited_topk
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


class LMHead(nn.Linear):
    """The untied output projection [V, C]; logits and log-probs come from the fused fp32 LM-head kernels."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__(hidden, vocab, bias=False)

    def vocab_weight(self) -> torch.Tensor:
        """The whole vocabulary's weight [V, C] (a vocabulary-parallel head gathers its shards)."""
        return self.weight

    def forward(self, h_BTC: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] in fp32."""
        return lm_head_logits(h_BTC, self.vocab_weight())

    def logprobs(
        self, h_BTC: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of each target and the entropy, fp32 [B, T]."""
        B, T, C = h_BTC.shape
        logp, entropy = lm_head_logprobs(
            h_BTC.reshape(B * T, C), self.vocab_weight(), targets_BT.reshape(-1), temperature
        )
        return logp.view(B, T), entropy.view(B, T)


class LayerFactory(Protocol):
    """Builds the layers that parallelism splits. Tensor parallelism splits a ``column`` layer's output
    features and a ``row`` layer's input features (it sums the ranks' partial outputs), as Megatron's
    column/row-parallel linears do; each takes and returns plain tensors. ``routed_experts`` holds the experts
    of this process and moves tokens to them and back."""

    def column(self, n_in: int, n_out: int) -> nn.Module: ...

    def row(self, n_in: int, n_out: int) -> nn.Module: ...

    def embedding(self, vocab: int, hidden: int) -> nn.Module: ...

    def lm_head(self, hidden: int, vocab: int) -> LMHead: ...

    def routed_experts(self, cfg: RingLinearConfig) -> RoutedExperts: ...


class LocalLayers:
    """Every layer whole, in this process: what the rollout engines and the torch trainer run."""

    def column(self, n_in: int, n_out: int) -> nn.Module:
        return Linear(n_in, n_out)

    def row(self, n_in: int, n_out: int) -> nn.Module:
        return Linear(n_in, n_out)

    def embedding(self, vocab: int, hidden: int) -> nn.Module:
        return nn.Embedding(vocab, hidden)

    def lm_head(self, hidden: int, vocab: int) -> LMHead:
        return LMHead(hidden, vocab)

    def routed_experts(self, cfg: RingLinearConfig) -> RoutedExperts:
        return RoutedExperts(
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)
        )


LOCAL_LAYERS = LocalLayers()


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
    def __init__(self, cfg: RingLinearConfig, layer_idx: int, factory: LayerFactory = LOCAL_LAYERS):
        super().__init__()
        H, D, C = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        self.num_heads, self.head_dim, self.groups = H, D, cfg.group_norm_size
        self.eps = cfg.rms_norm_eps
        self.query_key_value = factory.column(C, 3 * H * D)
        self.query_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.g_proj = factory.column(C, H * D)
        self.g_norm = RMSNorm(H * D, cfg.rms_norm_eps)
        self.dense = factory.row(H * D, C)
        self.register_buffer("log_decay", linear_attention_log_decay(cfg, layer_idx), persistent=False)

    def forward(self, x_BTC, positions_BT, rope, cache: LayerCache | None = None, lengths_B=None):
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
    def __init__(self, cfg: RingLinearConfig, factory: LayerFactory = LOCAL_LAYERS):
        super().__init__()
        H, G, D, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, D
        self.query_key_value = factory.column(C, (H + 2 * G) * D)
        self.query_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.dense = factory.row(H * D, C)

    def forward(self, x_BTC, positions_BT, rope, cache: LayerCache | None = None, lengths_B=None):
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
    def __init__(self, hidden: int, intermediate: int, factory: LayerFactory = LOCAL_LAYERS):
        super().__init__()
        self.gate_proj = factory.column(hidden, intermediate)
        self.up_proj = factory.column(hidden, intermediate)
        self.down_proj = factory.row(intermediate, hidden)

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
    never depends on the batch or on where the experts ran."""
    # unbind, not k selects: the backward then stacks the k gradients once instead of zero-filling and writing a
    # whole [N, k, C] tensor per slot
    first, *rest = slots_NkC.unbind(1)
    out = first
    for slot in rest:
        out = out + slot
    return out


Route = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class RoutedExperts(nn.ModuleList):
    """The routed experts this process holds (``experts.<e>``), and how each token reaches its k of them: here
    all E experts, each run on its tokens in turn. Expert parallelism subclasses this to send tokens to the
    ranks holding their experts; a token's output is the same fixed-order sum of its slots either way."""

    def forward(self, x_NC: torch.Tensor, route: Route) -> torch.Tensor:
        """Σ over each token's k experts of weight · expert(x), fp32 [N, C]. ``route`` (the MoE's router)
        gives the (weights, expert ids) [N, k] of the tokens it is called on."""
        weights_Nk, ids_Nk = route(x_NC)
        return sum_slots(self.weighted_slots(x_NC, weights_Nk, ids_Nk))

    def weighted_slots(
        self, x_NC: torch.Tensor, weights_Nk: torch.Tensor, ids_Nk: torch.Tensor
    ) -> torch.Tensor:
        """weight · expert(x) of every (token, slot), fp32 [N, k, C]."""
        (N, k), C = ids_Nk.shape, x_NC.shape[-1]
        if N == 0:
            return x_NC.new_zeros(0, k, C, dtype=torch.float32)
        # (token, slot) pairs grouped by expert, tokens in order within a group; every expert output lands in
        # its slot with one copy (not one copy of the whole [N, k, C] per expert)
        order = ids_Nk.flatten().argsort(stable=True)
        counts = torch.bincount(ids_Nk.flatten(), minlength=len(self)).tolist()
        rows = expert_rows(x_NC, order, k).split(counts)  # x[order // k], with deterministic gradients
        y = torch.cat([self[e](x) for e, x in enumerate(rows) if len(x)]).float()
        y = y * weights_Nk.flatten()[order, None]
        return y.new_zeros(N * k, C).index_copy(0, order, y).view(N, k, C)


class MoE(nn.Module):
    def __init__(self, cfg: RingLinearConfig, factory: LayerFactory = LOCAL_LAYERS):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = factory.routed_experts(cfg)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size, factory)
            if cfg.num_shared_experts > 0
            else None
        )

    def route(self, x_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids) [N, k]: group-limited top-k of the fp32 sigmoid scores."""
        cfg = self.cfg
        return group_limited_topk(
            self.gate(x_NC),
            self.gate.expert_bias,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.routed_scaling_factor,
            cfg.norm_topk_prob,
        )

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        x = x_BTC.reshape(-1, x_BTC.shape[-1])
        out = self.experts(x, self.route)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).float()
        return out.to(x_BTC.dtype).view_as(x_BTC)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RingLinearConfig, layer_idx: int, factory: LayerFactory = LOCAL_LAYERS):
        super().__init__()
        C = cfg.hidden_size
        self.input_layernorm = RMSNorm(C, cfg.rms_norm_eps)
        self.attention = (
            SoftmaxAttention(cfg, factory)
            if cfg.is_softmax_layer(layer_idx)
            else LinearAttention(cfg, layer_idx, factory)
        )
        self.post_attention_layernorm = RMSNorm(C, cfg.rms_norm_eps)
        self.mlp = (
            MoE(cfg, factory) if cfg.is_moe_layer(layer_idx) else SwiGLU(C, cfg.intermediate_size, factory)
        )

    def forward(self, x, positions_BT, rope, cache: LayerCache | None = None, lengths_B=None):
        h = x + self.attention(self.input_layernorm(x), positions_BT, rope, cache, lengths_B)
        return h + self.mlp(self.post_attention_layernorm(h))


class RingLinearModel(nn.Module):
    def __init__(self, cfg: RingLinearConfig, factory: LayerFactory = LOCAL_LAYERS):
        super().__init__()
        self.word_embeddings = factory.embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, factory) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_table(cfg.max_position_embeddings, cfg.rotary_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)


def positions_of(cfg: RingLinearConfig, input_ids_BT: torch.Tensor, start_B: torch.Tensor) -> torch.Tensor:
    """Absolute positions [B, T] of new tokens that continue each row at ``start_B``; refuses ids outside the
    vocabulary and positions beyond ``max_position_embeddings``."""
    T, vocab = input_ids_BT.shape[1], cfg.vocab_size
    if input_ids_BT.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {input_ids_BT.dtype}")
    if input_ids_BT.numel() and (int(input_ids_BT.min()) < 0 or int(input_ids_BT.max()) >= vocab):
        raise ValueError(f"input_ids must be token ids in [0, {vocab}); got values outside that range")
    positions = start_B[:, None] + torch.arange(T, device=input_ids_BT.device)[None, :]
    if positions.numel() and int(positions.max()) >= cfg.max_position_embeddings:
        raise ValueError(
            f"sequence reaches position {int(positions.max())} but max_position_embeddings is "
            f"{cfg.max_position_embeddings}; shorten the input or raise max_position_embeddings"
        )
    return positions


class RingLinearForCausalLM(nn.Module):
    def __init__(self, cfg: RingLinearConfig, factory: LayerFactory = LOCAL_LAYERS):
        super().__init__()
        self.config = cfg
        self.model = RingLinearModel(cfg, factory)
        self.lm_head = factory.lm_head(cfg.hidden_size, cfg.vocab_size)
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
        start = cache.lengths_B if cache is not None else input_ids_BT.new_zeros(input_ids_BT.shape[0])
        positions = positions_of(self.config, input_ids_BT, start)
        rope = (self.model.rope_cos, self.model.rope_sin)
        x = self.model.word_embeddings(input_ids_BT)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, rope, cache.layers[i] if cache is not None else None, lengths_B)
        if cache is not None:
            cache.lengths_B = start + (lengths_B if lengths_B is not None else input_ids_BT.shape[1])
        return self.model.norm(x)

    def forward(self, input_ids_BT, cache: ModelCache | None = None, lengths_B=None) -> torch.Tensor:
        """Logits [B, T, vocab] in fp32."""
        return self.lm_head(self.hidden_states(input_ids_BT, cache, lengths_B))

    def token_logprobs(
        self,
        input_ids_BT,
        targets_BT,
        temperature: float = 1.0,
        cache: ModelCache | None = None,
        lengths_B=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of ``targets`` at every position and the entropy, fp32 [B, T], via the fused LM head."""
        return self.lm_head.logprobs(
            self.hidden_states(input_ids_BT, cache, lengths_B), targets_BT, temperature
        )

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
