"""The embedded rollout engine: batched decode with continuous batching on rlplat's own model and kernels.

Legend: B sequences in the batch, U distinct prompts in a prefill, P prompt length, C hidden, V vocab.

Each sequence owns one row of a ``ModelCache`` (softmax KV cache, fp32 linear-attention state). Every step,
waiting sequences are admitted while fewer than ``max_batch_size`` run: their prompts are prefilled (once per
prompt, then the rows are copied for its n samples) and their rows appended to the running cache; then all
running sequences decode one token, and finished ones leave (``ModelCache.select``). Nobody is restarted.

Why the log-probs equal the trainer's, bitwise: the trainer scores a response with
``model.token_logprobs(prompt + response)``, one forward over the whole sequence; the engine reaches the same
hidden rows through a cached prefill and decode steps, in batches of other sequences. The model's
batch-invariant kernels make a row's hidden state independent of all of that (tests/models/test_invariance.py),
and the engine scores each sampled token with the same fused LM-head kernel at the same temperature.

Why the sampled tokens do not depend on the batch either: a sequence's token at step s is drawn from its own
row's logits with a uniform number that is a hash of (seed, prompt index, sample index, s), a counter-based
generator with no state shared between sequences. Top-k / top-p rows are drawn one by one; greedy rows and,
on the CPU, rows sampling the whole vocabulary are drawn together with row-wise operations only (an argmax,
or exp, a cumsum along the row and a search), which give a row the same bits alone or in a batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels.lm_head import lm_head_logits, lm_head_logprobs
from rlplat.data.tokenizers import TextTokenizer
from rlplat.engine.config import SamplingParams, per_prompt
from rlplat.engine.sample import FinishReason, Sample
from rlplat.models import ModelCache, RingLinearForCausalLM, precision_of
from rlplat.models.routing import RoutingRecorder


@dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    prompt_index: int
    sampling: SamplingParams
    seed: int
    samples: list[Sample | None]

    @property
    def done(self) -> bool:
        return all(s is not None for s in self.samples)


@dataclass(eq=False)
class _Sequence:
    request: _Request
    sample_index: int
    max_new: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routes: list[torch.Tensor] = field(default_factory=list)  # per token: expert ids [L, k] (record_routing)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class NativeEngine:
    """Generates with a ``RingLinearForCausalLM`` in this process; see the module docstring.

    ``generate`` is the whole-batch call. ``add_request`` / ``step`` / ``collect`` are the serving loop
    under it: a request is validated when added (a bad one raises ``ValueError`` and changes nothing), and
    every ``step`` advances all admitted requests.
    """

    backend_name = "native"

    def __init__(
        self,
        model: RingLinearForCausalLM,
        tokenizer: TextTokenizer | None = None,
        *,
        max_batch_size: int = 32,
        version: int = 0,
        default_sampling: SamplingParams | None = None,
        eos_token_ids: Sequence[int] | None = None,
        record_routing: bool = False,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be ≥ 1, got {max_batch_size}")
        self.model = model.eval()
        self.config = model.config
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                f"{self.config.vocab_size}; use the model's own tokenizer"
            )
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.default_sampling = default_sampling or SamplingParams()
        # record_routing: each Sample's ``routes`` [len(tokens), L, k] holds the experts of the position that
        # scored each token (the prompt's last position, then each response token's), as the trainer's
        # forward routes the positions whose log-probs it compares
        self._routes = RoutingRecorder(model) if record_routing else None
        if eos_token_ids is None:
            eos = self.config.eos_token_id
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._version = self._check_version(version)
        self._requests: dict[int, _Request] = {}
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cache: ModelCache | None = None
        self._next_id = 0
        self._stats = {"requests": 0, "rejected": 0, "tokens": 0, "steps": 0}
        self._last_error: str | None = None

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
        """``n`` samples per prompt, in prompt order. Every prompt is validated before any is admitted, so a
        bad one raises ``ValueError`` (naming it) and leaves the engine as it was."""
        if isinstance(prompts, str | bytes) or (isinstance(prompts, torch.Tensor) and prompts.dim() != 2):
            raise TypeError("generate takes a list of token-id prompts; for text use generate_text")
        params = self._per_prompt(sampling, len(prompts))
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        if len(indices) != len(prompts):
            raise ValueError(f"{len(indices)} prompt_indices for {len(prompts)} prompts; give one per prompt")
        checked = []
        for i, (prompt, sp, index) in enumerate(zip(prompts, params, indices)):
            try:
                checked.append(
                    (self._check_prompt(prompt), self._check_sampling(sp), self._check_index(index))
                )
            except (ValueError, TypeError) as err:
                self._stats["rejected"] += 1
                raise _with_prefix(err, f"prompt {i}") from None
        ids = [self._admit_request(*c) for c in checked]
        while not all(self._requests[r].done for r in ids):
            self.step()
        return [self.collect(r) for r in ids]

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy ``named_tensors`` (HF names, any float dtype: cast to the model's) into the model and serve
        ``version`` from now on. All tensors are checked first: on any mismatch nothing changes."""
        version = self._check_version(version)
        if self._running or self._waiting:
            raise RuntimeError(
                f"update_weights with {len(self._running) + len(self._waiting)} sequences in flight; weights "
                "change between generations (finish or drop the requests first)"
            )
        if not named_tensors:
            raise ValueError("update_weights got no tensors")
        targets = self.model.state_dict(keep_vars=True)
        unknown = sorted(k for k in named_tensors if k not in targets)
        if len(unknown) == len(named_tensors):
            raise ValueError(
                f"update_weights refused: none of the {len(unknown)} tensor names belongs to this "
                f"{self.config.architectures[0]} model (e.g. {unknown[0]!r}); are they from another "
                f"architecture? This model's names look like {next(iter(targets))!r}"
            )
        problems = [f"unknown name {k!r}" for k in unknown]
        for name, t in named_tensors.items():
            if name not in targets:
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                problems.append(f"{name}: expected a floating-point tensor, got {_describe(t)}")
            elif t.shape != targets[name].shape:
                problems.append(f"{name}: shape {tuple(t.shape)}, the model has {tuple(targets[name].shape)}")
            elif not bool(torch.isfinite(t).all()):
                problems.append(f"{name}: contains NaN or Inf")
        if problems:
            shown = "\n  ".join(problems[:20]) + (
                f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            )
            raise ValueError(
                f"update_weights refused (nothing changed), {len(problems)} problem(s):\n  {shown}"
            )
        with torch.no_grad():
            for name, t in named_tensors.items():
                targets[name].copy_(t)
        self._version = version

    def health(self) -> dict[str, Any]:
        return {
            "backend": self.backend_name,
            "ok": True,
            "version": self._version,
            "precision": precision_of(self.model),
            "device": str(self.model.lm_head.weight.device),
            "max_batch_size": self.max_batch_size,
            "running": len(self._running),
            "waiting": len(self._waiting),
            "requests_served": self._stats["requests"],
            "requests_rejected": self._stats["rejected"],
            "tokens_generated": self._stats["tokens"],
            "steps": self._stats["steps"],
            "last_error": self._last_error,
        }

    # Text in / text out
    def encode_prompt(self, prompt: str | Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a text prompt, or of a chat (list of messages) rendered with the chat template."""
        return self._require_tokenizer().encode_prompt(prompt)

    def generate_text(
        self,
        prompts: Sequence[str | Sequence[dict[str, str]]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_indices: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """``generate`` for text prompts or chats; each sample's ``text`` is its decoded response."""
        encoded = []
        for i, prompt in enumerate(prompts):
            try:
                encoded.append(self.encode_prompt(prompt))
            except (ValueError, TypeError) as err:
                raise _with_prefix(err, f"prompt {i}") from None
        return self.generate(encoded, sampling, prompt_indices)

    # The serving loop
    def add_request(
        self, prompt: Sequence[int], sampling: SamplingParams | None = None, prompt_index: int = 0
    ) -> int:
        """Validate and queue one prompt (``sampling.n`` sequences); returns the request id for ``collect``."""
        try:
            checked = (
                self._check_prompt(prompt),
                self._check_sampling(sampling or self.default_sampling),
                self._check_index(prompt_index),
            )
        except (ValueError, TypeError):
            self._stats["rejected"] += 1
            raise
        return self._admit_request(*checked)

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    def collect(self, request_id: int) -> list[Sample] | None:
        """The samples of a finished request (and forget it), or None while it is still running."""
        request = self._requests.get(request_id)
        if request is None:
            raise ValueError(f"no request {request_id} (unknown, or already collected)")
        if not request.done:
            return None
        del self._requests[request_id]
        return list(request.samples)  # type: ignore[arg-type]

    @torch.no_grad()
    def step(self) -> list[Sample]:
        """Admit waiting sequences, decode one token for every running one; returns the samples that finished."""
        finished: list[Sample] = []
        try:
            self._admit()
            finished += self._retire()
            if self._running:
                self._decode()
                finished += self._retire()
        except Exception as err:
            # Never leave half-advanced caches behind: drop what was in flight, keep serving new requests.
            self._last_error = f"{type(err).__name__}: {err}"
            self._drop_in_flight()
            raise
        self._stats["steps"] += 1
        return finished

    # Internals
    def _admit_request(self, prompt: list[int], sampling: SamplingParams, prompt_index: int) -> int:
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        request = _Request(self._next_id, prompt, prompt_index, sampling, seed, [None] * sampling.n)
        self._next_id += 1
        self._requests[request.id] = request
        # The whole sequence (prompt + response) must fit the context so the trainer can score it.
        max_new = min(sampling.max_new_tokens, self.config.max_position_embeddings - len(prompt))
        self._waiting.extend(_Sequence(request, i, max_new) for i in range(sampling.n))
        return request.id

    def _admit(self) -> None:
        free = self.max_batch_size - len(self._running)
        if free <= 0 or not self._waiting:
            return
        joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        prompts: dict[int, int] = {}  # request id -> prefill row
        for s in joining:
            prompts.setdefault(s.request.id, len(prompts))
        requests = [self._requests[r] for r in prompts]
        device = self.model.lm_head.weight.device
        lengths_U = torch.tensor([len(r.prompt) for r in requests], device=device)
        ids_UP = torch.full(
            (len(requests), int(lengths_U.max())), self.config.pad_token_id or 0, device=device
        )
        for row, r in enumerate(requests):
            ids_UP[row, : len(r.prompt)] = torch.tensor(r.prompt, device=device)
        cache = self.model.new_cache(len(requests))
        U, P = ids_UP.shape
        with self._recording():
            h_UPC = self.model.hidden_states(ids_UP, cache=cache, lengths_B=lengths_U)
        last_U = (torch.arange(U, device=device), lengths_U - 1)
        rows = torch.tensor([prompts[s.request.id] for s in joining], device=device)
        cache = cache.select(rows)
        routes = None
        if self._routes is not None:
            routes = self._routes.take(U * P).view(U, P, *self._routes.take_shape())[last_U][rows]
        self._sample(joining, h_UPC[last_U][rows], routes)
        self._running += joining
        self._cache = cache if self._cache is None else ModelCache.concat([self._cache, cache])

    def _decode(self) -> None:
        device = self.model.lm_head.weight.device
        ids_B1 = torch.tensor([[s.tokens[-1]] for s in self._running], device=device)
        ones_B = torch.ones(len(self._running), dtype=torch.long, device=device)
        with self._recording():
            h_BC = self.model.hidden_states(ids_B1, cache=self._cache, lengths_B=ones_B)[:, 0]
        routes = None if self._routes is None else self._routes.take(len(self._running))
        self._sample(self._running, h_BC, routes)

    def _recording(self):
        return self._routes.recording() if self._routes is not None else contextlib.nullcontext()

    def _sample(self, seqs: list[_Sequence], h_BC: torch.Tensor, routes_BLk: torch.Tensor | None) -> None:
        """Choose each sequence's next token from its own row, then score it with the trainer's LM-head op."""
        w = self.model.lm_head.weight
        logits_BV = lm_head_logits(h_BC, w)
        tokens = self._choose(seqs, logits_BV)
        tokens_B = torch.tensor(tokens, device=h_BC.device)
        logp_B = torch.empty(len(seqs), dtype=torch.float32, device=h_BC.device)
        for temperature in sorted({s.request.sampling.logprob_temperature for s in seqs}):
            rows = torch.tensor(
                [i for i, s in enumerate(seqs) if s.request.sampling.logprob_temperature == temperature],
                device=h_BC.device,
            )
            logp_B[rows] = lm_head_logprobs(h_BC[rows], w, tokens_B[rows], temperature)[0]
        for i, (s, token, logp) in enumerate(zip(seqs, tokens, logp_B.tolist())):
            s.tokens.append(token)
            s.logprobs.append(logp)
            if routes_BLk is not None:
                s.routes.append(routes_BLk[i])
            self._check_finished(s)
        self._stats["tokens"] += len(seqs)

    def _choose(self, seqs: list[_Sequence], logits_BV: torch.Tensor) -> list[int]:
        """Each sequence's next token from its own row. Greedy rows, and on the CPU rows sampling the whole
        vocabulary at one temperature, go through together (``sample_tokens``: per row the operations of
        ``sample_token``, so the same token); the rest one by one. On a GPU a cumsum over several rows sums
        in another order than over one, so there every sampled row goes alone."""
        chosen: dict[int, int] = {}
        groups: dict[float | None, list[int]] = {}  # None: greedy
        batched = logits_BV.device.type == "cpu"
        for i, s in enumerate(seqs):
            sp = s.request.sampling
            if sp.greedy or (batched and sp.top_k is None and sp.top_p >= 1.0):
                groups.setdefault(None if sp.greedy else sp.temperature, []).append(i)
            else:
                chosen[i] = sample_token(logits_BV[i] / sp.temperature, _draw(s), sp.top_k, sp.top_p)
        for temperature, rows in groups.items():
            logits = (
                logits_BV
                if len(rows) == len(seqs)
                else logits_BV[torch.tensor(rows, device=logits_BV.device)]
            )
            if temperature is None:
                tokens = logits.argmax(-1).tolist()
            else:
                u_B = torch.tensor([_draw(seqs[i]) for i in rows], dtype=torch.float64)
                tokens = sample_tokens(logits / temperature, u_B)
            chosen.update(zip(rows, tokens))
        return [chosen[i] for i in range(len(seqs))]

    def _check_finished(self, s: _Sequence) -> None:
        sp = s.request.sampling
        token = s.tokens[-1]
        if token in self.eos_token_ids and not sp.ignore_eos:
            s.finish_reason = "eos"
        elif token in sp.stop_token_ids:
            s.finish_reason, s.stop_reason = "stop", token
        elif sp.stop and (hit := self._stop_string(s.tokens, sp.stop)) is not None:
            s.finish_reason, s.stop_reason = "stop", hit
        elif len(s.tokens) >= s.max_new:
            s.finish_reason = "length"

    def _stop_string(self, tokens: list[int], stops: list[str]) -> str | None:
        assert self.tokenizer is not None  # stop strings are refused without one
        # Special tokens count as text here, so a stop string may be one (e.g. "<|user|>").
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        return next((stop for stop in stops if stop in text), None)

    def _retire(self) -> list[Sample]:
        done = [s for s in self._running if s.finish_reason is not None]
        if not done:
            return []
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None]
        self._running = [self._running[i] for i in keep]
        if keep:
            assert self._cache is not None
            self._cache = self._cache.select(torch.tensor(keep, device=self._cache.lengths_B.device))
        else:
            self._cache = None
        samples = []
        for s in done:
            r = s.request
            sample = Sample(
                prompt_index=r.prompt_index,
                sample_index=s.sample_index,
                prompt_tokens=r.prompt,
                tokens=s.tokens,
                logprobs=torch.tensor(s.logprobs, dtype=torch.float32),
                finish_reason=s.finish_reason,  # type: ignore[arg-type]
                version=self._version,
                stop_reason=s.stop_reason,
                text=self.tokenizer.decode(s.tokens) if self.tokenizer is not None else None,
                routes=torch.stack(s.routes).cpu() if self._routes is not None else None,
            )
            r.samples[s.sample_index] = sample
            if r.done:
                self._stats["requests"] += 1
            samples.append(sample)
        return samples

    def _drop_in_flight(self) -> None:
        for s in [*self._running, *self._waiting]:
            self._requests.pop(s.request.id, None)
        self._running, self._waiting, self._cache = [], deque(), None

    # Validation
    def _per_prompt(self, sampling, count: int) -> list[SamplingParams | dict]:
        return per_prompt(sampling, count, self.default_sampling)

    def _check_sampling(self, sampling: SamplingParams | dict) -> SamplingParams:
        if isinstance(sampling, dict):
            sampling = SamplingParams.model_validate(sampling)
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams or a dict, got {type(sampling).__name__}")
        vocab = self.config.vocab_size
        bad_ids = [t for t in sampling.stop_token_ids if not 0 <= t < vocab]
        if bad_ids:
            raise ValueError(f"stop_token_ids {bad_ids} are outside the vocabulary [0, {vocab})")
        if sampling.stop:
            if self.tokenizer is None:
                raise ValueError(
                    f"stop strings {sampling.stop} need a tokenizer, and this engine has none; use "
                    "stop_token_ids, or load the model from a directory with a tokenizer"
                )
            unknown = [s for s in sampling.stop if not self.tokenizer.can_produce(s)]
            if unknown:
                raise ValueError(
                    f"unknown stop string(s) {unknown}: the tokenizer cannot produce them (their encoding "
                    "does not decode back to them), so they would never stop anything"
                )
        return sampling

    def _check_prompt(self, prompt: Sequence[int]) -> list[int]:
        if isinstance(prompt, str | bytes):
            raise TypeError("a prompt here is a list of token ids; for text use generate_text")
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point():
                raise TypeError(f"a prompt tensor must be 1-D integer token ids, got {_describe(prompt)}")
            prompt = prompt.tolist()
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError("a prompt must be a list of int token ids")
        if not ids:
            raise ValueError("the prompt is empty; give at least one token (e.g. the BOS token)")
        vocab, context = self.config.vocab_size, self.config.max_position_embeddings
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab})")
        if len(ids) >= context:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the context (max_position_embeddings) is {context}: "
                f"at most {context - 1} leave room for a response; shorten it"
            )
        return ids

    @staticmethod
    def _check_index(index: int) -> int:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"a prompt index must be an int, got {type(index).__name__}")
        return index

    @staticmethod
    def _check_version(version: int) -> int:
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"a policy version is an int ≥ 0, got {version!r}")
        return version

    def _require_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise ValueError(
                "this engine has no tokenizer; pass token ids, or load a model directory with one"
            )
        return self.tokenizer


