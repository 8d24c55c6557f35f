"""Tokenizers: a model directory's tokenizer with its chat template, and a character-level one for tiny models.

``TextTokenizer`` wraps a ``tokenizers.Tokenizer`` (no transformers needed) together with the chat template
from the same directory: ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates
of which ``default`` is used) or a ``chat_template.jinja`` file. Templates are rendered with jinja2 in a
sandbox, with the variables Hugging Face templates expect (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception``).

``make_char_tokenizer`` builds a one-token-per-character vocabulary with the special tokens first, so the ids
match the tiny preset (``<pad>`` 0, ``<eos>`` 1) and the whole vocabulary fits its 512 entries.
``save_tokenizer`` writes it into a model directory with :data:`CHAR_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
# Order fixes the ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then the role markers.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK, SYSTEM, USER, ASSISTANT)
# Printable ASCII without the form-feed style whitespace: digits, letters, punctuation, space, tab, newline.
DEFAULT_ALPHABET = "".join(c for c in string.printable if c not in "\r\x0b\x0c")
# Each message is its role marker, its content and <eos>; the generation prompt is the assistant marker.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def make_char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET, special_tokens: Sequence[str] = SPECIAL_TOKENS
) -> Tokenizer:
    """One token per character of ``alphabet``, after ``special_tokens`` (ids 0..len-1, in that order).

    Characters outside the alphabet encode to ``<unk>`` (which must be among the special tokens). Special
    tokens written in the text (``"<eos>"``) encode to their single id.
    """
    if UNK not in special_tokens:
        raise ValueError(f"special_tokens must include {UNK!r}, the id of characters outside the alphabet")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {list(special_tokens)}")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ValueError(f"alphabet repeats {''.join(repeated)!r}; give each character once")
    if not alphabet:
        raise ValueError("alphabet is empty")
    vocab = {tok: i for i, tok in enumerate([*special_tokens, *alphabet])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer


def save_tokenizer(
    tokenizer: Tokenizer,
    path: str | Path,
    chat_template: str | None = CHAR_CHAT_TEMPLATE,
    special_tokens: dict[str, str] | None = None,
) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template) into ``path``.

    ``special_tokens`` maps HF roles (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``) to token
    strings; the default is the character tokenizer's.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    roles = special_tokens or {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    for role, token in roles.items():
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{role}={token!r} is not in the tokenizer's vocabulary")
    tokenizer.save(str(path / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **roles}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus its special-token roles and chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self._template = None

    @classmethod
    def from_dir(cls, path: str | Path) -> TextTokenizer:
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json`` / ``chat_template.jinja``."""
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise ValueError(
                f"{path} has no tokenizer.json; save one with the model (rlplat.data.tokenizers)"
            )
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            try:
                config = json.loads((path / "tokenizer_config.json").read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path / 'tokenizer_config.json'} is not valid JSON: {err}") from err
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        roles = ("bos_token", "eos_token", "pad_token", "unk_token")
        special = {r: _token_content(config[r]) for r in roles if config.get(r) is not None}
        return cls(tokenizer, template, special)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def can_produce(self, text: str) -> bool:
        """Whether some token sequence decodes to exactly ``text`` (tested by an encode/decode round trip)."""
        return bool(text) and self.decode(self.encode(text), skip_special_tokens=False) == text

    def encode_prompt(self, prompt: str | Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a text prompt, or of a chat (list of messages) rendered with the chat template."""
        if isinstance(prompt, str):
            return self.encode(prompt, add_special_tokens=True)
        return self.encode(self.apply_chat_template(prompt, add_generation_prompt=True))

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) with the tokenizer's chat template."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                "chat_template.jinja); pass the prompt as plain text instead"
            )
        if isinstance(messages, str | bytes) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError('a chat prompt is a list of {"role": str, "content": str} messages')
        if self._template is None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            try:
                self._template = env.from_string(self.chat_template)
            except TemplateError as err:
                raise ValueError(f"the tokenizer's chat template does not parse: {err}") from err
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens
        )


def _token_content(token: str | dict[str, Any]) -> str:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts
    return token["content"] if isinstance(token, dict) else token


def _raise_template_error(message: str):
    raise ValueError(f"chat template: {message}")
