"""Generative judges for GAR: anything with ``judge(prompts: list[str]) -> list[str]``.

Two backends:
- ``OpenAIJudge``: an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, a hosted API), stdlib HTTP.
- ``EngineJudge``: any rlplat rollout engine. The only thing it needs from the engine is the ``TextGenerator``
  protocol below — ``generate_text(prompts, max_new_tokens) -> list[str]``, one completion per prompt, in order
  — so the policy's own engine (or a second, frozen one) can referee.

Judges are looked up by name in a process-level table (``register_judge``) so a YAML config can say
``judge: policy`` while the trainer registers ``EngineJudge(engine)`` under that name at start-up.

Concurrency: the reward runner calls one GAR instance, and so one judge, from up to
``rewards.max_concurrency`` threads at once (one per prompt group). ``OpenAIJudge`` is stateless per call.
An engine is not: ``NativeEngine`` is a serving loop whose ``step()`` advances every admitted request and
whose error path drops all of them, so two callers would step each other's sequences, mutate its batch and
cache mid-step (IndexError/KeyError), and lose each other's requests. ``EngineJudge`` therefore lets one
call at a time into its engine. That costs nothing on CPU, where one forward already uses every intra-op
thread, and little elsewhere: one group's n(n-1) contests are already one batch.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Judge(Protocol):
    def judge(self, prompts: list[str]) -> list[str]:
        """One free-text judgement per prompt, same order."""
        ...


@runtime_checkable
class TextGenerator(Protocol):
    """The minimal rollout-engine surface a judge needs. ``EngineJudge`` calls it from one thread at a time,
    so an implementation need not be thread-safe."""

    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]: ...


class EngineJudge:
    """Referee with an rlplat rollout engine (or anything implementing ``TextGenerator``)."""

    def __init__(self, engine: TextGenerator, max_new_tokens: int = 512):
        if not callable(getattr(engine, "generate_text", None)):
            raise TypeError(
                f"{type(engine).__name__} has no generate_text(prompts, max_new_tokens); "
                "EngineJudge needs an engine implementing rewards.judges.TextGenerator"
            )
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()  # engines are not re-entrant: see the module docstring

    def judge(self, prompts: list[str]) -> list[str]:
        with self._lock:
            out = self.engine.generate_text(list(prompts), self.max_new_tokens)
        if len(out) != len(prompts):
            raise RuntimeError(f"engine returned {len(out)} completions for {len(prompts)} prompts")
        return [str(o) for o in out]


class NativeGenerator:
    """A small rlplat model as judge, greedy: a checkpoint directory (``path``) or a preset with a seed.

    Presets have no tokenizer, so they get rlplat's character tokenizer; this is what the tiny GAR config and
    its end-to-end test use. Production judges are served models (``backend: openai``). Not thread-safe, like
    the engine it drives; use it through ``EngineJudge``.
    """

    def __init__(
        self, preset: str | None = "tiny", path: str | None = None, seed: int = 0, precision: str = "fp32"
    ):
        from rlplat.config import ModelSection
        from rlplat.data.tokenizers import TextTokenizer, make_char_tokenizer
        from rlplat.engine.engine import NativeEngine
        from rlplat.engine.policy import build_policy

        section = ModelSection(preset=None if path else preset, path=path, seed=seed, precision=precision)
        tokenizer = TextTokenizer.from_dir(path) if path else TextTokenizer(make_char_tokenizer())
        self.engine = NativeEngine(build_policy(section), tokenizer, max_batch_size=64)

    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        greedy = {"n": 1, "greedy": True, "temperature": 0.0, "max_new_tokens": max_new_tokens}
        return [group[0].text for group in self.engine.generate_text(prompts, greedy)]


class OpenAIJudge:
    """Referee through an OpenAI-compatible chat-completions endpoint.

    The API key is read from the environment variable ``api_key_env`` (never put keys in configs).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_tokens: int = 512,
        temperature: float = 0.0,
        timeout_s: float = 60.0,
        concurrency: int = 8,
        system_prompt: str | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.max_tokens, self.temperature, self.timeout_s = max_tokens, temperature, timeout_s
        self.concurrency = max(1, int(concurrency))
        self.system_prompt = system_prompt

    def _one(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"judge endpoint {self.url} answered HTTP {e.code}: {e.read()[:300]!r}") from e
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"judge endpoint {self.url} returned no choices[0].message.content") from e

    def judge(self, prompts: list[str]) -> list[str]:
        if len(prompts) <= 1:
            return [self._one(p) for p in prompts]
        with ThreadPoolExecutor(min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._one, prompts))


_JUDGES: dict[str, Judge] = {}


def register_judge(name: str, judge: Judge) -> None:
    """Make ``judge`` available to configs as ``judge: <name>`` (e.g. the trainer's rollout engine)."""
    if not isinstance(judge, Judge):
        raise TypeError(f"{type(judge).__name__} is not a Judge (needs judge(prompts) -> list[str])")
    _JUDGES[name] = judge


def make_judge(spec: Any) -> Judge:
    """A Judge from a Judge, a registered name, or a dict ``{"backend": "openai", "base_url": ..., "model": ...}``."""
    if isinstance(spec, Judge):
        return spec
    if isinstance(spec, str):
        if spec not in _JUDGES:
            raise ValueError(
                f"no judge registered as {spec!r}; call rewards.judges.register_judge({spec!r}, judge) first"
            )
        return _JUDGES[spec]
    if isinstance(spec, dict):
        kw = dict(spec)
        backend = kw.pop("backend", "openai")
        if backend == "openai":
            return OpenAIJudge(**kw)
        if backend == "native":
            max_new_tokens = kw.pop("max_new_tokens", 16)
            return EngineJudge(NativeGenerator(**kw), max_new_tokens=max_new_tokens)
        raise ValueError(
            f"unknown judge backend {backend!r}; use 'openai', 'native' or register an engine judge by name"
        )
    raise TypeError(f"judge must be a Judge, a registered name or a dict, got {type(spec).__name__}")
