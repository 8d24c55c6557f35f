import json
import random

import pytest
import torch

from rlplat.algos.config import AlgoConfig
from rlplat.models import load_pretrained
from rlplat.train import Trainer, TrainerConfig, latest_checkpoint, load_checkpoint, save_checkpoint
from rlplat.train import checkpoint as ckpt
from rlplat.train import trainer as trainer_module

ALGO = AlgoConfig(kl={"mode": "loss", "coef": 0.05}, correction={"use_rollout_logp_as_old": True})


def config(**kw):
    return TrainerConfig(lr=1e-3, lr_warmup_steps=2, expert_bias_update_rate=1e-3, **kw)


def next_batch(make_batch):
    # the data order draws from the torch and python random streams, so a resume must restore both
    seed = int(torch.randint(0, 10_000, (1,))) + random.randint(0, 10_000)
    return make_batch(B=2, T=8, seed=seed)


def full_state(trainer):
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    opt = trainer.optimizer.state_dict()
    for key in ("master", "exp_avg", "exp_avg_sq"):
        for i, t in enumerate(opt[key]):
            state[f"{key}.{i}"] = t
    state["opt.step"] = torch.tensor(opt["step"])
    return state


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bitwise_exact(tmp_path, tiny_model, make_batch, precision):
    steps, stop = (3, 2) if precision == "fp32" else (2, 1)
    torch.manual_seed(7)
    random.seed(7)
    straight = Trainer(tiny_model(), ALGO, config(), precision=precision)
    for _ in range(steps):
        straight.train_step(next_batch(make_batch))

    torch.manual_seed(7)
    random.seed(7)
    first = Trainer(tiny_model(), ALGO, config(), precision=precision)
    for _ in range(stop):
        first.train_step(next_batch(make_batch))
    path = save_checkpoint(first, tmp_path, data_position={"next_batch": stop})
    del first
    torch.manual_seed(999)  # the restarted process starts from other random streams and other weights
    random.seed(999)
    resumed = Trainer(tiny_model(seed=5), ALGO, config(), precision=precision)
    assert load_checkpoint(resumed, tmp_path) == {"next_batch": stop}
    assert latest_checkpoint(tmp_path) == path and resumed.version == stop
    for _ in range(stop, steps):
        resumed.train_step(next_batch(make_batch))

    a, b = full_state(straight), full_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.version == resumed.version == steps


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny, make_batch, monkeypatch):
    trainer = Trainer(tiny, AlgoConfig(), TrainerConfig(lr=1e-3, checkpoint={"export_hf": True}))
    good = save_checkpoint(trainer, tmp_path)
    trainer.train_step(make_batch())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trainer_module, "save_pretrained", crash)  # the hf/ export, after trainer.pt
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(trainer, tmp_path)
    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", good.name]


def test_keep_last_and_hf_export_loads(tmp_path, tiny, make_batch):
    cfg = TrainerConfig(lr=1e-3, checkpoint={"keep_last": 2, "export_hf": True})
    trainer = Trainer(tiny, AlgoConfig(), cfg)
    batch = make_batch()
    for step in range(3):
        trainer.step = step  # retention only looks at step numbers
        save_checkpoint(trainer, tmp_path)
    trainer.step = 3
    trainer.train_step(batch)
    last = save_checkpoint(trainer, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000004"]
    loaded = load_pretrained(last / "hf")
    logp, _ = loaded.token_logprobs(batch.input_ids_BT, batch.targets_BT)
    expected, _ = trainer.compute_logprobs(batch)
    m = batch.response_mask_BT
    assert torch.equal(logp.detach()[m], expected[m])


def test_load_rejects_other_precision_and_missing(tmp_path, tiny_model):
    trainer = Trainer(tiny_model(), AlgoConfig(), TrainerConfig())
    save_checkpoint(trainer, tmp_path)
    with pytest.raises(ValueError, match="trained in fp32"):
        load_checkpoint(Trainer(tiny_model(), AlgoConfig(), TrainerConfig(), precision="bf16"), tmp_path)
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        load_checkpoint(trainer, tmp_path / "nowhere")


class Counter:
    """The smallest ``Checkpointable``: one number in one file, one rank."""

    def __init__(self, keep_last: int = 2):
        self.step = self.version = self.value = self.barriers = 0
        self.keep_last = keep_last

    def write_checkpoint(self, staging):
        ckpt.empty_directory(staging)
        (staging / "value.txt").write_text(str(self.value))
        return True

    def read_checkpoint(self, directory):
        self.value = int((directory / "value.txt").read_text())

    def barrier(self):
        self.barriers += 1


def test_one_commit_for_any_backend(tmp_path):
    stale = tmp_path / ".tmp-step-00000003"  # what a crash while writing step 3 left behind
    stale.mkdir()
    (stale / "half-written").write_text("x")
    counter = Counter()
    for step in (1, 2, 3):
        counter.step, counter.version, counter.value = step, step + 10, 100 * step
        path = save_checkpoint(counter, tmp_path, data_position={"next": step})
    assert path == latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "value.txt"]  # the stale file is gone
    assert json.loads((path / "meta.json").read_text()) == {
        "step": 3,
        "version": 13,
        "data_position": {"next": 3},
    }
    assert counter.barriers == 3  # every save waits for every rank after the commit
    restored = Counter()
    assert load_checkpoint(restored, tmp_path) == {"next": 3} and restored.value == 300
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        load_checkpoint(restored, tmp_path / "step-00000001")  # pruned
