"""Ring-linear assembled from Megatron-core's parallel pieces, computing with rlplat's kernels.

Legend: B batch, T tokens, C hidden, H/G heads/kv heads (``_loc``: this tensor-parallel rank's), D head dim,
N tokens flattened, k experts per token, E experts. Parameter names are the HF names (``layout.py``).

What is Megatron's and what is ours:
- Megatron-core: the process groups (``parallel_state``), ``VocabParallelEmbedding``, ``ColumnParallelLinear``
  / ``RowParallelLinear`` (partitioning, parameter attributes, and the collectives: all-reduce of input
  gradients, all-reduce of row-parallel outputs), the autograd collectives of ``tensor_parallel.mappings``
  (first-dim scatter/gather), and ``MoEAlltoAllTokenDispatcher`` for expert parallelism (permutation by
  expert, split counts, the all-to-alls there and back, sorting by local expert), with
  ``transformer_config`` describing the model to it. Layers are built from Megatron ``ModuleSpec``s of our
  blocks (``layer_spec``: linear or softmax attention, MoE or dense MLP), as Megatron builds its own.
- rlplat's kernels: every op that defines per-token numerics — RMSNorm, partial RoPE, linear attention with
  its decays, the group-norm gate, softmax attention, the fp32 group-limited router, SwiGLU, the fused
  LM-head log-probs, and the local GEMM of each parallel linear (``_forward_impl`` is overridden). A
  column-parallel GEMM splits output columns only, so it is bitwise the unsplit one; a row-parallel GEMM
  splits the reduction and differs from tensor_parallel_size 1 by round-off.
- FP8 (``model.precision: fp8``): ``fp8_recipe: kernels`` runs rlplat's blockwise FP8 GEMM everywhere the
  rollout does; ``te_blockwise`` swaps the tensor-parallel projections for Transformer Engine's layers under
  its Float8BlockScaling recipe (same tiling, E4M3, fp32 scales; TE's own kernels, so only close to the
  rollout's), while routed experts keep rlplat's kernel and the router and LM head stay fp32.
- Not the dispatcher's last step (``combine_postprocess``): it would scale expert outputs by the routing
  weights in the experts and add a token's k rows by ``scatter_add`` in expert order (atomics on GPUs).
  The rows come back from the dispatcher's all-to-all, each goes to its token's slot, and the k slots are
  weighted and summed in the fixed fp32 order of ``rlplat.models.ring_linear.MoE``. Without expert
  parallelism no dispatcher is built (it would send nothing); Megatron's ``permute`` alone orders the rows.

MoE under tensor parallelism (expert tensor parallel size 1, as Megatron does with sequence parallelism):
activations are replicated across tensor-parallel ranks, so each rank routes a 1/tp slice of the tokens,
sends them to the expert-parallel ranks owning their experts, and the routed outputs are all-gathered
back. Expert weights therefore receive each token's gradient exactly once across the expert-data-parallel
group, and the router's gradient is partial per tensor-parallel rank (marked ``sequence_parallel``, as
Megatron marks such parameters, and summed over the tensor-parallel group by the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_utils import permute
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from kernels.batch_invariant import linear as invariant_linear
from kernels.fp8 import fp8_linear
from kernels.group_norm_gate import group_rms_norm_gate
from kernels.linear_attention import linear_attention
from kernels.lm_head import lm_head_logprobs
from kernels.moe_routing import group_limited_topk
from kernels.rope import apply_rotary, rope_table
from kernels.softmax_attention import softmax_attention
from kernels.swiglu import swiglu
from rlplat.models.config import RingLinearConfig
from rlplat.models.ring_linear import RMSNorm, Router, SwiGLU, linear_attention_log_decay, sum_slots
from rlplat.train.megatron.layout import stage_layers


def transformer_config(cfg: RingLinearConfig, dtype: torch.dtype) -> TransformerConfig:
    """The model in Megatron's terms, for the parts of Megatron that read one: the MoE token dispatcher
    (experts, top-k, expert-parallel size) and the pipeline schedule (dtype of the hidden states sent between
    stages, shapes sent ahead, loss scaling). Parallel sizes are those of the current process groups."""
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=1,
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_token_dispatcher_type="alltoall",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        variable_seq_lengths=True,  # micro-batches differ in rows and length: send shapes first
        calculate_per_token_loss=True,  # the Trainer's loss is already normalised over the whole step
        perform_initialization=False,
    )


def _no_init(weight: torch.Tensor) -> None:
    """Weights always come from an HF state (``load_hf_state``); Megatron's initialisers are not used."""