def sample_token(z_V: torch.Tensor, u: float, top_k: int | None = None, top_p: float = 1.0) -> int:
    """Draw a token from softmax(z) restricted to the top-k, then the top-p nucleus, by inverse CDF at ``u``.

    Works on one row, in float64, with a stable sort, so the result depends on nothing but (z, u, k, p).
    """
    if top_k is not None or top_p < 1.0:
        z_V, order_V = torch.sort(z_V, descending=True, stable=True)
        if top_k is not None:
            z_V, order_V = z_V[:top_k], order_V[:top_k]
    else:
        order_V = None
    p_V = torch.exp((z_V - z_V.max()).double())
    if top_p < 1.0:
        cum_V = torch.cumsum(p_V, 0) / p_V.sum()
        keep = int(torch.searchsorted(cum_V, torch.tensor([top_p], dtype=torch.float64))) + 1
        p_V, order_V = p_V[:keep], order_V[:keep]  # type: ignore[index]
    (j,) = _inverse_cdf(p_V[None], torch.tensor([u], dtype=torch.float64))
    return int(order_V[j]) if order_V is not None else j


def sample_tokens(z_BV: torch.Tensor, u_B: torch.Tensor) -> list[int]:
    """``sample_token`` over the whole vocabulary for every row at once (u_B float64): the row max is exact and
    exp, cumsum along a row and searchsorted give a row the same bits alone or in a batch, so row b gets
    ``sample_token(z_BV[b], u_B[b])``."""
    return _inverse_cdf(torch.exp((z_BV - z_BV.amax(-1, keepdim=True)).double()), u_B)


