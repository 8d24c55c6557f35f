"""The Megatron backend's parallel layout: preflight checks and the HF ⇄ sharded tensor mapping (torch only).

Nothing here imports megatron-core or starts a process group, so every check runs before one exists.

A shard is what one (tensor-parallel rank, expert-parallel rank, pipeline stage) holds, under the HF names of
the model, with experts renumbered locally: expert-parallel rank r holds global experts [r·E/ep, (r+1)·E/ep) as
``mlp.experts.0 ..``. Pipeline stage s holds the decoder layers [s·L/pp, (s+1)·L/pp) under their global
numbers, stage 0 also the embedding, the last stage also the final norm and ``lm_head``.
Splits, per HF tensor (H heads, G kv heads, D head dim, C hidden):

- vocabulary rows (``word_embeddings``, ``lm_head``) and the column-parallel projections (``g_proj``,
  ``gate_proj``, ``up_proj``, the ``g_norm`` weight) along dim 0, in contiguous blocks;
- the linear-attention ``query_key_value`` [3·H·D, C] by heads inside each of q, k, v (its output is
  viewed as (3, H, D)); the softmax one [(H+2G)·D, C] as q heads and kv heads, re-concatenated per rank;
- row-parallel ``dense`` / ``down_proj`` along dim 1;
- routed experts by expert index across expert-parallel ranks (not tensor-split: expert tensor parallel = 1);
- everything else (norms, the fp32 router and its ``expert_bias``) replicated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlplat.models.config import RingLinearConfig

LAYOUT_FILE = "megatron_layout.json"
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(\d+)(\..*)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_DIM0 = ("g_proj.weight", "g_norm.weight", "gate_proj.weight", "up_proj.weight")
_DIM1 = ("dense.weight", "down_proj.weight")


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of one Megatron job; ``world = tp · pp · dp`` and experts split ``ep`` ways inside tp · dp."""

    tp: int = 1
    ep: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def layout_of(trainer_cfg) -> ParallelLayout:
    """The layout a ``TrainerConfig`` asks for."""
    m = trainer_cfg.megatron
    return ParallelLayout(
        m.tensor_parallel_size, m.expert_parallel_size, m.pipeline_parallel_size, trainer_cfg.dp_world_size
    )


def check_layout(
    model_cfg: RingLinearConfig,
    trainer_cfg,
    *,
    precision: str = "fp32",
    world_size: int | None = None,
    cuda_available: bool | None = None,
    hardware: bool = True,
) -> ParallelLayout:
    """Refuse a layout that cannot work, naming the setting to change. Run before any process group starts.

    ``hardware=False`` skips what depends on this machine (a GPU and Transformer Engine for the TE recipe),
    to validate a launch config elsewhere."""
    lay = layout_of(trainer_cfg)
    tp, ep, pp = lay.tp, lay.ep, lay.pp
    fix = "trainer.megatron"
    if world_size is not None and world_size != lay.world:
        raise ValueError(
            f"{world_size} processes, but tensor_parallel_size {tp} × pipeline_parallel_size {pp} × "
            f"trainer.dp_world_size {lay.dp} = {lay.world}; start {lay.world} processes or change the sizes"
        )
    H, G, C = model_cfg.num_attention_heads, model_cfg.num_key_value_heads, model_cfg.hidden_size
    tp_divides = {
        "num_attention_heads": H,
        "num_key_value_heads": G,
        "group_norm_size (groups of the linear-attention output norm)": model_cfg.group_norm_size,
        "vocab_size": model_cfg.vocab_size,
        "intermediate_size": model_cfg.intermediate_size,
    }
    if model_cfg.num_shared_experts > 0:
        tp_divides["shared_expert_intermediate_size"] = model_cfg.shared_expert_intermediate_size
    for name, value in tp_divides.items():
        if value % tp:
            raise ValueError(
                f"{fix}.tensor_parallel_size={tp} does not divide the model's {name}={value}; "
                "choose a tensor_parallel_size that divides it"
            )
    if model_cfg.num_experts % ep:
        raise ValueError(
            f"{fix}.expert_parallel_size={ep} does not divide num_experts={model_cfg.num_experts}; "
            "choose an expert_parallel_size that divides it"
        )
    if (tp * lay.dp) % ep:
        raise ValueError(
            f"{fix}.expert_parallel_size={ep} must divide tensor_parallel_size × dp_world_size = {tp * lay.dp} "
            "(experts are spread over the ranks of one pipeline stage)"
        )
    if model_cfg.num_hidden_layers % pp:
        raise ValueError(
            f"{fix}.pipeline_parallel_size={pp} does not divide num_hidden_layers="
            f"{model_cfg.num_hidden_layers}; choose a divisor"
        )
    if C % tp:
        raise ValueError(f"{fix}.tensor_parallel_size={tp} does not divide hidden_size={C}")
    if precision == "fp8" and trainer_cfg.megatron.fp8_recipe == "kernels" and tp > 1:
        _check_fp8_blocks(model_cfg, tp)
    if trainer_cfg.megatron.fp8_recipe == "te_blockwise":
        if precision != "fp8":
            raise ValueError(
                f"trainer.megatron.fp8_recipe: te_blockwise needs model.precision: fp8 (it is {precision})"
            )
        if hardware:
            check_te_fp8(cuda_available)
    return lay


