"""The ``workers:`` section: how many Ray actors of each role, and their resources."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RoleResources(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


class WorkersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rollout: RoleResources = Field(default_factory=RoleResources, description="Rollout workers.")
    reward: RoleResources = Field(
        default_factory=lambda: RoleResources(num_cpus=0.25),
        description="Reward workers (mostly waiting on I/O).",
    )
    trainer: RoleResources = Field(
        default_factory=RoleResources, description="Trainer workers (one per DP rank)."
    )
    max_restarts: int = Field(
        3, ge=0, description="Restarts of a dead rollout/reward worker per run before giving up."
    )
