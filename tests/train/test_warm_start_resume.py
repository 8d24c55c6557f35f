"""A warm start stopped after k steps and resumed from its checkpoint ends bitwise equal to one that never
stopped: what `rlplat run --resume` relies on after Ctrl-C in the warm start (rlplat.controller)."""

import torch

from actors.trainer import TrainerWorker
from rlplat.config import load_config
from rlplat.train.batch import SampleGroups
from rlplat.train.checkpoint import latest_checkpoint


def batch(k: int) -> SampleGroups:
    """Warm-start step k's prompts and reference answers (a function of k, as in the controller)."""
    g = torch.Generator().manual_seed(k)
    prompts = [torch.randint(1, 60, (5,), generator=g).tolist() for _ in range(3)]
    answers = [torch.randint(1, 60, (3,), generator=g).tolist() for _ in range(3)]
    return SampleGroups.pack(prompts, answers, [torch.zeros(3)] * 3, [0] * 3)


def test_stopped_warm_start_resumes_exactly(tmp_path):
    # warm_start_lr null: the warm start runs the trainer's own schedule, so its step count must be restored too
    config = load_config(None, ["trainer.lr=1e-3", "trainer.lr_warmup_steps=3"]).model_dump(mode="json")
    whole = TrainerWorker(config, num_threads=torch.get_num_threads())
    for k in range(4):
        whole.sft_step(batch(k))

    stopped = TrainerWorker(config, num_threads=torch.get_num_threads())
    for k in range(2):
        stopped.sft_step(batch(k))
    stopped.save_checkpoint(str(tmp_path), {"next_step": 0, "warm_start_done": 2})
    resumed = TrainerWorker(config, num_threads=torch.get_num_threads())
    assert resumed.load_checkpoint(str(latest_checkpoint(tmp_path))) == {"next_step": 0, "warm_start_done": 2}
    for k in range(2, 4):
        resumed.sft_step(batch(k))

    for (name, a), b in zip(
        whole.trainer.model.state_dict().items(), resumed.trainer.model.state_dict().values()
    ):
        assert torch.equal(a, b), name
