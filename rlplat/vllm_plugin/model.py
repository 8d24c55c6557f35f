"""``BailingMoeLinearV2ForCausalLM`` for vLLM, computed by rlplat's own model and kernels.

vLLM owns scheduling, memory and sampling; rlplat owns the numbers. Each step:
1. vLLM hands over a flat batch of tokens (any mix of prefill chunks and decode steps) and, per layer, metadata
   saying where each request's cache lives: paged KV blocks for the softmax layers (a block table and a slot
   per new token), one fp32 state slot for each linear-attention layer.
2. ``_Batch`` turns the flat tokens into rlplat's right-padded ``[R, T]`` layout, and each layer's cache module
   gathers that layer's per-request cache into an rlplat :class:`LayerCache` (the same structure the embedded
   engine uses).
3. :meth:`RingLinearForCausalLM.hidden_states` runs unchanged: the same decoder layers and the same kernels as
   the trainer, whose batch invariance makes the result independent of how vLLM batched and chunked the work.
4. The cache modules write what the step added back to vLLM's storage: new keys/values into their slots, the
   linear-attention state into the request's state slot.
Logits come from rlplat's fp32 LM head. Why this design and what vLLM features it leaves out: README.md here.

Legend: N flat tokens of the step, R requests, T longest new-token run, L longest cached context, C hidden,
G kv heads, D head dim, H heads, S block size (tokens per KV block).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.v1.attention.backend import AttentionBackend, AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.kv_cache_interface import FullAttentionSpec

import kernels
from kernels.lm_head import reference as lm_head_reference
from kernels.rope import rope_table
from kernels.softmax_attention.reference import values_with_ones
from rlplat.models import LayerCache, ModelCache, RingLinearConfig, RingLinearForCausalLM, enable_fp8
from rlplat.models.cache import kv_capacity
from rlplat.models.ring_linear import LinearAttention, Router, linear_attention_log_decay
from rlplat.vllm_plugin.hf_config import ring_linear_config

# Linear-attention states stay fp32 whatever the model dtype, as in the trainer and the embedded engine.
STATE_DTYPE = torch.float32


# Softmax layers: paged KV cache, read and written by rlplat (no vLLM attention kernel)
@dataclass
class PagedKVMetadata:
    """What a softmax layer needs to find its requests' keys and values in vLLM's paged cache."""

    query_start_loc: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor  # [R] cached + new tokens
    block_table: torch.Tensor  # [R, max blocks]
    slot_mapping: torch.Tensor  # [N] block * S + offset of each new token


class PagedKVMetadataBuilder(AttentionMetadataBuilder[PagedKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> PagedKVMetadata:
        m = common_attn_metadata
        return PagedKVMetadata(m.query_start_loc, m.seq_lens, m.block_table_tensor, m.slot_mapping)


class PagedKVBackend(AttentionBackend):
    """vLLM allocates and schedules the KV blocks; the attention itself is rlplat's ``softmax_attention``."""

    supported_dtypes = [torch.float32, torch.bfloat16, torch.float16]  # noqa: RUF012 (vLLM's ClassVar)
    supported_kv_cache_dtypes = ["auto"]  # noqa: RUF012

    @staticmethod
    def get_name() -> str:
        return "RLPLAT_PAGED_KV"

    @staticmethod
    def get_impl_cls():
        # vLLM's own convention for a backend without an impl: its base class catches NotImplementedError here
        # (supports_pcp / supports_dcp answer False), and only vLLM's Attention layer would build an impl, which
        # PagedKVCache is not: the model's softmax layers call kernels.softmax_attention on the gathered cache
        raise NotImplementedError("rlplat's softmax layers compute attention themselves; there is no impl")

    @staticmethod
    def get_builder_cls():
        return PagedKVMetadataBuilder


