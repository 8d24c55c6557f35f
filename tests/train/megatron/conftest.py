"""Fixtures of the Megatron-backend tests: a tiny HF checkpoint, one batch, the two-process gloo runs of
``_workers.py`` (every layout in one launch), and the single-process reference on the same inputs."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rlplat.algos.config import AlgoConfig
from rlplat.models import RingLinearForCausalLM, load_pretrained, preset, save_pretrained
from rlplat.train import TrainBatch, Trainer, TrainerConfig
from rlplat.train.dist import free_port

HERE = Path(__file__).resolve().parent
# AdamW's first step is lr·g/(|g|+eps): with the usual eps=1e-8 it is sign(g), and round-off in tiny
# gradients flips whole steps; eps=1 makes it a gradient step, as well conditioned as the gradient. lr=1 makes
# the steps (clipped gradients, ~1e-5 to 1e-2) large next to the fp32 spacing of the weights (~2e-9).
LR = 1.0
OPT = {"lr": LR, "eps": 1.0, "expert_bias_update_rate": 1e-3}  # the biases move too: counts must agree


def tiny_hf(path: Path) -> Path:
    """The tiny preset with spread expert biases (random init routes almost uniformly), saved as HF."""
    model = RingLinearForCausalLM(preset("tiny"))
    model.reset_parameters(seed=0)
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.expert_bias.copy_(torch.randn(16, generator=g) * 0.05)
    return save_pretrained(model, path)


def tiny_batch() -> tuple[TrainBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RL batch, ids, next-token targets, per-token loss weights) — 6 rows so 2 data-parallel ranks split."""
    B, T = 6, 12
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 512, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, 3 : 5 + b] = True
    batch = TrainBatch(
        ids,
        mask,
        torch.where(mask, -torch.rand(B, T, generator=g), 0.0),
        group_size=2,
        rewards_B=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
    )
    return batch, ids, torch.roll(ids, -1, 1), torch.randn(B, T, generator=g)


def uneven_batch() -> TrainBatch:
    """9 rows in groups of 3: two data-parallel ranks get 5 and 4 rows."""
    B, T = 9, 10
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 512, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, 2 : 4 + b % 5] = True
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    return TrainBatch(
        ids, mask, torch.where(mask, -torch.rand(B, T, generator=g), 0.0), group_size=3, rewards_B=rewards
    )


UNEVEN_TRAINER = {**OPT, "micro_batch_size": 2}
UNEVEN_ALGO = {"kl": {"mode": "loss", "coef": 0.1}}


@dataclass
class Runs:
    out: Path
    hf_dir: Path
    lr: float = LR

    def module(self, layout: str) -> dict:
        return torch.load(self.out / f"module-{layout}.pt", weights_only=False)

    def trainer(self, layout: str) -> dict:
        return torch.load(self.out / f"trainer-{layout}.pt", weights_only=False)

    # what the trainer runs used: optimizer settings and the batch
    opt = OPT
    batch = staticmethod(lambda: tiny_batch()[0])


@pytest.fixture
def one_rank(monkeypatch):
    """A one-process group for a Megatron trainer in this process, torn down after the test."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    yield
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="session")
def runs(tmp_path_factory, hf_tiny) -> Runs:
    out = tmp_path_factory.mktemp("megatron_runs")
    hf_dir = hf_tiny
    batch, ids, targets, loss_w = tiny_batch()
    inputs = dict(
        hf_dir=str(hf_dir), ids=ids, targets=targets, loss_w=loss_w, batch=batch, trainer_kw=OPT,
        uneven_batch=uneven_batch(), uneven_trainer_kw=UNEVEN_TRAINER, uneven_algo=UNEVEN_ALGO,
    )  # fmt: skip
    torch.save(inputs, out / "inputs.pt")
    proc = subprocess.run(
        [sys.executable, str(HERE / "_workers.py"), str(out), str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = "\n".join(p.read_text() for p in sorted(out.glob("error-rank*.txt")))
    assert proc.returncode == 0, f"worker processes failed:\n{errors or proc.stderr[-4000:]}"
    return Runs(out, hf_dir)


@dataclass
class Reference:
    logp: torch.Tensor
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    metrics: dict[str, float]
    logp0: torch.Tensor
    uneven_metrics: dict[str, float]
    uneven_after: dict[str, torch.Tensor]
    bf16_metrics: dict[str, float]
    bf16_after: dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def reference(runs) -> Reference:
    """The plain torch model and Trainer (one process) on the same weights and batches (fp32, and bf16)."""
    batch, ids, targets, loss_w = tiny_batch()
    model = load_pretrained(runs.hf_dir)
    logp, ent = model.token_logprobs(ids, targets)
    loss = (logp * loss_w).sum() + 0.01 * (ent * loss_w).sum()
    loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    model = load_pretrained(runs.hf_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, None, TrainerConfig(**OPT))
    logp0, _ = trainer.compute_logprobs(batch)
    metrics = trainer.train_step(batch)
    after, _ = trainer.export_weights()
    uneven = Trainer(
        load_pretrained(runs.hf_dir), AlgoConfig.model_validate(UNEVEN_ALGO), TrainerConfig(**UNEVEN_TRAINER)
    )
    uneven_metrics = uneven.train_step(uneven_batch())
    uneven_after, _ = uneven.export_weights()
    bf16 = Trainer(load_pretrained(runs.hf_dir), None, TrainerConfig(**UNEVEN_TRAINER), precision="bf16")
    bf16_metrics = bf16.train_step(uneven_batch())
    bf16_after, _ = bf16.export_weights()
    return Reference(
        logp.detach(), loss.detach(), grads, before, after, metrics, logp0, uneven_metrics, uneven_after,
        bf16_metrics, bf16_after,
    )  # fmt: skip


def pytest_configure(config):
    # megatron-core announces its fallbacks at import on every machine without TE/Apex (all CPU ones)
    config.addinivalue_line("filterwarnings", "ignore:Transformer Engine and Apex are not installed")
    # and its import-time deprecations (its own modules, and torch.jit.script_method in its fused kernels)
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:megatron.*")
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    )
