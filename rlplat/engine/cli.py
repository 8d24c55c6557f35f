"""``rlplat check-alignment CONFIG [overrides]``: rollout log-probs against the trainer's forward, as JSON.

Stdout holds the JSON report alone (``rlplat check-alignment ... | jq .`` works): the backend runs inside
``rlplat.jsonout.stdout_to_stderr``, so vLLM's log lines, its engine processes' included, go to stderr.
"""

from __future__ import annotations

import argparse
import time

from rlplat.jsonout import print_json, stdout_to_stderr


def register(sub) -> None:
    p = sub.add_parser(
        "check-alignment",
        help="sample with the rollout backend, rescore with the trainer's forward, print the log-prob mismatch",
    )
    p.add_argument("config", help="YAML experiment file")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--num-prompts", type=int, help="override rollout.alignment.num_prompts")
    p.add_argument("--n", type=int, help="override rollout.alignment.n (samples per prompt)")
    p.add_argument("--max-batch-size", type=int, help="override rollout.max_batch_size")
    p.add_argument("--require-exact", action="store_true", help="exit with status 1 unless bitwise exact")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with stdout_to_stderr():
        report = _report(args)
    print_json(report)
    return 1 if args.require_exact and not report["exact"] else 0


def _report(args: argparse.Namespace) -> dict:
    import kernels
    from rlplat.config import load_config
    from rlplat.engine.alignment import alignment_requests, check_alignment
    from rlplat.engine.backend import make_backend
    from rlplat.engine.config import RolloutConfig
    from rlplat.engine.policy import build_policy

    cfg = load_config(args.config, args.overrides)
    rollout = getattr(cfg, "rollout", None) or RolloutConfig()
    data = rollout.model_dump()
    if args.max_batch_size is not None:
        data["max_batch_size"] = args.max_batch_size
    for flag, key in (("num_prompts", "num_prompts"), ("n", "n")):
        if getattr(args, flag) is not None:
            data["alignment"][key] = getattr(args, flag)
    rollout = RolloutConfig.model_validate(data)

    kernels.set_mode(cfg.kernels.backend, cfg.kernels.batch_invariant, cfg.kernels.chunk_size)
    trainer = build_policy(cfg.model)
    backend = make_backend(cfg, rollout=rollout)
    mc = trainer.config
    eos = mc.eos_token_id if isinstance(mc.eos_token_id, list) else [mc.eos_token_id]
    special = [t for t in (mc.pad_token_id, mc.bos_token_id, *eos) if t is not None]
    prompts, sampling = alignment_requests(rollout.alignment, rollout.sampling, mc.vocab_size, special)

    start = time.perf_counter()
    try:
        result = check_alignment(
            backend,
            trainer,
            prompts,
            sampling,
            rollout_batch_invariant=cfg.rollout_batch_invariant(),
            trainer_batch_invariant=cfg.trainer_batch_invariant(),
        )
        seconds = round(time.perf_counter() - start, 2)
    finally:
        close = getattr(backend, "close", None)  # vLLM's engine processes: stopped while stdout is stderr
        if close is not None:
            close()
    return {
        "backend": rollout.backend,
        "precision": cfg.model.precision,
        "rollout_precision": cfg.rollout_precision(),
        "rollout_batch_invariant": cfg.rollout_batch_invariant(),
        **{k: result.pop(k) for k in list(result)},
        "model": cfg.model.path or cfg.model.preset,
        "kernels": cfg.kernels.backend,
        "batch_invariant": cfg.trainer_batch_invariant(),
        "max_batch_size": rollout.max_batch_size,
        "num_prompts": rollout.alignment.num_prompts,
        "n": rollout.alignment.n,
        "prompt_length": list(rollout.alignment.prompt_length),
        "max_new_tokens": list(rollout.alignment.max_new_tokens),
        "temperature": sampling[0].logprob_temperature,
        "seconds": seconds,
    }
