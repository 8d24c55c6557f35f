"""Two real trainer processes (gloo, 127.0.0.1) give the update of one process on the same global batch, each
holding half of the optimizer state, and their checkpoint continues in one process."""

import copy

import torch
import torch.multiprocessing as mp

from rlplat.algos.config import AlgoConfig
from rlplat.train import Trainer, TrainerConfig, init_data_parallel
from rlplat.train.checkpoint import load_checkpoint, save_checkpoint
from rlplat.train.dist import free_port

SMOOTH = dict(lr=1e-3, eps=1.0, grad_clip=None, expert_bias_update_rate=1e-3)  # see test_trainer.SMOOTH


def _worker(rank, world, port, model, batches, algo, out_dir):
    torch.set_num_threads(1)
    model = copy.deepcopy(model)  # spawn shares the parent's tensors between the ranks: give each its own
    dp = init_data_parallel(rank, world, "gloo", "127.0.0.1", port)
    trainer = Trainer(model, algo, TrainerConfig(dp_world_size=world, micro_batch_size=2, **SMOOTH), dp=dp)
    out = trainer.train_step(batches[0])
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    master_numel = sum(b.master.numel() for b in trainer.optimizer.buckets)
    save_checkpoint(trainer, f"{out_dir}/ckpt")  # every rank: the optimizer's halves are gathered
    trainer.train_step(batches[1])
    after = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save((out, state, master_numel, after), f"{out_dir}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_rank(tmp_path, tiny_model, make_batch):
    batch = make_batch(B=6, T=10, group_size=3)
    algo = AlgoConfig(loss_agg_mode="seq-mean-token-mean")
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    single = Trainer(copy.deepcopy(model), algo, TrainerConfig(**SMOOTH))
    single_out = single.train_step(batch)

    batches = [batch, make_batch(B=6, T=10, group_size=3, seed=1)]
    mp.start_processes(
        _worker, args=(2, free_port(), model, batches, algo, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    out0, s0, numel0, after0 = torch.load(tmp_path / "rank0.pt")
    out1, s1, numel1, after1 = torch.load(tmp_path / "rank1.pt")
    expected = single.model.state_dict()
    for k in expected:
        assert torch.equal(s0[k], s1[k]), k  # the ranks stay identical
        delta, ref = s0[k] - before[k], expected[k] - before[k]
        torch.testing.assert_close(delta, ref, rtol=1e-4, atol=1e-8, msg=k)
    for name in ("loss", "grad_norm", "entropy", "tokens", "loss_tokens"):
        assert abs(out0[name] - single_out[name]) <= 1e-5 * max(1.0, abs(single_out[name])), name
    assert out0["version"] == out1["version"] == 1

    # each rank keeps fp32 masters (and AdamW moments) for its half of the parameters only
    total = sum(p.numel() for p in model.parameters())
    assert numel0 == numel1 and total / 2 <= numel0 <= total / 2 + 2 * 4  # ≤ 1 pad element per bucket
    # the checkpoint holds the whole optimizer state: one process continues it as the two ranks did
    resumed = Trainer(copy.deepcopy(model), algo, TrainerConfig(micro_batch_size=2, **SMOOTH))
    load_checkpoint(resumed, tmp_path / "ckpt")
    for name, saved in resumed.optimizer.state_dict().items():
        if name != "step":
            for a, b in zip(saved, single.optimizer.state_dict()[name], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8, msg=name)
    resumed.train_step(batches[1])
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(after0[k], after1[k]), k
        delta, ref = v - s0[k], after0[k] - s0[k]
        torch.testing.assert_close(delta, ref, rtol=1e-4, atol=1e-8, msg=k)
