import pytest

from rlplat.config import ModelSection
from rlplat.data.tokenizers import DEFAULT_ALPHABET, TextTokenizer, make_char_tokenizer, save_tokenizer
from rlplat.engine import NativeEngine, build_policy


@pytest.fixture(scope="session")
def policy_fp32():
    """The tiny preset as check-alignment and the trainer build it. Tests must not change its weights."""
    return build_policy(ModelSection(preset="tiny", precision="fp32", seed=0))


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory):
    """A character tokenizer covering all 512 ids of the tiny preset, so every sampled token has text
    (an untrained model samples the whole vocabulary)."""
    extra = "".join(chr(0x4E00 + i) for i in range(512 - 7 - len(DEFAULT_ALPHABET)))
    path = save_tokenizer(make_char_tokenizer(DEFAULT_ALPHABET + extra), tmp_path_factory.mktemp("tok"))
    return TextTokenizer.from_dir(path)


@pytest.fixture
def engine(policy_fp32, char_tokenizer):
    return NativeEngine(policy_fp32, char_tokenizer, max_batch_size=8)
