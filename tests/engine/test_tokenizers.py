import json

import pytest

from rlplat.data.tokenizers import (
    CHAR_CHAT_TEMPLATE,
    DEFAULT_ALPHABET,
    TextTokenizer,
    make_char_tokenizer,
    save_tokenizer,
)
from rlplat.models import preset


def test_special_ids_match_the_tiny_preset_and_vocab_fits():
    tok = make_char_tokenizer()
    cfg = preset("tiny")
    assert tok.token_to_id("<pad>") == cfg.pad_token_id == 0
    assert tok.token_to_id("<eos>") == cfg.eos_token_id == 1
    assert tok.token_to_id("<bos>") == 2
    assert tok.get_vocab_size() <= cfg.vocab_size


def test_round_trip_one_token_per_character():
    tok = make_char_tokenizer()
    text = "x = 12 * (3 + 4)\n\tdone."
    enc = tok.encode(text, add_special_tokens=False)
    assert len(enc.ids) == len(text)
    assert tok.decode(enc.ids) == text


def test_special_tokens_in_text_and_unknown_characters():
    tok = TextTokenizer(make_char_tokenizer("ab"))
    assert tok.encode("a<eos>b") == [7, 1, 8]
    assert tok.encode("aéb") == [7, 3, 8]  # é is not in the alphabet: <unk>
    assert tok.decode([7, 1, 8]) == "ab"
    assert tok.decode([7, 1, 8], skip_special_tokens=False) == "a<eos>b"
    assert tok.can_produce("ab") and tok.can_produce("<eos>")
    assert not tok.can_produce("é") and not tok.can_produce("")


def test_bad_alphabets():
    with pytest.raises(ValueError, match="repeats"):
        make_char_tokenizer("abca")
    with pytest.raises(ValueError, match="empty"):
        make_char_tokenizer("")


def test_save_and_render_the_chat_template(tmp_path):
    save_tokenizer(make_char_tokenizer(), tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAR_CHAT_TEMPLATE and config["eos_token"] == "<eos>"
    tok = TextTokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 7 + len(DEFAULT_ALPHABET)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    text = tok.apply_chat_template(chat)
    assert text == "<bos><|system|>Be brief.<eos><|user|>1+1?<eos><|assistant|>"
    assert tok.encode(text)[:3] == [2, 4, tok.token_to_id("B")]
    assert not tok.apply_chat_template(chat, add_generation_prompt=False).endswith("<|assistant|>")


def test_chat_template_forms_and_errors(tmp_path):
    tok = TextTokenizer(make_char_tokenizer())
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    # a list of named templates (HF allows it) and the separate chat_template.jinja file
    make_char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    named = [{"name": "default", "template": "{{ messages[0]['content'] }}!"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert TextTokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(ValueError, match="no system role"):
        TextTokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="role"):
        TextTokenizer.from_dir(tmp_path).apply_chat_template(["hi"])