def _check_fp8_blocks(cfg: RingLinearConfig, tp: int, block: int = 128) -> None:
    """rlplat's FP8 GEMM scales 1×128 activation tiles along K and 128×128 weight blocks: a tensor-parallel
    shard boundary inside a tile or block would give shards scales the unsplit (rollout) GEMM never uses."""
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pieces = {
        "num_attention_heads × head_dim / tp (attention output, q/k/v shards)": H * D // tp,
        "num_key_value_heads × head_dim / tp (softmax-attention k/v shards)": G * D // tp,
        "intermediate_size / tp": cfg.intermediate_size // tp,
    }
    if cfg.num_shared_experts > 0:
        pieces["shared_expert_intermediate_size / tp"] = cfg.shared_expert_intermediate_size // tp
    for what, size in pieces.items():
        if size % block:
            raise ValueError(
                f"FP8 with tensor_parallel_size={tp}: {what} = {size} is not a multiple of {block}, so shards "
                "would scale other FP8 blocks than the rollout's GEMM; choose a smaller tensor_parallel_size, "
                "model.precision bf16, or trainer.megatron.fp8_recipe: te_blockwise"
            )


def check_run(cfg) -> ParallelLayout:
    """``rlplat run``'s preflight for backend megatron (an ``ExperimentConfig``): the layout fits the model, before
    any process group starts. The run starts one trainer actor per rank (``workers.trainer.num`` = world size)."""
    from rlplat.models.config import RingLinearConfig
    from rlplat.models.presets import preset

    if cfg.model.path is not None:
        model_cfg = RingLinearConfig.from_json(Path(cfg.model.path) / "config.json")
    else:
        model_cfg = preset(cfg.model.preset, **cfg.model.overrides)
    return check_layout(model_cfg, cfg.trainer, precision=cfg.model.precision)


def check_te_fp8(cuda_available: bool | None = None) -> None:
    """Transformer Engine's FP8 recipe needs a CUDA GPU and the TE package."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise ValueError(
            "trainer.megatron.fp8_recipe: te_blockwise runs Transformer Engine FP8 GEMMs, which need a CUDA "
            "GPU; none is visible. Use fp8_recipe: kernels (rlplat's blockwise FP8) or run on GPUs"
        )
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "trainer.megatron.fp8_recipe: te_blockwise needs Transformer Engine: pip install "
            "'transformer_engine[pytorch]' on a CUDA machine (or use fp8_recipe: kernels)"
        ) from err


# Tensor mapping


def _layer(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _qkv_split(name: str, cfg: RingLinearConfig) -> list[int] | None:
    """Row counts of the q, k, v blocks of a fused qkv weight (None for any other tensor)."""
    if not name.endswith("attention.query_key_value.weight"):
        return None
    D, H = cfg.head_dim, cfg.num_attention_heads
    G = cfg.num_key_value_heads if cfg.is_softmax_layer(_layer(name)) else H
    return [H * D, G * D, G * D]


def _split_dim(name: str) -> int | None:
    """The dimension a non-qkv tensor is split along across tensor-parallel ranks (None: replicated)."""
    if "mlp.experts." in name:
        return None
    if name.endswith(_DIM0) or name in ("model.word_embeddings.weight", "lm_head.weight"):
        return 0
    if name.endswith(_DIM1):
        return 1
    return None


def shard_tensor(name: str, full: torch.Tensor, cfg: RingLinearConfig, tp: int, tp_rank: int) -> torch.Tensor:
    """Tensor-parallel rank ``tp_rank``'s part of the HF tensor ``name`` (a contiguous copy)."""
    qkv = _qkv_split(name, cfg)
    if qkv is not None and tp > 1:
        return torch.cat([part.chunk(tp, 0)[tp_rank] for part in full.split(qkv, 0)], 0).contiguous()
    dim = _split_dim(name)
    if dim is None or tp == 1:
        return full.clone()
    return full.chunk(tp, dim)[tp_rank].contiguous()


