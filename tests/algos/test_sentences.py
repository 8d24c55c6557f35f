import pytest
import torch

from rlplat.algos.sentences import sentence_ids, sentence_ids_BT


def test_split_after_ascii_pause_punctuation_and_newline():
    tokens = ["Hello", ",", " world", ".", " Next", " line", "\n", "x", ";", "y", ":", "z", "!", "?", "w"]
    assert sentence_ids(tokens) == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7]


def test_split_after_cjk_punctuation():
    tokens = ["你好", "。", "我", "很好", "！", "吗", "，", "是", "；", "的", "：", "？", "、", "完"]
    assert sentence_ids(tokens) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7]


def test_token_ending_in_punctuation_or_trailing_space_closes_sentence():
    # "end." closes 0; "A" ". " form 1 (trailing space ignored); "B" ":\n\n" form 2; "C" is 3.
    assert sentence_ids(["end.", "A", ". ", "B", ":\n\n", "C"]) == [0, 1, 1, 2, 2, 3]


def test_decimal_point_and_thousands_separator_do_not_split():
    # "3" "." "14": '.' between digits stays; the '.' after "14" before " Done" splits.
    assert sentence_ids(["Pi", " is", " 3", ".", "14", ".", " Done"]) == [0, 0, 0, 0, 0, 0, 1]
    assert sentence_ids(["1", ",", "000", " and", " 2,", "5"]) == [0, 0, 0, 0, 0, 0]
    # A period after a digit followed by a word still ends the sentence.
    assert sentence_ids(["x", " =", " 2", ".", " So"]) == [0, 0, 0, 0, 1]


def test_empty_and_non_str_tokens():
    assert sentence_ids([]) == []
    assert sentence_ids(["", "a", ""]) == [0, 0, 0]
    with pytest.raises(TypeError, match="token_texts"):
        sentence_ids(["a", 3])


def test_batch_tensor_is_right_padded():
    out_BT = sentence_ids_BT([["a", ".", "b"], ["c"], []], num_tokens=4)
    assert out_BT.dtype == torch.long
    assert out_BT.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="num_tokens"):
        sentence_ids_BT([["a", "b", "c"]], num_tokens=2)
