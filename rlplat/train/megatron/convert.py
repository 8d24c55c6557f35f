"""Convert weights between an HF directory and the Megatron backend's sharded layout (torch + safetensors only).

    python -m rlplat.train.megatron.convert to-megatron HF_DIR OUT_DIR --tp 2 --ep 4 --pp 2
    python -m rlplat.train.megatron.convert to-hf SHARDED_DIR OUT_DIR

A sharded directory holds ``megatron_layout.json``, ``config.json`` and one
``model-tp<t>-ep<e>-pp<p>.safetensors`` per (tensor-parallel rank, expert-parallel rank, pipeline stage); a
trainer checkpoint (``step-*``) has the same model files and converts the same way. Converting to HF
re-reads one rank's file at a time per tensor group; round trips are exact (the same bits, ``layout.py`` only slices and concatenates).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlplat.models.checkpoint import TOKENIZER_FILES, load_pretrained, save_pretrained
from rlplat.models.config import RingLinearConfig
from rlplat.train.megatron.layout import (
    ParallelLayout,
    merge_states,
    read_layout,
    shard_state,
    shard_tag,
    write_layout,
)

CONFIG_FILE = "config.json"


def shard_file(directory: Path, tp_rank: int, ep_rank: int, pp_rank: int) -> Path:
    return directory / f"model-{shard_tag(tp_rank, ep_rank, pp_rank)}.safetensors"


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, ep: int = 1, pp: int = 1) -> Path:
    """Write the sharded layout of the HF model in ``hf_dir`` for tensor/expert/pipeline-parallel sizes."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    model = load_pretrained(hf_dir)  # strict: names and shapes checked against config.json
    cfg = model.config
    for what, size, total in (
        ("tp", tp, cfg.num_attention_heads),
        ("ep", ep, cfg.num_experts),
        ("pp", pp, cfg.num_hidden_layers),
    ):
        if size < 1 or total % size:
            raise ValueError(f"--{what} {size} must be ≥ 1 and divide {total}")
    state = model.state_dict()
    lay = ParallelLayout(tp=tp, ep=ep, pp=pp)
    out.mkdir(parents=True, exist_ok=True)
    for p in range(pp):
        for t in range(tp):
            for e in range(ep):
                shard = shard_state(list(state), state.__getitem__, cfg, lay, t, e, p)
                save_file(shard, str(shard_file(out, t, e, p)), metadata={"format": "pt"})
    write_layout(out, lay)
    shutil.copy2(hf_dir / CONFIG_FILE, out / CONFIG_FILE)
    return out


def read_shards(
    directory: str | Path,
) -> tuple[ParallelLayout, dict[tuple[int, int, int], dict[str, torch.Tensor]]]:
    """The layout and every ``model-tp<t>-ep<e>-pp<p>`` file of a sharded directory (a checkpoint may hold
    only the triples its ranks had; ``merge_states`` says if one it needs is missing)."""
    directory = Path(directory)
    lay = read_layout(directory)
    shards = {}
    for p in range(lay.pp):
        for t in range(lay.tp):
            for e in range(lay.ep):
                path = shard_file(directory, t, e, p)
                if path.exists():
                    with safe_open(str(path), framework="pt") as f:
                        shards[(t, e, p)] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return lay, shards


def megatron_to_hf(
    directory: str | Path, out_dir: str | Path, config: RingLinearConfig | None = None, tokenizer_dir=None
) -> Path:
    """Write an HF directory (config.json + safetensors) from a sharded directory or trainer checkpoint."""
    directory = Path(directory)
    if config is None:
        if not (directory / CONFIG_FILE).exists():
            raise ValueError(f"{directory} has no {CONFIG_FILE}; pass the model config")
        config = RingLinearConfig.from_json(directory / CONFIG_FILE)
    lay, shards = read_shards(directory)
    state = dict(merge_states(shards, config, lay))
    with torch.device("meta"):
        from rlplat.models import RingLinearForCausalLM

        model = RingLinearForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=True)
    return save_pretrained(model, out_dir, tokenizer_dir=tokenizer_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlplat.train.megatron.convert", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    to_m = sub.add_parser("to-megatron", help="HF directory -> sharded directory")
    to_m.add_argument("hf_dir")
    to_m.add_argument("out_dir")
    to_m.add_argument("--tp", type=int, default=1)
    to_m.add_argument("--ep", type=int, default=1)
    to_m.add_argument("--pp", type=int, default=1)
    to_h = sub.add_parser("to-hf", help="sharded directory or trainer checkpoint -> HF directory")
    to_h.add_argument("src")
    to_h.add_argument("out_dir")
    to_h.add_argument("--tokenizer", default=None, help="copy tokenizer files from this directory")
    args = parser.parse_args(argv)
    if args.cmd == "to-megatron":
        path = hf_to_megatron(args.hf_dir, args.out_dir, args.tp, args.ep, args.pp)
        for name in TOKENIZER_FILES:
            if (Path(args.hf_dir) / name).exists():
                shutil.copy2(Path(args.hf_dir) / name, path / name)
    else:
        path = megatron_to_hf(args.src, args.out_dir, tokenizer_dir=args.tokenizer)
    print(json.dumps({"written": str(path)}))


if __name__ == "__main__":
    main()
