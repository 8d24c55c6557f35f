"""HF checkpoint directories: exact round trips, sharding, tokenizer files, and errors that name the tensors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlplat.models import RingLinearForCausalLM, load_pretrained, preset, save_pretrained


@pytest.fixture
def model():
    m = RingLinearForCausalLM(preset("tiny"))
    m.reset_parameters(seed=1)
    for layer in m.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.expert_bias.copy_(torch.linspace(-0.1, 0.1, layer.mlp.gate.expert_bias.numel()))
    return m


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shard", [None, 200_000], ids=["single", "sharded"])
def test_round_trip_is_exact(model, tmp_path, shard):
    save_pretrained(model, tmp_path, max_shard_bytes=shard)
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (tmp_path / "model.safetensors").exists()
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    assert_same_state(model, loaded)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    # saving the loaded model again writes the same tensors and config
    save_pretrained(loaded, tmp_path / "again", max_shard_bytes=shard)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
        (tmp_path / "again/config.json").read_text()
    )


def test_hf_weight_names(model, tmp_path):
    save_pretrained(model, tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    for expected in [
        "model.word_embeddings.weight",
        "model.layers.0.attention.query_key_value.weight",
        "model.layers.0.attention.g_proj.weight",
        "model.layers.0.attention.g_norm.weight",
        "model.layers.0.attention.query_layernorm.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.expert_bias",
        "model.layers.1.mlp.experts.15.down_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.3.attention.dense.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]:
        assert expected in names, expected
    assert "model.layers.3.attention.g_proj.weight" not in names  # softmax layers have no gate
    assert not any("rope" in n or "log_decay" in n for n in names)


def test_bf16_load_keeps_expert_bias_fp32(model, tmp_path):
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype="bfloat16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32
    save_pretrained(loaded, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16/config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_same_state(loaded, load_pretrained(tmp_path / "bf16"))


def test_tokenizer_files_travel(model, tmp_path):
    src = tmp_path / "src"
    save_pretrained(model, src)
    (src / "tokenizer.json").write_text('{"fake": true}')
    loaded = load_pretrained(src)
    save_pretrained(loaded, tmp_path / "dst")
    assert (tmp_path / "dst/tokenizer.json").read_text() == '{"fake": true}'


def test_missing_unexpected_and_misshaped_tensors_are_named(model, tmp_path):
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.attention.dense.weight"]
    tensors["model.layers.0.attention.bogus.weight"] = torch.zeros(3)
    tensors["lm_head.weight"] = torch.zeros(7, 128)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing" in msg and "model.layers.2.attention.dense.weight" in msg
    assert "unexpected" in msg and "model.layers.0.attention.bogus.weight" in msg
    assert "mis-shaped" in msg and "lm_head.weight" in msg and "(7, 128)" in msg


def test_mtp_tensors_are_kept_and_reported(model, tmp_path):
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.4.eh_proj.weight"] = torch.randn(128, 256)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="multi-token-prediction"):
        loaded = load_pretrained(tmp_path)
    assert set(loaded.mtp_tensors) == {"model.layers.4.eh_proj.weight"}
    save_pretrained(loaded, tmp_path / "out")
    assert torch.equal(
        load_file(tmp_path / "out/model.safetensors")["model.layers.4.eh_proj.weight"],
        tensors["model.layers.4.eh_proj.weight"],
    )


def test_other_architecture_is_rejected(model, tmp_path):
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="BailingMoeLinearV2ForCausalLM"):
        load_pretrained(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        load_pretrained(tmp_path)
    shutil.copy(__file__, tmp_path / "config.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(tmp_path)
