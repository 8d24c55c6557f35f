"""Ring-linear on Megatron-core's parallel layers: rlplat's own model blocks, Megatron's layers swapped in.

Legend: B batch, T tokens, C hidden, H heads, D head dim, N tokens flattened, k experts per token, E experts.

As torchtitan's ``parallelize.py`` swaps parallel layers into its one model, this module builds the blocks of
``rlplat.models.ring_linear`` (``DecoderLayer``: ``LinearAttention`` / ``SoftmaxAttention``, ``MoE`` /
``SwiGLU``) through ``MegatronLayers``, a ``LayerFactory`` of Megatron's layers, then gives each block its
tensor-parallel rank's share of the heads and marks parameters as Megatron does (``parallelize_layer``). The
forwards are the rollout's; nothing here computes attention, an MLP or routing. What is Megatron's and what
is ours:
- Megatron-core: the process groups (``parallel_state``), ``VocabParallelEmbedding``, ``ColumnParallelLinear``
  / ``RowParallelLinear`` (partitioning and the collectives: all-reduce of input gradients, all-reduce of
  row-parallel outputs), the autograd collectives of ``tensor_parallel.mappings`` (first-dim scatter/gather),
  and ``MoEAlltoAllTokenDispatcher`` for expert parallelism (permutation by expert, split counts, the
  all-to-alls there and back, sorting by local expert), with ``transformer_config`` describing the model to
  it and to the pipeline schedule.
- rlplat: every op that defines per-token numerics (in the blocks), and the local GEMM of each parallel
  linear (``_forward_impl`` is overridden). A column-parallel GEMM splits output columns only, so it is
  bitwise the unsplit one; a row-parallel GEMM splits the reduction and differs from tensor_parallel_size 1
  by round-off.
- FP8 (``model.precision: fp8``): ``fp8_recipe: kernels`` runs rlplat's blockwise FP8 GEMM everywhere the
  rollout does; ``te_blockwise`` swaps the tensor-parallel projections for Transformer Engine's layers under
  its Float8BlockScaling recipe (same tiling, E4M3, fp32 scales; TE's own kernels, so only close to the
  rollout's), while routed experts keep rlplat's kernel and the router and LM head stay fp32.
- Not the dispatcher's last step (``combine_postprocess``): it would scale expert outputs by the routing
  weights in the experts and add a token's k rows by ``scatter_add`` in expert order (atomics on GPUs).
  The rows come back from the dispatcher's all-to-all, each goes to its token's slot, and the slots are
  summed by ``RoutedExperts`` in the rollout's fixed fp32 order. Without expert parallelism no dispatcher
  is built (it would send nothing), and neither is Megatron's ``permute`` used: its backward adds a token's
  k row gradients with ``index_add`` (atomics on GPUs), so the rows are gathered by the rollout's
  ``expert_rows`` in the same expert-major order, whose backward sums the k slots in a fixed order.

MoE under tensor parallelism (expert tensor parallel size 1, as Megatron does with sequence parallelism):
activations are replicated across tensor-parallel ranks, so each rank routes a 1/tp slice of the tokens,
sends them to the expert-parallel ranks owning their experts, and the routed outputs are all-gathered
back. Expert weights therefore receive each token's gradient exactly once across the expert-data-parallel
group, and the router's gradient is partial per tensor-parallel rank (marked ``sequence_parallel``, as
Megatron marks such parameters, and summed over the tensor-parallel group by the trainer).

A pipeline stage holds only its decoder layers, under their global numbers (``model.layers.<i>``, the HF
names, as in ``layout.py``), the embedding on the first stage, the final norm and LM head on the last.
"""

from __future__ import annotations

import functools

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
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from kernels.batch_invariant import linear as invariant_linear
from kernels.fp8 import fp8_linear
from kernels.moe_routing import expert_rows
from kernels.rope import rope_table
from rlplat.models.config import RingLinearConfig
from rlplat.models.ring_linear import (
    DecoderLayer,
    Linear,
    LinearAttention,
    LMHead,
    MoE,
    RMSNorm,
    Route,
    RoutedExperts,
    SwiGLU,
    positions_of,
)
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
    """Weights always come from an HF state (``load_local_state``); Megatron's initialisers are not used."""


class _OutputOnly:
    """Megatron's parallel linears return (output, bias); rlplat's blocks take the output (no bias here)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _bias = super().forward(x)  # type: ignore[misc]
        return out


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


class ColumnLinear(_OutputOnly, _KernelGemm, ColumnParallelLinear):
    pass


class RowLinear(_OutputOnly, _KernelGemm, RowParallelLinear):
    pass


@functools.cache
def _te_linears() -> tuple[type[nn.Module], type[nn.Module]]:
    """Transformer Engine's column/row-parallel linears, returning their output alone (GPU-only import)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    class TEColumnLinear(_OutputOnly, TEColumnParallelLinear):
        pass

    class TERowLinear(_OutputOnly, TERowParallelLinear):
        pass

    return TEColumnLinear, TERowLinear


