import pytest
import torch

from rlplat.algos.filtering import dynamic_sampling_mask


def test_drops_all_right_and_all_wrong_groups():
    # Groups of 3: (1,1,1) all right -> drop; (0,1,0) mixed -> keep; (0,0,0) -> drop; (1,0,1) -> keep.
    correctness_B = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 1])
    keep_B = dynamic_sampling_mask(correctness_B, group_size=3)
    assert keep_B.tolist() == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3


def test_bool_and_float_correctness():
    assert dynamic_sampling_mask(torch.tensor([True, False, True, True]), 2).tolist() == [
        True,
        True,
        False,
        False,
    ]
    assert dynamic_sampling_mask(torch.tensor([0.5, 0.5]), 2).tolist() == [False, False]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="correctness_B"):
        dynamic_sampling_mask(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        dynamic_sampling_mask(torch.tensor([1, 0, 1]), 2)
    with pytest.raises(ValueError, match="1-D"):
        dynamic_sampling_mask(torch.zeros(2, 2), 2)
