"""Typed experiment configuration: YAML (plain data) + ``a.b=c`` overrides → closed pydantic models.

Each section's model lives next to what it configures. This module mounts them into one
``ExperimentConfig`` and turns validation failures into messages that name the full key path and what is
allowed, e.g. ``model.precison: unknown key; did you mean 'precision'? (allowed: preset, path, precision, ...)``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kernels import check_chunk_size
from rlplat.algos.config import AlgoConfig
from rlplat.buffer import RedisConfig
from rlplat.data.prompts import DataConfig
from rlplat.engine.config import RolloutConfig
from rlplat.reward_config import RewardsConfig
from rlplat.runlog import WandbConfig
from rlplat.train.config import TrainerConfig


class Section(BaseModel):
    """Base of every config section: closed (unknown keys are errors) and validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    preset: str | None = Field(
        "tiny", description="Built-in model preset (see rlplat.models.PRESETS); null to use `path`."
    )
    path: str | None = Field(
        None, description="HF-format checkpoint directory (config.json + safetensors + tokenizer)."
    )
    precision: Literal["fp32", "bf16", "fp8"] = Field(
        "fp32",
        description="fp32, bf16, or fp8 (bf16 weights with blockwise-e4m3 GEMM inputs in linear layers).",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="HF config.json fields to change on the preset, by their HF names."
    )
    seed: int = Field(0, description="Seed of the random initialisation when starting from a preset.")
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|cuda(:\d+)?)$",
        description="Device of the embedded rollout engine's and the torch trainer's model: cpu, cuda or cuda:N.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.preset is None) == (self.path is None):
            raise ValueError("set exactly one of model.preset and model.path")
        if self.preset is not None:
            from rlplat.models.presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        return self


class KernelSection(Section):
    backend: Literal["reference", "triton"] = Field(
        "reference", description="Kernel implementation for trainer and rollout alike (triton needs a GPU)."
    )
    batch_invariant: bool = Field(
        True,
        description="Bitwise batch/prefill/decode-invariant kernels (required for exact rollout alignment).",
    )
    chunk_size: int = Field(
        64,
        description="Linear-attention chunk size (tokens; chunks sit at absolute positions): 16, 32, 64, 128 or 256.",
    )

    @model_validator(mode="after")
    def _chunk_fits(self) -> KernelSection:
        check_chunk_size(self.chunk_size)
        return self


class RunSection(Section):
    name: str = Field("run", description="Run name; the run directory is <output_dir>/<name>-<timestamp>.")
    output_dir: str = Field("runs", description="Where run directories are created.")
    seed: int = Field(0, description="Global seed (data order, sampling).")
    steps: int = Field(20, ge=1, description="RL steps (optimizer steps) to run.")
    warm_start_steps: int = Field(
        0, ge=0, description="Supervised warm-start steps on reference answers before RL."
    )
    warm_start_batch_size: int = Field(32, ge=1, description="Prompts per warm-start step.")
    warm_start_lr: float | None = Field(
        None, gt=0, description="Learning rate of the warm start; null: trainer.lr."
    )
    eval_every: int = Field(5, ge=0, description="Evaluate held-out accuracy every N steps (0: never).")
    checkpoint_every: int = Field(
        10, ge=0, description="Checkpoint every N steps (0: only at the end and on Ctrl-C)."
    )
    rollouts_logged: int = Field(4, ge=0, description="Rollouts per step written to rollouts.jsonl.")
    stop_after_failed_reward_steps: int = Field(
        3,
        ge=0,
        description=(
            "Stop (checkpoint, exit non-zero with the first error) after this many steps in a row on which "
            "every sample's reward erred; 0: never."
        ),
    )
    mode: Literal["sync", "async"] = Field(
        "sync",
        description=(
            "sync: each step samples with the previous step's weights. async: rollout runs ahead of "
            "training through the Redis experience stream (see `redis:`), by at most max_staleness versions."
        ),
    )
    max_staleness: int = Field(
        1, ge=0, description="Async mode: policy versions a sample may lag the weights it is trained on."
    )


class RoleResources(Section):
    num: int = Field(1, ge=1, description="Number of actors of this role.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor (Ray's scheduling unit).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor.")
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads per actor; null: num_cpus rounded down, at least 1. In sync mode the roles "
        "take turns, so each may use every core.",
    )

    @property
    def threads(self) -> int:
        return self.num_threads or max(1, int(self.num_cpus))


