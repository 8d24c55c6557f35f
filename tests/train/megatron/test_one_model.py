"""One model definition: the Megatron backend runs the blocks of ``rlplat.models.ring_linear`` with Megatron's
layers swapped in (``parallelize.py``), and writes no attention, MLP or MoE forward of its own."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import rlplat.train.megatron
from rlplat.models import ring_linear
from rlplat.models.ring_linear import (
    DecoderLayer,
    LinearAttention,
    MoE,
    RMSNorm,
    Router,
    SoftmaxAttention,
    SwiGLU,
)

BLOCKS = (DecoderLayer, LinearAttention, SoftmaxAttention, MoE, SwiGLU, RMSNorm, Router)
# The forwards the Megatron package may define: its layers unwrapped from Megatron's (output, bias), and the
# routed experts behind Megatron's token dispatcher; nothing that computes attention, an MLP or routing.
MEGATRON_FORWARDS = {"_OutputOnly", "DispatchedExperts"}
# and its classes in a built model, around the blocks
ADAPTERS = {
    "ParallelRingLinear",
    "_Stage",
    "ColumnLinear",
    "RowLinear",
    "DispatchedExperts",
    "VocabParallelLMHead",
}


def test_the_megatron_package_defines_no_block_forward():
    forwards = set()
    for info in pkgutil.iter_modules(rlplat.train.megatron.__path__):
        module = importlib.import_module(f"rlplat.train.megatron.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and "forward" in vars(cls):
                forwards.add(cls.__qualname__)
    assert forwards == MEGATRON_FORWARDS


def test_one_rank_model_is_the_rollout_models_blocks(one_rank, hf_tiny):
    from rlplat.models import load_pretrained
    from rlplat.models.config import RingLinearConfig
    from rlplat.train.config import TrainerConfig
    from rlplat.train.megatron.parallelize import DispatchedExperts, ParallelRingLinear
    from rlplat.train.megatron.trainer import init_megatron

    cfg = RingLinearConfig.from_json(hf_tiny / "config.json")
    init_megatron(cfg, TrainerConfig(backend="megatron"), rank=0, world_size=1)
    model, rollout = ParallelRingLinear(cfg), load_pretrained(hf_tiny)
    for i, layer in model.model.layers.items():
        twin = rollout.model.layers[int(i)]
        for (name, m), (twin_name, m_twin) in zip(layer.named_modules(), twin.named_modules(), strict=True):
            assert name == twin_name
            if isinstance(m_twin, BLOCKS):
                assert type(m) is type(m_twin), f"layer {i} {name}: {type(m).__qualname__}"
        if isinstance(layer.mlp, MoE):
            assert isinstance(layer.mlp.experts, DispatchedExperts)
            assert all(type(e) is SwiGLU for e in layer.mlp.experts)
    assert set(model.local_state()) == set(rollout.state_dict())  # the HF names, one tensor each
    model.load_local_state({n: t.detach().clone() for n, t in rollout.state_dict().items()})
    ids = torch.randint(2, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(ids, -1, 1)
    with torch.no_grad():
        got, want = model.token_logprobs(ids, targets), rollout.token_logprobs(ids, targets)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("layout", ["tp2", "ep2", "tp2ep2"])
def test_parallel_ranks_run_the_same_blocks_on_their_heads(runs, layout):
    """Under tensor parallelism a rank's blocks are the rollout's classes with half the heads, kv heads and
    output-norm groups (tiny: 4 heads, 2 kv heads, 2 groups); Megatron's classes appear only as layers."""
    r = runs.module(layout)
    blocks = {f"{ring_linear.__name__}.{cls.__qualname__}" for cls in BLOCKS}
    assert blocks <= r["classes"]
    adapters = {n for n in r["classes"] if n.startswith("rlplat.train.megatron.")}
    assert adapters == {f"rlplat.train.megatron.parallelize.{n}" for n in ADAPTERS}
    for name in r["classes"] - blocks - adapters:  # rlplat's Linear in the experts, Megatron's layers
        assert name.startswith(
            ("rlplat.models.ring_linear.", "megatron.core.tensor_parallel.", "torch.nn.")
        ), name
    tp = 2 if "tp2" in layout else 1
    for name, (heads, kv_heads, groups) in r["heads"].items():
        assert heads == 4 // tp, name
        assert kv_heads in (None, 2 // tp) and groups in (None, 2 // tp), name
