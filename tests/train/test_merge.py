import math

import pytest
import torch

from rlplat.models import load_pretrained, save_pretrained
from rlplat.train import merge_checkpoints, merge_coefficients
from rlplat.train.checkpoint import decay_weights
from rlplat.train.cli import register


def test_coefficients_hand_computed():
    # linear decay over k = 3 updates: w = [1, 2/3, 1/3] -> c = [0, 1/3, 1/3, 1/3]
    assert merge_coefficients(decay_weights("linear", 3)) == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])
    # inverse-sqrt over k = 2: w = [1, 1/sqrt2] -> c = [0, 1 - 1/sqrt2, 1/sqrt2]
    c = merge_coefficients(decay_weights("inverse-sqrt", 2))
    assert c == pytest.approx([0, 1 - 1 / math.sqrt(2), 1 / math.sqrt(2)])
    # cosine over k = 2: w = [1, 0.5] -> c = [0, 0.5, 0.5]
    assert merge_coefficients(decay_weights("cosine", 2)) == pytest.approx([0, 0.5, 0.5])
    assert merge_coefficients([0.8, 0.5]) == pytest.approx([0.2, 0.3, 0.5])
    assert sum(merge_coefficients(decay_weights("cosine", 7))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-increasing"):
        merge_coefficients([0.5, 0.8])


@pytest.fixture
def two_checkpoints(tmp_path, tiny_model):
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    return save_pretrained(a, tmp_path / "a"), save_pretrained(b, tmp_path / "b"), a, b


def test_merge_of_identical_checkpoints_is_the_identity(tmp_path, two_checkpoints):
    pa, _, a, _ = two_checkpoints
    out, coeffs = merge_checkpoints([pa, pa, pa], tmp_path / "m", schedule="cosine")
    assert len(coeffs) == 3
    merged = load_pretrained(out)
    for k, v in a.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v), k


def test_two_checkpoint_merge_is_the_weighted_average(tmp_path, two_checkpoints):
    pa, pb, a, b = two_checkpoints
    out, coeffs = merge_checkpoints([pa, pb], tmp_path / "m", weights=[0.25, 0.75])
    assert coeffs == [0.25, 0.75]
    merged = load_pretrained(out).state_dict()
    for k, v in a.state_dict().items():
        expected = (0.25 * v.double() + 0.75 * b.state_dict()[k].double()).float()
        assert torch.equal(merged[k], expected), k
    with pytest.raises(ValueError, match="sum to 1"):
        merge_checkpoints([pa, pb], tmp_path / "x", weights=[0.5, 0.6])


def test_cli_merge(tmp_path, two_checkpoints):
    import argparse

    pa, pb, _, _ = two_checkpoints
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["merge", str(pa), str(pb), "--schedule", "linear", "--out", str(tmp_path / "m")]
    )
    assert args.func(args) == 0
    # linear over k = 1: w = [1] -> c = [0, 1]: the merge is the last checkpoint
    merged = load_pretrained(tmp_path / "m").state_dict()
    assert all(torch.equal(merged[k], v) for k, v in load_pretrained(pb).state_dict().items())