class _KernelGemm:
    """Megatron's partitioning and collectives around rlplat's local GEMM (plain or blockwise FP8)."""

    fp8 = False

    def _forward_impl(self, input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group, **_unused):
        assert bias is None and not sequence_parallel, "rlplat's layers have no bias and no sequence parallel"
        if allreduce_dgrad:
            # Megatron's own GEMM all-reduces the input gradient inside its autograd function; here the
            # same all-reduce comes from the identity-forward region in front of our GEMM.
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return fp8_linear(input, weight) if self.fp8 else invariant_linear(input, weight)


class ColumnLinear(_KernelGemm, ColumnParallelLinear):
    pass


class RowLinear(_KernelGemm, RowParallelLinear):
    pass


class ParallelLinears:
    """Builds the tensor-parallel projections: rlplat's GEMM, or Transformer Engine's for FP8 on GPUs."""

    def __init__(self, cfg: RingLinearConfig, dtype: torch.dtype, te_fp8: bool):
        self.te_fp8 = te_fp8
        self.tp_group = ps.get_tensor_model_parallel_group()  # passed explicitly: newer Megatron requires it
        tp = ps.get_tensor_model_parallel_world_size()
        if te_fp8:
            self.config = TransformerConfig(
                num_layers=cfg.num_hidden_layers,
                hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_attention_heads,
                tensor_model_parallel_size=tp,
                params_dtype=dtype,
                bf16=dtype == torch.bfloat16,
                fp8="e4m3",
                fp8_recipe="blockwise",
                perform_initialization=False,
                # TE would keep the FP8 weights quantised at the first forward (is_first_microbatch) until told
                # that a new step began, which only Megatron's own training loop does: quantise every forward.
                disable_parameter_transpose_cache=True,
            )
        else:
            self.config = ModelParallelConfig(
                tensor_model_parallel_size=tp,
                params_dtype=dtype,
                use_cpu_initialization=True,  # also allocates on the current device below, not cuda:0
                perform_initialization=False,
            )

    def column(self, n_in: int, n_out: int) -> nn.Module:
        if self.te_fp8:
            from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

            return TEColumnParallelLinear(
                n_in, n_out, config=self.config, init_method=_no_init, gather_output=False, bias=False,
                skip_bias_add=False, is_expert=False, tp_group=self.tp_group,
            )  # fmt: skip
        return ColumnLinear(
            n_in, n_out, config=self.config, init_method=_no_init, bias=False, tp_group=self.tp_group
        )

    def row(self, n_in: int, n_out: int) -> nn.Module:
        if self.te_fp8:
            from megatron.core.extensions.transformer_engine import TERowParallelLinear

            return TERowParallelLinear(
                n_in, n_out, config=self.config, init_method=_no_init, bias=False, input_is_parallel=True,
                skip_bias_add=False, is_expert=False, tp_group=self.tp_group,
            )  # fmt: skip
        return RowLinear(
            n_in, n_out, config=self.config, init_method=_no_init, bias=False, input_is_parallel=True,
            skip_bias_add=False, tp_group=self.tp_group,
        )  # fmt: skip


def _out(result):
    """Megatron's parallel linears return (output, bias)."""
    return result[0]


def _mark_shared_by_heads(attention: nn.Module) -> None:
    """The per-head QK-norm weights act on every head, but a tensor-parallel rank runs only its own heads, so
    its gradient is partial: marked as Megatron marks such parameters, summed over tp ranks by the trainer."""
    attention.query_layernorm.weight.sequence_parallel = True
    attention.key_layernorm.weight.sequence_parallel = True


