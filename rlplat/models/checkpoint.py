"""Hugging Face checkpoint directories: config.json, safetensors (single file or sharded with an index), tokenizer.

Names are the model's attribute paths, which are the HF names. Loading is strict: a missing, unexpected or
mis-shaped tensor is an error that names every offender. Multi-token-prediction tensors (layers at index
≥ num_hidden_layers when ``num_nextn_predict_layers`` > 0) are kept on ``model.mtp_tensors`` and written
back on save, with a warning that they are carried but not run.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlplat.models.config import RingLinearConfig
from rlplat.models.ring_linear import RingLinearForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Kept in fp32 whatever the model dtype: a selection-only bias whose small updates bf16 would erase.
FP32_BUFFERS = ("expert_bias",)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _resolve_dtype(dtype: torch.dtype | str | None, cfg: RingLinearConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or cfg.torch_dtype
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path / INDEX_FILE} has no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        raise ValueError(
            f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}: not an HF safetensors checkpoint"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).exists():
            raise ValueError(f"{path / INDEX_FILE} names shard {name}, which is missing")
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[key] = f.get_tensor(key)
    return tensors


def _is_mtp(name: str, cfg: RingLinearConfig) -> bool:
    m = _LAYER_RE.match(name)
    return (
        cfg.num_nextn_predict_layers > 0 and m is not None and int(m.group(1)) >= cfg.num_hidden_layers
    ) or (name.startswith("model.mtp"))


def load_pretrained(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> RingLinearForCausalLM:
    """Load an HF-format Ring-linear directory. ``dtype`` defaults to config.json's ``torch_dtype``."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; expected a Hugging Face model directory")
    cfg = RingLinearConfig.from_json(path / "config.json")
    torch_dtype = _resolve_dtype(dtype, cfg)
    tensors = _read_tensors(path)
    with torch.device("meta"):
        model = RingLinearForCausalLM(cfg)
    expected = model.state_dict()
    mtp = {k: v for k, v in tensors.items() if _is_mtp(k, cfg)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(mtp))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = "\n  ".join(items[:20]) + (
                f"\n  ... and {len(items) - 20} more" if len(items) > 20 else ""
            )
            problems.append(f"{len(items)} {title} tensor(s):\n  {shown}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match its config.json:\n" + "\n".join(problems))
    state = {
        k: tensors[k].to(device=device, dtype=torch.float32 if k.endswith(FP32_BUFFERS) else torch_dtype)
        for k in expected
    }
    model.load_state_dict(state, assign=True)
    # non-persistent buffers (rope table, decays) are not in the checkpoint: rebuild them on the real device
    _materialize_buffers(model, cfg, device)
    if mtp:
        warnings.warn(
            f"{path}: {len(mtp)} multi-token-prediction tensor(s) (num_nextn_predict_layers="
            f"{cfg.num_nextn_predict_layers}) are kept and saved back, but rlplat does not run MTP layers",
            stacklevel=2,
        )
        model.mtp_tensors = {k: v.to(device) for k, v in mtp.items()}
    model.source_path = path
    return model


def _materialize_buffers(model: RingLinearForCausalLM, cfg: RingLinearConfig, device) -> None:
    from kernels.rope import rope_table
    from rlplat.models.ring_linear import LinearAttention, linear_attention_log_decay

    cos, sin = rope_table(cfg.max_position_embeddings, cfg.rotary_dim, cfg.rope_theta)
    model.model.rope_cos, model.model.rope_sin = cos.to(device), sin.to(device)
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.attention, LinearAttention):
            layer.attention.log_decay = linear_attention_log_decay(cfg, i).to(device)


def save_pretrained(
    model: RingLinearForCausalLM,
    path: str | Path,
    max_shard_bytes: int | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write config.json + safetensors (sharded with an index when larger than ``max_shard_bytes``) + tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in model.mtp_tensors.items()})
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for stale in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k in sorted(tensors):
            nbytes = tensors[k].numel() * tensors[k].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = tensors[k]
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    source = Path(tokenizer_dir) if tokenizer_dir else getattr(model, "source_path", None)
    if source is not None and Path(source).resolve() != path.resolve():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists():
                shutil.copy2(Path(source) / name, path / name)
    return path