def _inverse_cdf(p_BV: torch.Tensor, u_B: torch.Tensor) -> list[int]:
    """Per row, the index where u · Σp falls in the running sum of the (unnormalised, float64) weights p."""
    live_BV = p_BV > 0
    if not bool(live_BV.any(-1).all()):
        bad = (~live_BV.any(-1)).nonzero()[:, 0].tolist()
        raise ValueError(f"rows {bad} of the logits have no token with nonzero probability (NaN or all -inf)")
    cdf_BV = torch.cumsum(p_BV, -1)
    target_B1 = (u_B.to(p_BV.device) * cdf_BV[:, -1])[:, None]
    j_B = torch.searchsorted(cdf_BV, target_B1, right=True)[:, 0]
    # never past the last token with nonzero probability (u·total can round up to the total)
    last_B = p_BV.shape[-1] - 1 - live_BV.flip(-1).int().argmax(-1)
    return torch.minimum(j_B, last_B).tolist()


def _draw(s: _Sequence) -> float:
    """The uniform number of sequence ``s``'s next token."""
    return _uniform(s.request.seed, s.request.prompt_index, s.sample_index, len(s.tokens))


def _uniform(seed: int, prompt_index: int, sample_index: int, step: int) -> float:
    """A uniform number in [0, 1) that is a pure function of its arguments (a counter-based generator)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}/{step}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def _with_prefix(err: ValueError | TypeError, where: str) -> ValueError | TypeError:
    # pydantic's ValidationError (a ValueError) cannot be rebuilt from a message
    return (TypeError if isinstance(err, TypeError) else ValueError)(f"{where}: {err}")


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
