"""The layout without processes: HF ⇄ sharded conversion round trips exactly, and bad sizes fail before any
process group exists, naming the setting to change."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rlplat.models import RingLinearForCausalLM, load_pretrained, preset
from rlplat.train.config import MegatronConfig, TrainerConfig
from rlplat.train.megatron.convert import hf_to_megatron, main, megatron_to_hf
from rlplat.train.megatron.layout import (
    ParallelLayout,
    check_layout,
    merge_states,
    read_layout,
    shard_state,
)


def _cfg(tp=1, ep=1, pp=1, dp=1, **kw) -> TrainerConfig:
    m = MegatronConfig(tensor_parallel_size=tp, expert_parallel_size=ep, pipeline_parallel_size=pp, **kw)
    return TrainerConfig(backend="megatron", dp_world_size=dp, megatron=m)


@pytest.mark.parametrize(
    ("tp", "ep", "pp"), [(1, 1, 1), (2, 1, 1), (1, 4, 1), (2, 2, 1), (4, 16, 1), (2, 2, 2), (1, 1, 4)]
)
def test_shard_merge_round_trip_is_exact(hf_tiny, tp, ep, pp):
    model = load_pretrained(hf_tiny)
    cfg, state = model.config, model.state_dict()
    if cfg.num_key_value_heads % tp:  # tp=4: the tiny preset with 4 kv heads, so they split too
        model = RingLinearForCausalLM(preset("tiny", num_key_value_heads=4))
        model.reset_parameters(seed=3)
        cfg, state = model.config, model.state_dict()
    lay = ParallelLayout(tp=tp, ep=ep, pp=pp, dp=max(tp, ep) // tp)
    shards = {
        (t, e, p): shard_state(list(state), state.__getitem__, cfg, lay, t, e, p)
        for t in range(tp)
        for e in range(ep)
        for p in range(pp)
    }
    # a shard really is a part: 1/tp of the attention heads, 1/ep of the experts (of a MoE layer), 1/pp of
    # the layers, with the embedding on the first stage and the LM head on the last
    first, last = shards[(0, 0, 0)], shards[(0, 0, pp - 1)]
    qkv = first["model.layers.0.attention.query_key_value.weight"]
    assert qkv.shape[0] == 3 * cfg.num_attention_heads * cfg.head_dim // tp
    moe = [n for n in last if ".mlp.experts." in n]
    assert len({n.split(".mlp.experts.")[1].split(".")[0] for n in moe}) == cfg.num_experts // ep
    layers = {int(n.split(".")[2]) for n in first if n.startswith("model.layers.")}
    assert layers == set(range(cfg.num_hidden_layers // pp))
    assert "model.word_embeddings.weight" in first and ("lm_head.weight" in first) == (pp == 1)
    assert "lm_head.weight" in last and "model.norm.weight" in last
    merged = dict(merge_states(shards, cfg, lay))
    assert set(merged) == set(state)
    for name, t in state.items():
        assert torch.equal(merged[name], t), name


def test_directory_conversion_round_trip_is_exact(hf_tiny, tmp_path):
    main(["to-megatron", str(hf_tiny), str(tmp_path / "sharded"), "--tp", "2", "--ep", "4", "--pp", "2"])
    assert read_layout(tmp_path / "sharded") == ParallelLayout(tp=2, ep=4, pp=2)
    assert len(list((tmp_path / "sharded").glob("model-tp*-ep*-pp*.safetensors"))) == 16
    back = load_pretrained(megatron_to_hf(tmp_path / "sharded", tmp_path / "hf"))
    original = load_pretrained(hf_tiny)
    assert back.config == original.config
    for name, t in original.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_bf16_conversion_keeps_dtypes(hf_tiny, tmp_path):
    from rlplat.models import save_pretrained, to_precision

    bf16 = save_pretrained(to_precision(load_pretrained(hf_tiny), "bf16"), tmp_path / "bf16")
    hf_to_megatron(bf16, tmp_path / "sharded", tp=2, ep=2)
    back = load_pretrained(megatron_to_hf(tmp_path / "sharded", tmp_path / "hf"), dtype="bfloat16")
    original = load_pretrained(bf16, dtype="bfloat16")
    for name, t in original.state_dict().items():
        got = back.state_dict()[name]
        assert got.dtype == t.dtype and torch.equal(got, t), name


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        (dict(tp=3, dp=1), "tensor_parallel_size=3 does not divide the model's num_attention_heads=4"),
        (dict(tp=4, dp=1), "does not divide the model's num_key_value_heads=2"),
        (dict(ep=3, dp=3), "expert_parallel_size=3 does not divide num_experts=16"),
        (dict(ep=4, dp=2), "expert_parallel_size=4 must divide tensor_parallel_size × dp_world_size = 2"),
        (dict(pp=3), "pipeline_parallel_size=3 does not divide num_hidden_layers=4"),
    ],
)
def test_bad_sizes_are_refused(sizes, match):
    with pytest.raises(ValueError, match=match):
        check_layout(preset("tiny"), _cfg(**sizes))


def test_world_size_must_be_the_product():
    with pytest.raises(
        ValueError, match=r"3 processes, but tensor_parallel_size 2 × pipeline_parallel_size 1"
    ):
        check_layout(preset("tiny"), _cfg(tp=2, dp=2), world_size=3)
    assert check_layout(preset("tiny"), _cfg(tp=2, dp=2), world_size=4) == ParallelLayout(tp=2, dp=2)


def test_te_fp8_needs_fp8_precision_and_a_gpu():
    cfg = _cfg(fp8_recipe="te_blockwise")
    with pytest.raises(ValueError, match=r"needs model\.precision: fp8"):
        check_layout(preset("tiny"), cfg, precision="bf16")
    with pytest.raises(ValueError, match="need a CUDA GPU; none is visible"):
        check_layout(preset("tiny"), cfg, precision="fp8", cuda_available=False)
    check_layout(preset("tiny"), cfg, precision="fp8", hardware=False)  # a launch config checked elsewhere


def test_fp8_shards_must_not_split_fp8_blocks():
    with pytest.raises(
        ValueError, match=r"FP8 with tensor_parallel_size=2: num_attention_heads × head_dim / tp"
    ):
        check_layout(preset("tiny"), _cfg(tp=2), precision="fp8")  # 4 heads × 32 / 2 = 64
    check_layout(preset("tiny"), _cfg(tp=2), precision="bf16")
    for name, tp in (("ring-mini-linear-2.0", 2), ("ring-flash-linear-2.0", 4)):
        check_layout(preset(name), _cfg(tp=tp, dp=8 // tp), precision="fp8")


def test_megatron_section_needs_the_megatron_backend():
    with pytest.raises(ValueError, match=r"set trainer\.backend: megatron"):
        TrainerConfig(megatron=MegatronConfig(tensor_parallel_size=2))
    assert TrainerConfig(backend="megatron").megatron == MegatronConfig()


def test_init_megatron_refuses_before_any_process_group(monkeypatch):
    from rlplat.train.megatron.trainer import init_megatron

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens: joining would hang, so it must not get there
    with pytest.raises(ValueError, match="num_attention_heads"):
        init_megatron(preset("tiny"), _cfg(tp=3), rank=0, world_size=3)
    assert not dist.is_initialized()