class VocabParallelLMHead(LMHead):
    """This tensor-parallel rank's rows of the vocabulary [V/tp, C]. The fused LM head needs the whole
    vocabulary, so the weight is gathered: its backward hands each rank the gradient of its own rows, and
    every tp rank computes the same replicated loss."""

    def __init__(self, hidden: int, vocab: int, tp_group: torch.distributed.ProcessGroup):
        super().__init__(hidden, vocab // tp_group.size())
        self.tp_group = tp_group

    def reset_parameters(self) -> None:
        """Weights always come from an HF state; nn.Linear's initialiser is not used."""

    def vocab_weight(self) -> torch.Tensor:
        return gather_from_sequence_parallel_region(
            self.weight, tensor_parallel_output_grad=False, group=self.tp_group
        )


class DispatchedExperts(RoutedExperts):
    """Routed experts split over expert-parallel ranks: rank r holds experts [r·E/ep, (r+1)·E/ep) as
    ``experts.0 ..``, and Megatron's all-to-all token dispatcher carries the tokens to them and back. Each
    tensor-parallel rank routes a 1/tp slice of the tokens (module docstring). The routing and the
    fixed-order sum of a token's slots are ``RoutedExperts``' (the rollout's); only where experts run differs."""

    def __init__(self, cfg: RingLinearConfig, tcfg: TransformerConfig):
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        local = cfg.num_experts // ep
        super().__init__(SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(local))
        self.num_experts = cfg.num_experts
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dispatcher = (
            MoEAlltoAllTokenDispatcher(
                local,
                list(range(ep_rank * local, (ep_rank + 1) * local)),
                tcfg,
                ProcessGroupCollection.use_mpu_process_groups(["ep", "expt_tp", "tp_ep"]),
            )
            if ep > 1
            else None
        )

    def forward(self, x_NC: torch.Tensor, route: Route) -> torch.Tensor:
        """Route and run this tp rank's 1/tp of the tokens (padded to a multiple of tp), gather the outputs."""
        N, tp = x_NC.shape[0], self.tp_group.size()
        pad = -N % tp
        x_tok = torch.cat([x_NC, x_NC.new_zeros(pad, x_NC.shape[1])]) if pad else x_NC
        x_local = scatter_to_sequence_parallel_region(x_tok, group=self.tp_group)
        routed_local = super().forward(x_local, route)
        # the rest of the layer is replicated across tp ranks: backward takes this rank's slice, no reduce
        return gather_from_sequence_parallel_region(
            routed_local, tensor_parallel_output_grad=False, group=self.tp_group
        )[:N]

    def weighted_slots(
        self, x_NC: torch.Tensor, weights_Nk: torch.Tensor, ids_Nk: torch.Tensor
    ) -> torch.Tensor:
        E = self.num_experts
        N, k = ids_Nk.shape
        routing_map_NE = torch.zeros(N, E, dtype=torch.bool, device=x_NC.device).scatter_(1, ids_Nk, True)
        rows_per_expert_E = routing_map_NE.sum(0)
        if self.dispatcher is None:  # one expert-parallel rank: nothing to send
            # (token, slot) pairs expert-major, tokens in order within an expert: Megatron's permute order
            order = ids_Nk.flatten().argsort(stable=True)
            token_of_row, slot_of_row = order // k, order % k
            y_rows = self._run_experts(expert_rows(x_NC, order, k), rows_per_expert_E.tolist())
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
            expert_of_row = torch.repeat_interleave(
                torch.arange(E, device=x_NC.device), rows_per_expert_E, output_size=N * k
            )
            slot_of_row = (ids_Nk[token_of_row] == expert_of_row[:, None]).int().argmax(1)
        # Back in this rank's permuted order (expert-major); Megatron's unpermute would scatter_add the k
        # rows of a token in that order. Each row goes to its token's slot of its expert instead.
        slots_NkC = y_rows.new_zeros(N * k, x_NC.shape[1], dtype=torch.float32)
        slots_NkC = slots_NkC.index_copy(0, token_of_row * k + slot_of_row, y_rows.float()).view(N, k, -1)
        return slots_NkC * weights_Nk[..., None]

    def _run_experts(self, x_rows: torch.Tensor, rows_per_expert: list[int]) -> torch.Tensor:
        """This rank's experts on their consecutive runs of rows (``rows_per_expert``: local expert order)."""
        parts = x_rows.split(rows_per_expert)
        return torch.cat([self[e](x) if len(x) else x for e, x in enumerate(parts)])


class MegatronLayers:
    """The ``LayerFactory`` of Megatron's layers: tensor-parallel projections with rlplat's GEMM (or
    Transformer Engine's for its FP8 recipe), the vocabulary-parallel embedding and LM head, and routed
    experts behind the all-to-all dispatcher."""

    def __init__(self, cfg: RingLinearConfig, dtype: torch.dtype, tcfg: TransformerConfig, te_fp8: bool):
        self.tcfg, self.te_fp8 = tcfg, te_fp8
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
            return _te_linears()[0](
                n_in, n_out, config=self.config, init_method=_no_init, gather_output=False, bias=False,
                skip_bias_add=False, is_expert=False, tp_group=self.tp_group,
            )  # fmt: skip
        return ColumnLinear(
            n_in, n_out, config=self.config, init_method=_no_init, bias=False, tp_group=self.tp_group
        )

    def row(self, n_in: int, n_out: int) -> nn.Module:
        if self.te_fp8:
            return _te_linears()[1](
                n_in, n_out, config=self.config, init_method=_no_init, bias=False, input_is_parallel=True,
                skip_bias_add=False, is_expert=False, tp_group=self.tp_group,
            )  # fmt: skip
        return RowLinear(
            n_in, n_out, config=self.config, init_method=_no_init, bias=False, input_is_parallel=True,
            skip_bias_add=False, tp_group=self.tp_group,
        )  # fmt: skip

    def embedding(self, vocab: int, hidden: int) -> nn.Module:
        return VocabParallelEmbedding(
            vocab, hidden, init_method=_no_init, config=self.config, tp_group=self.tp_group
        )

    def lm_head(self, hidden: int, vocab: int) -> LMHead:
        # log-probs are defined by rlplat's fp32 LM head, never by an FP8 GEMM: the same in both recipes
        return VocabParallelLMHead(hidden, vocab, self.tp_group)

    def routed_experts(self, cfg: RingLinearConfig) -> RoutedExperts:
        return DispatchedExperts(cfg, self.tcfg)


def parallelize_layer(layer: DecoderLayer, tp: int, tp_rank: int) -> None:
    """Give a decoder layer built by ``MegatronLayers`` tensor-parallel rank ``tp_rank``'s heads — its
    column-parallel projections already produce only those — and mark its parameters as Megatron does."""
    attention = layer.attention
    attention.num_heads //= tp
    if isinstance(attention, LinearAttention):
        attention.groups //= tp
        attention.log_decay = attention.log_decay.chunk(tp)[tp_rank].clone()
        attention.g_norm = RMSNorm(attention.g_norm.weight.numel() // tp, attention.eps)
    else:
        attention.num_kv_heads //= tp
    # The per-head QK-norm weights act on every head, but a rank runs only its own, so their gradient is
    # partial: marked as Megatron marks such parameters, summed over tp ranks by the trainer.
    attention.query_layernorm.weight.sequence_parallel = True
    attention.key_layernorm.weight.sequence_parallel = True
    if isinstance(layer.mlp, MoE):
        layer.mlp.gate.weight.sequence_parallel = True  # partial per tp rank (module docstring)
        for p in layer.mlp.experts.parameters():
            p.allreduce = False  # Megatron's mark: reduced over the expert-data-parallel group


class _Stage(nn.Module):
    """A pipeline stage's part of ``RingLinearModel``: its decoder layers under their global numbers, the
    embedding on the first stage, the final norm on the last."""

    def __init__(self, cfg: RingLinearConfig, factory: MegatronLayers, ids: range, first: bool, last: bool):
        super().__init__()
        if first:
            self.word_embeddings = factory.embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, factory) for i in ids})
        if last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_table(cfg.max_position_embeddings, cfg.rotary_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)


