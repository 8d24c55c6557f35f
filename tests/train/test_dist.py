"""Two real trainer processes (gloo, 127.0.0.1) give the update of one process on the same global batch."""

import copy

import torch
import torch.multiprocessing as mp

from rlplat.algos.config import AlgoConfig
from rlplat.train import Trainer, TrainerConfig, init_data_parallel
from rlplat.train.dist import free_port

SMOOTH = dict(lr=1e-3, eps=1.0, grad_clip=None, expert_bias_update_rate=1e-3)  # see test_trainer.SMOOTH


def _worker(rank, world, port, model, batch, algo, out_dir):
    torch.set_num_threads(1)
    model = copy.deepcopy(model)  # spawn shares the parent's tensors between the ranks: give each its own
    dp = init_data_parallel(rank, world, "gloo", "127.0.0.1", port)
    trainer = Trainer(model, algo, TrainerConfig(dp_world_size=world, micro_batch_size=2, **SMOOTH), dp=dp)
    out = trainer.train_step(batch)
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save((out, state), f"{out_dir}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_rank(tmp_path, tiny_model, make_batch):
    batch = make_batch(B=6, T=10, group_size=3)
    algo = AlgoConfig(loss_agg_mode="seq-mean-token-mean")
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    single = Trainer(copy.deepcopy(model), algo, TrainerConfig(**SMOOTH))
    single_out = single.train_step(batch)

    mp.start_processes(
        _worker, args=(2, free_port(), model, batch, algo, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    out0, s0 = torch.load(tmp_path / "rank0.pt")
    out1, s1 = torch.load(tmp_path / "rank1.pt")
    expected = single.model.state_dict()
    for k in expected:
        assert torch.equal(s0[k], s1[k]), k  # the ranks stay identical
        delta, ref = s0[k] - before[k], expected[k] - before[k]
        torch.testing.assert_close(delta, ref, rtol=1e-4, atol=1e-8, msg=k)
    for name in ("loss", "grad_norm", "entropy", "tokens", "loss_tokens"):
        assert abs(out0[name] - single_out[name]) <= 1e-5 * max(1.0, abs(single_out[name])), name
    assert out0["version"] == out1["version"] == 1