class ParallelLinearAttention(nn.Module):
    def __init__(self, cfg: RingLinearConfig, lin: ParallelLinears, layer_idx: int):
        super().__init__()
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        H, D, C = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        self.heads, self.head_dim = H // tp, D
        self.groups, self.eps = cfg.group_norm_size // tp, cfg.rms_norm_eps
        self.query_key_value = lin.column(C, 3 * H * D)
        self.query_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.g_proj = lin.column(C, H * D)
        self.g_norm = RMSNorm(H * D // tp, cfg.rms_norm_eps)
        self.dense = lin.row(H * D, C)
        _mark_shared_by_heads(self)
        log_decay = linear_attention_log_decay(cfg, layer_idx).chunk(tp)[rank]
        self.register_buffer("log_decay", log_decay.clone(), persistent=False)

    def forward(self, x_BTC, positions_BT, rope):
        B, T, _ = x_BTC.shape
        qkv = _out(self.query_key_value(x_BTC)).view(B, T, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        q = apply_rotary(self.query_layernorm(q), positions_BT, *rope)
        k = apply_rotary(self.key_layernorm(k), positions_BT, *rope)
        o, _ = linear_attention(q, k, v, self.log_decay, self.head_dim**-0.5)
        gate = _out(self.g_proj(x_BTC))
        o = group_rms_norm_gate(o.reshape(B, T, -1), gate, self.g_norm.weight, self.groups, self.eps)
        return _out(self.dense(o))


class ParallelSoftmaxAttention(nn.Module):
    def __init__(self, cfg: RingLinearConfig, lin: ParallelLinears):
        super().__init__()
        tp = ps.get_tensor_model_parallel_world_size()
        H, G, D, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.heads, self.kv_heads, self.head_dim = H // tp, G // tp, D
        self.query_key_value = lin.column(C, (H + 2 * G) * D)
        self.query_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.dense = lin.row(H * D, C)
        _mark_shared_by_heads(self)

    def forward(self, x_BTC, positions_BT, rope):
        B, T, _ = x_BTC.shape
        H, G, D = self.heads, self.kv_heads, self.head_dim
        q, k, v = _out(self.query_key_value(x_BTC)).split([H * D, G * D, G * D], dim=-1)
        q = apply_rotary(self.query_layernorm(q.reshape(B, T, H, D)), positions_BT, *rope)
        k = apply_rotary(self.key_layernorm(k.reshape(B, T, G, D)), positions_BT, *rope)
        o = softmax_attention(q, k, v.reshape(B, T, G, D), positions_BT, D**-0.5)
        return _out(self.dense(o.reshape(B, T, H * D)))


class ParallelSwiGLU(nn.Module):
    """Dense or shared-expert SwiGLU: gate/up column-parallel, down row-parallel."""

    def __init__(self, cfg: RingLinearConfig, lin: ParallelLinears, intermediate: int):
        super().__init__()
        hidden = cfg.hidden_size
        self.gate_proj = lin.column(hidden, intermediate)
        self.up_proj = lin.column(hidden, intermediate)
        self.down_proj = lin.row(intermediate, hidden)

    def forward(self, x):
        return _out(self.down_proj(swiglu(_out(self.gate_proj(x)), _out(self.up_proj(x)))))


class ParallelMoE(nn.Module):
    """Group-limited sigmoid routing, routed experts split over expert-parallel ranks (Megatron's all-to-all
    token dispatcher), TP shared expert."""

    def __init__(self, cfg: RingLinearConfig, lin: ParallelLinears, tcfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        local_experts = cfg.num_experts // ep
        self.gate = Router(cfg)
        self.gate.weight.sequence_parallel = True  # partial gradient per tp rank (see module docstring)
        self.experts = nn.ModuleList(
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(local_experts)
        )
        for p in self.experts.parameters():
            p.allreduce = False  # Megatron's mark: reduced over the expert-data-parallel group
        self.shared_experts = (
            ParallelSwiGLU(cfg, lin, cfg.shared_expert_intermediate_size)
            if cfg.num_shared_experts > 0
            else None
        )
        self.dispatcher = (
            MoEAlltoAllTokenDispatcher(
                local_experts,
                list(range(ep_rank * local_experts, (ep_rank + 1) * local_experts)),
                tcfg,
                ProcessGroupCollection.use_mpu_process_groups(["ep", "expt_tp", "tp_ep"]),
            )
            if ep > 1
            else None
        )

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        x_NC = x_BTC.reshape(-1, x_BTC.shape[-1])
        N, tp = x_NC.shape[0], ps.get_tensor_model_parallel_world_size()
        pad = -N % tp
        x_tok = torch.cat([x_NC, x_NC.new_zeros(pad, x_NC.shape[1])]) if pad else x_NC
        tp_group = ps.get_tensor_model_parallel_group()
        x_local = scatter_to_sequence_parallel_region(x_tok, group=tp_group)
        routed_local = self._routed(x_local)
        # the rest of the layer is replicated across tp ranks: backward takes this rank's slice, no reduce
        routed = gather_from_sequence_parallel_region(
            routed_local, tensor_parallel_output_grad=False, group=tp_group
        )[:N]
        out = routed
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_NC).float()
        return out.to(x_BTC.dtype).view_as(x_BTC)

    def _routed(self, x_NC: torch.Tensor) -> torch.Tensor:
        """Sum over the k chosen experts of weight · expert(x), fp32 [N, C], slots added in a fixed order."""
        cfg, E = self.cfg, self.cfg.num_experts
        weights_Nk, ids_Nk = group_limited_topk(
            self.gate(x_NC), self.gate.expert_bias, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
            cfg.routed_scaling_factor, cfg.norm_topk_prob,
        )  # fmt: skip
        N, k = ids_Nk.shape
        routing_map_NE = torch.zeros(N, E, dtype=torch.bool, device=x_NC.device).scatter_(1, ids_Nk, True)
        rows_per_expert_E = routing_map_NE.sum(0)
        if self.dispatcher is None:  # one expert-parallel rank: Megatron's permutation, nothing to send
            x_rows, _, token_of_row = permute(x_NC, routing_map_NE, num_out_tokens=N * k)
            y_rows = self._run_experts(x_rows, rows_per_expert_E.tolist())
        else:
            # The dispatcher carries routing probabilities to the experts, where Megatron's experts would
            # scale by them; ours are applied after the combine, in fp32 as the rollout does, so its copy is
            # unused (k floats a token on top of C).
            d = self.dispatcher
            probs_NE = torch.zeros(N, E, device=x_NC.device).scatter_(1, ids_Nk, weights_Nk.detach())
            x_rows, probs_rows = d.token_dispatch(*d.dispatch_preprocess(x_NC, routing_map_NE, probs_NE))
            x_rows, tokens_per_expert, _ = d.dispatch_postprocess(x_rows, probs_rows)
            y_rows = self._run_experts(x_rows, tokens_per_expert.tolist())
            y_rows = d.token_combine(d.combine_preprocess(y_rows))
            token_of_row = d.reversed_local_input_permutation_mapping
        # Back in this rank's permuted order (expert-major); Megatron's unpermute would scatter_add the k
        # rows of a token in that order (atomics on GPUs). Each row goes to its token's slot of its expert
        # instead, and the slots are weighted and summed in rlplat.models.ring_linear.MoE's fixed order.
        expert_of_row = torch.repeat_interleave(
            torch.arange(E, device=x_NC.device), rows_per_expert_E, output_size=N * k
        )
        slot_of_row = (ids_Nk[token_of_row] == expert_of_row[:, None]).int().argmax(1)
        slots_NkC = y_rows.new_zeros(N * k, x_NC.shape[1], dtype=torch.float32)
        slots_NkC = slots_NkC.index_copy(0, token_of_row * k + slot_of_row, y_rows.float()).view(N, k, -1)
        return sum_slots(slots_NkC * weights_Nk[..., None])

    def _run_experts(self, x_rows: torch.Tensor, rows_per_expert: list[int]) -> torch.Tensor:
        """This rank's experts on their consecutive runs of rows (``rows_per_expert``: local expert order)."""
        parts = x_rows.split(rows_per_expert)
        return torch.cat([self.experts[e](x) if len(x) else x for e, x in enumerate(parts)])


@dataclass
class DecoderLayerSubmodules:
    """What a decoder layer is made of, as Megatron's layer specs say it: its token mixer and its MLP."""

    attention: ModuleSpec
    mlp: ModuleSpec


def layer_spec(cfg: RingLinearConfig, layer_idx: int, tcfg: TransformerConfig) -> ModuleSpec:
    """Layer ``layer_idx`` as a Megatron ``ModuleSpec``: linear attention with its group-norm gate or GQA
    softmax attention (``cfg.is_softmax_layer``), then the routed MoE with its shared expert or a dense
    SwiGLU (``cfg.is_moe_layer``). Built with ``build_module(spec, cfg=..., lin=...)``."""
    attention = (
        ModuleSpec(module=ParallelSoftmaxAttention)
        if cfg.is_softmax_layer(layer_idx)
        else ModuleSpec(module=ParallelLinearAttention, params={"layer_idx": layer_idx})
    )
    mlp = (
        ModuleSpec(module=ParallelMoE, params={"tcfg": tcfg})
        if cfg.is_moe_layer(layer_idx)
        else ModuleSpec(module=ParallelSwiGLU, params={"intermediate": cfg.intermediate_size})
    )
    return ModuleSpec(module=ParallelDecoderLayer, submodules=DecoderLayerSubmodules(attention, mlp))


class ParallelDecoderLayer(nn.Module):
    def __init__(self, cfg: RingLinearConfig, lin: ParallelLinears, submodules: DecoderLayerSubmodules):
        super().__init__()
        C = cfg.hidden_size
        self.input_layernorm = RMSNorm(C, cfg.rms_norm_eps)
        self.attention = build_module(submodules.attention, cfg=cfg, lin=lin)
        self.post_attention_layernorm = RMSNorm(C, cfg.rms_norm_eps)
        self.mlp = build_module(submodules.mlp, cfg=cfg, lin=lin)

    def forward(self, x, positions_BT, rope):
        h = x + self.attention(self.input_layernorm(x), positions_BT, rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Model(nn.Module):
    """The stage's decoder layers under their global numbers (``layers.<i>``, as in the HF names); the
    embedding on the first stage, the final norm on the last."""

    def __init__(
        self, cfg: RingLinearConfig, lin: ParallelLinears, tcfg: TransformerConfig, layers: range, first: bool,
        last: bool,
    ):  # fmt: skip
        super().__init__()
        if first:
            self.word_embeddings = VocabParallelEmbedding(
                cfg.vocab_size,
                cfg.hidden_size,
                init_method=_no_init,
                config=lin.config,
                tp_group=lin.tp_group,
            )
        self.layers = nn.ModuleDict(
            {str(i): build_module(layer_spec(cfg, i, tcfg), cfg=cfg, lin=lin) for i in layers}
        )
        if last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_table(cfg.max_position_embeddings, cfg.rotary_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)


class ParallelRingLinear(nn.Module):
    """This rank's part of a Ring-linear model: its tensor/expert shard of its pipeline stage's layers.
    Without pipeline parallelism ``token_logprobs`` matches ``RingLinearForCausalLM``'s; with it the trainer
    runs ``stage_forward`` under Megatron's pipeline schedule and the last stage ends with
    ``logprobs_from_hidden``."""

    def __init__(self, cfg: RingLinearConfig, dtype: torch.dtype = torch.float32, fp8: str | None = None):
        super().__init__()
        self.config = cfg
        self._init_args = (dtype, fp8)
        pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        self.first_stage, self.last_stage = pp_rank == 0, pp_rank == pp - 1
        self._input: torch.Tensor | None = None  # the previous stage's hidden states (set_input_tensor)
        lin = ParallelLinears(cfg, dtype, te_fp8=fp8 == "te_blockwise")
        self.te_config = lin.config if lin.te_fp8 else None
        self.transformer_config = transformer_config(cfg, dtype)
        layers = stage_layers(cfg, pp, pp_rank)
        self.model = _Model(cfg, lin, self.transformer_config, layers, self.first_stage, self.last_stage)
        if self.last_stage and not lin.te_fp8:
            self.lm_head = lin.column(cfg.hidden_size, cfg.vocab_size)
        elif self.last_stage:
            # log-probs are defined by rlplat's fp32 LM head, never by an FP8 GEMM
            self.lm_head = ColumnLinear(
                cfg.hidden_size, cfg.vocab_size,
                config=ModelParallelConfig(
                    tensor_model_parallel_size=lin.config.tensor_model_parallel_size, params_dtype=dtype,
                    use_cpu_initialization=True, perform_initialization=False,
                ),
                init_method=_no_init, bias=False, tp_group=lin.tp_group,
            )  # fmt: skip
        # parameters only: buffers (RoPE tables, decays, expert_bias) stay fp32, as rlplat.models.precision
        for p in self.parameters():
            p.data = p.data.to(dtype)
        # rlplat's FP8 on our GEMMs in both recipes: with te_blockwise the tensor-parallel projections are TE
        # layers (untouched here) and the routed experts keep the rollout's FP8 kernel
        self.set_fp8(fp8 is not None)

    def __deepcopy__(self, memo) -> ParallelRingLinear:
        """A twin on the same ranks holding copies of this rank's tensors (the Trainer's KL reference):
        Megatron's layers keep their process groups, which cannot be copied, so the twin is built anew."""
        twin = ParallelRingLinear(self.config, *self._init_args).to(next(self.parameters()).device)
        twin.load_local_state(self.local_state())
        return twin.train(self.training)

    def set_fp8(self, enabled: bool) -> None:
        """rlplat's blockwise FP8 on every projection except the router and the LM head (as the rollout)."""
        from rlplat.models.ring_linear import Linear

        for name, m in self.named_modules():
            if isinstance(m, (_KernelGemm, Linear)) and name != "lm_head":
                m.fp8 = enabled

    def set_input_tensor(self, tensors: list[torch.Tensor | None] | torch.Tensor | None) -> None:
        """Megatron's pipeline schedule hands a stage the previous stage's output before each forward."""
        self._input = tensors[0] if isinstance(tensors, list) else tensors

    def stage_forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """This stage's layers: from the token ids on the first stage, else from ``set_input_tensor``'s
        hidden states [B, T, C]; the last stage ends with the final norm."""
        if self.te_config is None:
            return self._stage_forward(input_ids_BT)
        from megatron.core.fp8_utils import get_fp8_context

        with get_fp8_context(self.te_config):
            return self._stage_forward(input_ids_BT)

    def _stage_forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        B, T = input_ids_BT.shape
        if self.config.max_position_embeddings < T:
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        positions = torch.arange(T, device=input_ids_BT.device)[None, :].expand(B, T)
        rope = (self.model.rope_cos, self.model.rope_sin)
        if self.first_stage:
            vocab = self.config.vocab_size
            if input_ids_BT.numel() and (int(input_ids_BT.min()) < 0 or int(input_ids_BT.max()) >= vocab):
                raise ValueError(
                    f"input_ids must be token ids in [0, {vocab}); got values outside that range"
                )
            x = self.model.word_embeddings(input_ids_BT)
        else:
            assert self._input is not None, (
                "a later pipeline stage runs on the previous stage's hidden states"
            )
            x = self._input
        for layer in self.model.layers.values():
            x = layer(x, positions, rope)
        return self.model.norm(x) if self.last_stage else x

    def token_logprobs(self, input_ids_BT, targets_BT, temperature: float = 1.0):
        """(log-prob of each target, entropy) fp32 [B, T], the same on every tensor-parallel rank (the
        whole model on this rank: no pipeline parallelism)."""
        assert self.first_stage and self.last_stage, (
            "with pipeline stages, run the trainer's pipeline schedule"
        )
        return self.logprobs_from_hidden(self.stage_forward(input_ids_BT), targets_BT, temperature)

    def logprobs_from_hidden(self, h: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0):
        """The last stage's fused LM-head log-probs and entropy of the final hidden states [B, T, C]."""
        B, T, C = h.shape
        # The fused LM head needs the whole vocabulary: gather the vocab-split weight (its backward hands
        # each rank the gradient of its own rows; every tp rank computes the same replicated loss).
        w_VC = gather_from_sequence_parallel_region(
            self.lm_head.weight, tensor_parallel_output_grad=False, group=ps.get_tensor_model_parallel_group()
        )
        logp, entropy = lm_head_logprobs(h.reshape(B * T, C), w_VC, targets_BT.reshape(-1), temperature)
        return logp.view(B, T), entropy.view(B, T)

    # -- weights ---------------------------------------------------------------------------------------------

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's tensors under HF names (local expert numbering): parameters and ``expert_bias``."""
        out = {n: p for n, p in self.named_parameters()}
        out.update({n: b for n, b in self.named_buffers() if n.endswith("expert_bias")})
        return out

    @torch.no_grad()
    def load_local_state(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.local_state()
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if missing or unexpected:
            raise ValueError(
                f"shard does not fit this model: missing {missing[:10]}, unexpected {unexpected[:10]}"
            )
        for name, t in mine.items():
            if tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(
                    f"shard tensor {name} is {tuple(state[name].shape)}, this rank expects {tuple(t.shape)} "
                    "(saved with other parallel sizes?)"
                )
            t.copy_(state[name].to(t.dtype))