class ParallelRingLinear(nn.Module):
    """This rank's part of a Ring-linear model: its tensor/expert shard of its pipeline stage's layers, as
    ``RingLinearForCausalLM``'s blocks. Without pipeline parallelism ``token_logprobs`` matches
    ``RingLinearForCausalLM``'s; with it the trainer runs ``stage_forward`` under Megatron's pipeline schedule
    and the last stage ends with ``logprobs_from_hidden``."""

    def __init__(self, cfg: RingLinearConfig, dtype: torch.dtype = torch.float32, fp8: str | None = None):
        super().__init__()
        self.config = cfg
        self._init_args = (dtype, fp8)
        pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        self.first_stage, self.last_stage = pp_rank == 0, pp_rank == pp - 1
        self._input: torch.Tensor | None = None  # the previous stage's hidden states (set_input_tensor)
        self.transformer_config = transformer_config(cfg, dtype)
        factory = MegatronLayers(cfg, dtype, self.transformer_config, te_fp8=fp8 == "te_blockwise")
        self.te_config = factory.config if factory.te_fp8 else None
        ids = stage_layers(cfg, pp, pp_rank)
        self.model = _Stage(cfg, factory, ids, self.first_stage, self.last_stage)
        if self.last_stage:
            self.lm_head = factory.lm_head(cfg.hidden_size, cfg.vocab_size)
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        for layer in self.model.layers.values():
            parallelize_layer(layer, tp, tp_rank)
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
        for m in self.modules():
            if isinstance(m, (_KernelGemm, Linear)):
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
        positions = positions_of(self.config, input_ids_BT, input_ids_BT.new_zeros(input_ids_BT.shape[0]))
        rope = (self.model.rope_cos, self.model.rope_sin)
        if self.first_stage:
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

    def logprobs_from_hidden(self, h_BTC: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0):
        """The last stage's fused LM-head log-probs and entropy of the final hidden states [B, T, C]."""
        return self.lm_head.logprobs(h_BTC, targets_BT, temperature)

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