class PagedKVCache(nn.Module, AttentionLayerBase):
    """The KV cache of one softmax layer: ``kv_cache`` is vLLM's ``[blocks, G, S, 2D]`` (keys then values)."""

    def __init__(self, cfg: RingLinearConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        cache_dtype = vllm_config.cache_config.cache_dtype
        if cache_dtype != "auto":
            raise ValueError(
                f"kv_cache_dtype={cache_dtype!r} is not supported by rlplat's Ring-linear plugin: its softmax "
                "attention reads keys/values in the model dtype, exactly as the trainer does; use 'auto'"
            )
        self.num_kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.dtype = vllm_config.model_config.dtype
        self.prefix = prefix
        self.kv_cache = torch.tensor([])
        _register_layer(vllm_config, prefix, self)

    def get_attn_backend(self) -> type[AttentionBackend]:
        return PagedKVBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> FullAttentionSpec:
        return FullAttentionSpec(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_dim,
            dtype=self.dtype,
        )

    def gather(self, md: PagedKVMetadata, batch: _Batch) -> LayerCache:
        """Each request's cached keys/values as rlplat's cache keeps them: fp32 [R, G, L, D] (values followed by
        their ones, see ``LayerCache``), L the longest cached context rounded up to whole key blocks, keys and
        values zero beyond each request's own context (a block's tail may hold a finished request's tokens)."""
        S, D = self.kv_cache.shape[2], self.head_dim
        L = batch.max_context
        if L == 0:
            return LayerCache()
        capacity = kv_capacity(L)
        pos_L = torch.arange(capacity, device=batch.context_R.device)
        cached_RL = pos_L[None, :] < batch.context_R[:, None]
        blocks_RL = md.block_table[: batch.num_reqs].long()[:, pos_L.clamp(max=L - 1) // S]
        kv_RLGD2 = self.kv_cache[blocks_RL, :, (pos_L.clamp(max=L - 1) % S).expand_as(blocks_RL)]
        kv_RGLD2 = torch.where(cached_RL[:, :, None, None], kv_RLGD2.float(), 0.0).transpose(1, 2)
        return LayerCache(k_BGLD=kv_RGLD2[..., :D].contiguous(), v_BGLD=values_with_ones(kv_RGLD2[..., D:]))

    def scatter(self, cache: LayerCache, md: PagedKVMetadata, batch: _Batch) -> None:
        """Write the keys/values of this step's real tokens into their slots."""
        S = self.kv_cache.shape[2]
        positions_N = batch.context_R[batch.row_N] + batch.col_N
        k_NGD = cache.k_BGLD[batch.row_N, :, positions_N]
        v_NGD = cache.v_BGLD[batch.row_N, :, positions_N, : self.head_dim]  # without the ones
        slots_N = md.slot_mapping[: batch.num_tokens].long()
        self.kv_cache[slots_N // S, :, slots_N % S] = torch.cat([k_NGD, v_NGD], dim=-1).to(
            self.kv_cache.dtype
        )


# Linear-attention layers: per-request state slots, managed by vLLM's mamba-state machinery
def _linear_state_spec(cfg: RingLinearConfig, hf_config, model_dtype: torch.dtype):
    """(shapes, dtypes) of one request's linear-attention state, as ``kernels.linear_attention`` keeps it for the
    kernel mode: batch-invariant mode, the fp32 chunk-start state plus the chunk's keys and values so far
    (model dtype, zero beyond the fill); plain mode, the fp32 state after the last token."""
    H, D = cfg.num_attention_heads, cfg.head_dim
    state = MambaStateShapeCalculator.linear_attention_state_shape(H, 1, D)
    if not getattr(hf_config, "rlplat_batch_invariant", kernels.get_mode().batch_invariant):
        return state, (STATE_DTYPE,)
    C = getattr(hf_config, "rlplat_chunk_size", kernels.get_mode().chunk_size)
    return (*state, (H, C, D), (H, C, D)), (STATE_DTYPE, model_dtype, model_dtype)


class LinearAttentionState(nn.Module, MambaBase):
    """The state of one linear-attention layer in vLLM's slots: ``kv_cache`` holds [slots, ...] tensors laid out
    as ``_linear_state_spec`` says."""

    def __init__(self, cfg: RingLinearConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.shapes, self.dtypes = _linear_state_spec(
            cfg, vllm_config.model_config.hf_config, vllm_config.model_config.dtype
        )
        self.prefix = prefix
        self.kv_cache = tuple(torch.tensor([]) for _ in self.shapes)
        _register_layer(vllm_config, prefix, self)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self) -> tuple[tuple[int, int, int], ...]:
        return self.shapes

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return self.dtypes

    def gather(self, md, batch: _Batch) -> LayerCache:
        """Each request's state; requests with nothing cached start from zero (a slot may hold a finished
        request's state)."""
        slots = md.state_indices_tensor[: batch.num_reqs].long()
        fresh_R = (batch.context_R == 0).view(-1, 1, 1, 1)
        parts = [torch.where(fresh_R, 0, t[slots]).to(t.dtype) for t in self.kv_cache]
        return LayerCache(*parts) if len(parts) == 3 else LayerCache(state_BHDD=parts[0])

    def scatter(self, cache: LayerCache, md, batch: _Batch) -> None:
        real_R = batch.lengths_R > 0  # padding requests (CUDA-graph batches) have no slot of their own
        slots = md.state_indices_tensor[: batch.num_reqs].long()[real_R]
        for t, new in zip(self.kv_cache, (cache.state_BHDD, cache.keys_BHCD, cache.values_BHCD)):
            t[slots] = new[real_R]


def _register_layer(vllm_config: VllmConfig, prefix: str, layer: nn.Module) -> None:
    """vLLM finds cache-holding layers by name in the static forward context (and binds their caches there)."""
    context = vllm_config.compilation_config.static_forward_context
    if prefix in context:
        raise ValueError(f"duplicate vLLM layer name {prefix!r}")
    context[prefix] = layer


# Flat vLLM batch <-> rlplat's right-padded batch
@dataclass
class _Batch:
    num_reqs: int
    num_tokens: int
    max_len: int  # T: longest run of new tokens
    max_context: int  # L: longest cached context
    context_R: torch.Tensor  # tokens already cached per request
    lengths_R: torch.Tensor  # new tokens per request
    row_N: torch.Tensor  # request of each flat token
    col_N: torch.Tensor  # its index among the request's new tokens

    @classmethod
    def from_metadata(cls, query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> _Batch:
        starts = query_start_loc.long()
        lengths = starts[1:] - starts[:-1]
        R = int(lengths.numel())
        num_tokens = int(starts[-1])
        context = seq_lens[:R].long() - lengths
        row = torch.repeat_interleave(torch.arange(R, device=starts.device), lengths)
        col = torch.arange(num_tokens, device=starts.device) - starts[:-1][row]
        return cls(R, num_tokens, int(lengths.max()), int(context.max()), context, lengths, row, col)

    def pad(self, flat_N: torch.Tensor) -> torch.Tensor:
        out = flat_N.new_zeros(self.num_reqs, self.max_len, *flat_N.shape[1:])
        out[self.row_N, self.col_N] = flat_N[: self.num_tokens]
        return out

    def unpad(self, padded_RT: torch.Tensor, total: int) -> torch.Tensor:
        out = padded_RT.new_zeros(total, *padded_RT.shape[2:])
        out[: self.num_tokens] = padded_RT[self.row_N, self.col_N]
        return out


class RingLinearForVLLM(nn.Module, HasInnerState, IsHybrid):
    """vLLM's view of rlplat's :class:`RingLinearForCausalLM` (held as ``causal_lm``, HF weight names inside)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise ValueError(
                "rlplat's Ring-linear vLLM plugin runs one replica per device (tensor_parallel_size=1, "
                "pipeline_parallel_size=1); scale out with more vLLM engines (data parallel) instead"
            )
        if vllm_config.speculative_config is not None:
            raise ValueError("speculative decoding is not supported by rlplat's Ring-linear vLLM plugin")
        hf_config = vllm_config.model_config.hf_config
        cfg = ring_linear_config(hf_config)
        self.config = cfg
        # The trainer's numerics settings, passed as LLM(hf_overrides={"rlplat_kernel_backend": ..., ...}):
        # the kernel mode is process-wide, and this is the vLLM worker's process.
        kernels.set_mode(
            backend=getattr(hf_config, "rlplat_kernel_backend", None),
            batch_invariant=getattr(hf_config, "rlplat_batch_invariant", None),
            chunk_size=getattr(hf_config, "rlplat_chunk_size", None),
        )
        device = torch.device(vllm_config.device_config.device)
        with torch.device("meta"):
            self.causal_lm = RingLinearForCausalLM(cfg)  # no random init: the weights come from load_weights
        self.causal_lm.to_empty(device=device)
        _rebuild_buffers(self.causal_lm, cfg, device)
        if getattr(hf_config, "rlplat_fp8", False):
            enable_fp8(self.causal_lm)
        names = [f"{prefix}caches.{i}" for i in range(cfg.num_hidden_layers)]
        self.caches = nn.ModuleList(
            PagedKVCache(cfg, vllm_config, names[i])
            if cfg.is_softmax_layer(i)
            else LinearAttentionState(cfg, vllm_config, names[i])
            for i in range(cfg.num_hidden_layers)
        )

    # VLLM model interface
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.model.word_embeddings(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if inputs_embeds is not None or intermediate_tensors is not None:
            raise ValueError(
                "rlplat's Ring-linear plugin takes token ids only (no embeddings, no pipeline stages)"
            )
        metadata = get_forward_context().attn_metadata
        if not metadata:
            return self._forward_without_cache(input_ids)
        per_layer = [metadata[c.prefix] for c in self.caches]
        batch = _Batch.from_metadata(per_layer[0].query_start_loc, per_layer[0].seq_lens)
        cache = ModelCache(batch.context_R, [c.gather(md, batch) for c, md in zip(self.caches, per_layer)])
        h_RTC = self.causal_lm.hidden_states(batch.pad(input_ids), cache, batch.lengths_R)
        for c, md, layer_cache in zip(self.caches, per_layer, cache.layers):
            c.scatter(layer_cache, md, batch)
        return batch.unpad(h_RTC, input_ids.shape[0])

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """rlplat's fp32 log-probs at temperature 1, handed to vLLM as its "logits".

        Softmax ignores a per-row shift, so sampling sees the same distribution as with raw logits. What this buys:
        with ``LLM(logprobs_mode="raw_logits")`` vLLM reports these values unchanged, which are bitwise the
        trainer's ``lm_head_logprobs`` (same GEMM, same max/tree-sum/log, same subtraction). vLLM's default
        ``raw_logprobs`` applies its own log_softmax on top, about one ulp away.
        """
        w = self.causal_lm.lm_head.weight.float()
        z, lse = lm_head_reference._chunk_stats(hidden_states, w, 1.0, kernels.get_mode().batch_invariant)
        return z - lse[:, None]

    def _forward_without_cache(self, input_ids: torch.Tensor) -> torch.Tensor:
        """vLLM's profiling and warm-up runs come without metadata: run the tokens as sequences of at most
        max_position_embeddings, so the memory profile sees a real forward."""
        N, T = input_ids.shape[0], min(input_ids.shape[0], self.config.max_position_embeddings)
        R = -(-N // T)
        ids_RT = torch.nn.functional.pad(input_ids, (0, R * T - N)).view(R, T)
        return self.causal_lm.hidden_states(ids_RT).reshape(R * T, -1)[:N]

    # Weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into the model; returns the loaded names (as vLLM's parameter names).

        The initial load streams the checkpoint through here and stops at the first tensor that does not fit.
        Multi-token-prediction tensors are skipped with a warning (rlplat does not run MTP layers). Weight
        updates go through :meth:`update_weights`, which checks everything before changing anything.
        """
        targets = self._weight_targets()
        loaded, mtp = set(), 0
        with torch.no_grad():
            for name, tensor in weights:
                if name not in targets and _is_mtp(name, self.config):
                    mtp += 1
                    continue
                problem = _weight_problem(name, tuple(tensor.shape), targets)
                if problem:
                    raise ValueError(
                        f"checkpoint tensor does not fit BailingMoeLinearV2ForCausalLM: {problem}"
                    )
                targets[name].copy_(tensor.to(device=targets[name].device, dtype=targets[name].dtype))
                loaded.add(f"causal_lm.{name}")
        if mtp:
            warnings.warn(
                f"skipped {mtp} multi-token-prediction tensor(s): rlplat does not run MTP layers",
                stacklevel=2,
            )
        return loaded

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Swap in new HF-named weights (any subset). All-or-nothing: names and shapes are checked first."""
        targets = self._weight_targets()
        problems = [p for n, t in named_tensors if (p := _weight_problem(n, tuple(t.shape), targets))]
        if problems:
            shown = "\n  ".join(problems[:20]) + (
                f"\n  ... and {len(problems) - 20} more" * (len(problems) > 20)
            )
            raise ValueError(
                f"weight update refused, nothing changed; {len(problems)} bad tensor(s):\n  {shown}"
            )
        return len(self.load_weights(named_tensors))

    def _weight_targets(self) -> dict[str, torch.Tensor]:
        return dict(self.causal_lm.named_parameters()) | {
            n: b for n, b in self.causal_lm.named_buffers() if n.endswith("expert_bias")
        }

    # Hybrid-state interface (vLLM sizes and copies the linear-attention states from these)
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int, int], ...]:
        return cls._state_spec(vllm_config)[0]

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return cls._state_spec(vllm_config)[1]

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        # every part of the state is copied whole, like the single state of vLLM's own linear attention
        (copy,) = MambaStateCopyFuncCalculator.linear_attention_state_copy_func()
        return (copy,) * (3 if kernels.get_mode().batch_invariant else 1)

    @staticmethod
    def _state_spec(vllm_config: VllmConfig):
        hf_config = vllm_config.model_config.hf_config
        return _linear_state_spec(ring_linear_config(hf_config), hf_config, vllm_config.model_config.dtype)


def _rebuild_buffers(model: RingLinearForCausalLM, cfg: RingLinearConfig, device: torch.device) -> None:
    """Buffers that are not in a checkpoint (RoPE table, decays) or must start at zero (expert bias)."""
    cos, sin = rope_table(cfg.max_position_embeddings, cfg.rotary_dim, cfg.rope_theta)
    model.model.rope_cos, model.model.rope_sin = cos.to(device), sin.to(device)
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.attention, LinearAttention):
            layer.attention.log_decay = linear_attention_log_decay(cfg, i).to(device)
    for m in model.modules():
        if isinstance(m, Router):
            m.expert_bias.zero_()


def _weight_problem(name: str, shape: tuple[int, ...], targets: dict[str, torch.Tensor]) -> str | None:
    if name not in targets:
        return f"{name}: no such tensor in this model"
    if shape != tuple(targets[name].shape):
        return f"{name}: shape {shape}, the model has {tuple(targets[name].shape)}"
    return None


def _is_mtp(name: str, cfg: RingLinearConfig) -> bool:
    if name.startswith("model.mtp"):
        return True
    parts = name.split(".")
    return (
        cfg.num_nextn_predict_layers > 0
        and len(parts) > 2
        and parts[:2] == ["model", "layers"]
        and parts[2].isdigit()
        and int(parts[2]) >= cfg.num_hidden_layers
    )