class WorkersConfig(Section):
    """The ``workers:`` section: how many Ray actors of each role, and their resources."""

    rollout: RoleResources = Field(default_factory=RoleResources, description="Rollout workers.")
    reward: RoleResources = Field(
        default_factory=lambda: RoleResources(num_cpus=0.25),
        description="Reward workers (mostly waiting on I/O).",
    )
    trainer: RoleResources = Field(
        default_factory=RoleResources, description="Trainer workers (one per DP rank)."
    )
    max_restarts: int = Field(
        3, ge=0, description="Replacements of dead workers per role (rollout, reward, trainer) per run."
    )


class ExperimentConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection, description="The policy model.")
    kernels: KernelSection = Field(
        default_factory=KernelSection, description="Kernel backend and invariance mode."
    )
    run: RunSection = Field(default_factory=RunSection, description="Run directory, name and seed.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompt dataset and its split.")
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig,
        description="Rollout backend, batch size, sampling defaults, alignment check.",
    )
    rewards: RewardsConfig = Field(
        default_factory=RewardsConfig, description="Reward terms, weights, timeouts."
    )
    trainer: TrainerConfig = Field(
        default_factory=TrainerConfig, description="Optimizer, micro-batches, checkpoints."
    )
    workers: WorkersConfig = Field(
        default_factory=WorkersConfig, description="Ray actors per role and their resources."
    )
    algo: AlgoConfig = Field(
        default_factory=AlgoConfig, description="RL objective: advantages, loss, KL, corrections."
    )
    wandb: WandbConfig = Field(
        default_factory=WandbConfig, description="Weights & Biases logging (offline by default)."
    )
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Experience stream for async mode.")

    def trainer_config(self) -> TrainerConfig:
        """``trainer:`` with what it leaves to the run filled in: a null lr_decay_steps decays over run.steps
        (resolved here, not in config.yaml, so `--resume DIR run.steps=N` decays over the new N)."""
        if self.trainer.lr_decay_steps is not None:
            return self.trainer
        return self.trainer.model_copy(update={"lr_decay_steps": self.run.steps})

    def rollout_precision(self) -> str:
        """The rollout model's precision: ``rollout.precision``, else the trainer's ``model.precision``."""
        return self.rollout.precision or self.model.precision

    def rollout_batch_invariant(self) -> bool:
        """The rollout's kernel mode: ``rollout.batch_invariant``, else ``kernels.batch_invariant``."""
        b = self.rollout.batch_invariant
        return self.kernels.batch_invariant if b is None else b

    def trainer_batch_invariant(self) -> bool:
        """The trainer's kernel mode: ``trainer.batch_invariant``, else ``kernels.batch_invariant``."""
        b = self.trainer.batch_invariant
        return self.kernels.batch_invariant if b is None else b

    @model_validator(mode="after")
    def _rollout_side_makes_sense(self) -> ExperimentConfig:
        """Refuse rollout/trainer combinations that cannot do what they ask for (see each message)."""
        r, order = self.rollout, ("fp8", "bf16", "fp32")  # coarse to fine
        if r.record_routing and r.backend != "native":
            raise ValueError(
                f"rollout.record_routing needs the native backend: rollout.backend={r.backend} does not expose "
                "which experts each token used; set rollout.record_routing=false (mismatch/routing_disagreement "
                "is then not logged)"
            )
        if r.record_routing and self.trainer.backend != "torch":
            raise ValueError(
                f"rollout.record_routing compares with the torch trainer's routing; trainer.backend="
                f"{self.trainer.backend} does not record it: set rollout.record_routing=false"
            )
        if order.index(self.rollout_precision()) > order.index(self.model.precision):
            raise ValueError(
                f"rollout.precision={r.precision} is finer than the trainer's model.precision="
                f"{self.model.precision}: the rollout gets the trainer's {self.model.precision} weights, so it "
                "would be neither exact nor a cheaper inference engine; set rollout.precision to null (exact) "
                f"or to a precision at most {self.model.precision}"
            )
        return self

    @model_validator(mode="after")
    def _lr_decay_fits_the_run(self) -> ExperimentConfig:
        t = self.trainer
        if t.lr_decay != "constant" and t.lr_decay_steps is None and self.run.steps <= t.lr_warmup_steps:
            raise ValueError(
                f"trainer.lr_decay {t.lr_decay!r} over run.steps={self.run.steps} needs more steps than "
                f"trainer.lr_warmup_steps={t.lr_warmup_steps}"
            )
        return self

    @model_validator(mode="after")
    def _trainer_ranks(self) -> ExperimentConfig:
        t = self.trainer
        ranks, how = t.dp_world_size, f"trainer.dp_world_size={t.dp_world_size}"
        if t.backend == "megatron":
            m = t.megatron
            ranks *= m.tensor_parallel_size * m.pipeline_parallel_size
            how = f"tensor {m.tensor_parallel_size} × pipeline {m.pipeline_parallel_size} × data {t.dp_world_size}"
        if self.workers.trainer.num != ranks:
            raise ValueError(
                f"workers.trainer.num={self.workers.trainer.num} but the trainer has {ranks} rank(s) ({how}); "
                f"set workers.trainer.num={ranks} (one trainer actor per rank)"
            )
        return self


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the (nested) pydantic model that owns ``loc[:-1]``."""
    current: Any = model
    for part in loc[:-1]:
        if (
            not (isinstance(current, type) and issubclass(current, BaseModel))
            or part not in current.model_fields
        ):
            return None
        annotation = current.model_fields[part].annotation
        current = annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def format_validation_error(err: ValidationError, root: type[BaseModel] = ExperimentConfig) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc) or []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            suggestion = f"did you mean {hint[0]!r}? " if hint else ""
            lines.append(f"  {path}: unknown key; {suggestion}(allowed: {', '.join(allowed)})")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {path}: {e['msg']}{shown}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML experiment file (or defaults when ``path`` is None) with ``a.b=c`` overrides, validated."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"override {item!r} is not of the form key.path=value")
    try:
        base = OmegaConf.create({}) if path is None else _load_yaml(_existing(path))
        for item in overrides:
            _check_list_indices(base, item.partition("=")[0])
        # Applied to the loaded file, not merged from a separate tree: only here can `terms.0.name` find
        # that `terms` is a list (a tree built from the overrides alone would make '0' a dict key).
        base.merge_with_dotlist(list(overrides))
        data = OmegaConf.to_container(base, resolve=True)
    except OmegaConfBaseException as err:
        raise ValueError(f"could not read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping at the top level")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(format_validation_error(err)) from None


def _check_list_indices(base: Any, key: str) -> None:
    """Refuse an override that indexes a list wrongly, saying what works (``a.0.b=x`` or ``a[0].b=x`` change
    entry 0 of the file's list ``a``; a list gets a new entry only by setting the whole list)."""
    parts = [p for p in key.replace("[", ".").replace("]", "").split(".") if p]
    node: Any = base
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth])
        whole = f"{here}='[{{...}}, {{...}}]'"
        if isinstance(node, ListConfig):
            if not part.isdigit():
                raise ValueError(
                    f"override {key!r}: {here} is a list; index it, e.g. {here}.0.{part}=..., or set the "
                    f"whole list, e.g. {whole}"
                )
            if int(part) >= len(node):
                size = f"{len(node)} entr{'y' if len(node) == 1 else 'ies'}"
                raise ValueError(
                    f"override {key!r}: {here} has {size}, so no entry {part}; to add one, set the whole "
                    f"list, e.g. {whole}"
                )
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            # Below here the file has nothing, so an index would make a dict key "0", not a list entry.
            index = next((j for j in range(depth + 1, len(parts)) if parts[j].isdigit()), None)
            if index is not None:
                path = ".".join(parts[:index])
                raise ValueError(
                    f"override {key!r}: {path} is not a list in the config file, so it has no entry "
                    f"{parts[index]} to change; set the whole list, e.g. {path}='[{{...}}]'"
                )
            return


def _load_yaml(path: Path) -> Any:
    """The file's YAML; a syntax error becomes one line naming the file, line and column (PyYAML's own
    message spans four lines and names the position twice)."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        context_mark = getattr(err, "context_mark", None)
        if context and context_mark is not None:
            problem += f" ({context} that starts on line {context_mark.line + 1})"
        raise ValueError(f"{where}: invalid YAML: {problem}") from None


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    return p


def to_yaml(cfg: BaseModel) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg.model_dump(mode="json")))