def unshard_tensor(name: str, parts: list[torch.Tensor], cfg: RingLinearConfig) -> torch.Tensor:
    """The HF tensor from its tensor-parallel parts (rank order); inverse of ``shard_tensor``."""
    tp = len(parts)
    qkv = _qkv_split(name, cfg)
    if qkv is not None and tp > 1:
        blocks = [p.split([n // tp for n in qkv], 0) for p in parts]
        return torch.cat([torch.cat([b[i] for b in blocks], 0) for i in range(3)], 0)
    dim = _split_dim(name)
    if dim is None or tp == 1:
        return parts[0].clone()
    return torch.cat(parts, dim)


def is_tensor_parallel(name: str) -> bool:
    """Whether ``name`` is split across tensor-parallel ranks (otherwise every tp rank holds all of it)."""
    return name.endswith("attention.query_key_value.weight") or _split_dim(name) is not None


def expert_owner(name: str, cfg: RingLinearConfig, ep: int) -> tuple[int, str] | None:
    """(expert-parallel rank, local name) of a routed-expert tensor; None for any other tensor."""
    m = _EXPERT_RE.match(name)
    if m is None:
        return None
    per_rank = cfg.num_experts // ep
    e = int(m.group(2))
    return e // per_rank, f"{m.group(1)}{e % per_rank}{m.group(3)}"


def global_expert_name(local_name: str, cfg: RingLinearConfig, ep: int, ep_rank: int) -> str:
    """The HF name of a local expert tensor of expert-parallel rank ``ep_rank``."""
    m = _EXPERT_RE.match(local_name)
    if m is None:
        return local_name
    return f"{m.group(1)}{ep_rank * (cfg.num_experts // ep) + int(m.group(2))}{m.group(3)}"


def stage_layers(cfg: RingLinearConfig, pp: int, pp_rank: int) -> range:
    """The global indices of the decoder layers pipeline stage ``pp_rank`` runs (an even split)."""
    per_stage = cfg.num_hidden_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def stage_of(name: str, cfg: RingLinearConfig, pp: int) -> int:
    """The pipeline stage holding the HF tensor ``name``."""
    layer = _layer(name)
    if layer is not None:
        return layer // (cfg.num_hidden_layers // pp)
    return 0 if name.startswith("model.word_embeddings.") else pp - 1  # the final norm and lm_head


def shard_tag(tp_rank: int, ep_rank: int, pp_rank: int) -> str:
    """The suffix of one shard's files (``model-<tag>.safetensors``, a checkpoint's ``trainer-<tag>.pt``)."""
    return f"tp{tp_rank}-ep{ep_rank}-pp{pp_rank}"


def shard_state(
    names: list[str],
    get: Callable[[str], torch.Tensor],
    cfg: RingLinearConfig,
    lay: ParallelLayout,
    tp_rank: int,
    ep_rank: int,
    pp_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """One rank's shard, reading only the HF tensors it needs through ``get`` (so a big checkpoint streams)."""
    out = {}
    for name in names:
        if stage_of(name, cfg, lay.pp) != pp_rank:
            continue
        owner = expert_owner(name, cfg, lay.ep)
        if owner is not None:
            if owner[0] == ep_rank:
                out[owner[1]] = get(name).clone()
            continue
        out[name] = shard_tensor(name, get(name), cfg, lay.tp, tp_rank)
    return out


def merge_states(
    shards: dict[tuple[int, int, int], dict[str, torch.Tensor]], cfg: RingLinearConfig, lay: ParallelLayout
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) pairs from (tp_rank, ep_rank, pp_rank) shards, one tensor at a time, stage by
    stage. Not every triple need exist: with tp=ep=2 on two ranks the pairs are (0, 0) and (1, 1); each tp
    rank and each ep rank must appear in every stage."""
    for p in range(lay.pp):
        stage = sorted((k for k in shards if k[2] == p), reverse=True)  # the lowest triple of each rank wins
        by_tp = {k[0]: shards[k] for k in stage}
        by_ep = {k[1]: shards[k] for k in stage}
        missing = [f"tp_rank {t}" for t in range(lay.tp) if t not in by_tp]
        missing += [f"ep_rank {e}" for e in range(lay.ep) if e not in by_ep]
        if missing:
            raise ValueError(f"no shard of pipeline stage {p} holds {', '.join(missing)} of layout {lay}")
        for name in by_tp[0]:
            if expert_owner(name, cfg, 1) is not None:
                continue
            yield name, unshard_tensor(name, [by_tp[t][name] for t in range(lay.tp)], cfg)
        for e in range(lay.ep):
            for name, t in by_ep[e].items():
                if expert_owner(name, cfg, 1) is not None:
                    yield global_expert_name(name, cfg, lay.ep, e), t.clone()


# The layout file of a sharded directory


def write_layout(directory: Path, lay: ParallelLayout, extra: dict | None = None) -> None:
    (directory / LAYOUT_FILE).write_text(json.dumps({**lay.to_json(), **(extra or {})}, indent=2) + "\n")


def read_layout(directory: str | Path) -> ParallelLayout:
    path = Path(directory) / LAYOUT_FILE
    if not path.exists():
        raise ValueError(f"{directory} has no {LAYOUT_FILE}: not a Megatron-backend checkpoint of rlplat")
    d = json.loads(path.read_text())
    return ParallelLayout(d["tp"], d["ep"], d["pp"], d["dp"])


def check_checkpoint_layout(directory: str | Path, want: ParallelLayout) -> None:
    """A checkpoint resumes only under the tensor/expert/pipeline sizes it was saved with."""
    saved = read_layout(directory)
    if (saved.tp, saved.ep, saved.pp) != (want.tp, want.ep, want.pp):
        raise ValueError(
            f"checkpoint {directory} was saved with tensor_parallel_size={saved.tp}, expert_parallel_size="
            f"{saved.ep}, pipeline_parallel_size={saved.pp}; this run uses {want.tp}, {want.ep}, {want.pp}. "
            "Set trainer.megatron to the saved sizes, or convert the weights with "
            "`python -m rlplat.train.megatron.convert to-hf` and start from the HF directory"
        )
