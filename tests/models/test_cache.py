"""The decode cache's KV capacity: exactly the whole key blocks its longest row fills (a decode step's batched
block GEMMs read such a cache in place; spare blocks would make them copy it at every step); its values' layout
(each followed by ONES_COLUMNS ones)."""

import pytest
import torch

from kernels.softmax_attention.reference import KEY_BLOCK, ONES_COLUMNS
from rlplat.models.cache import LayerCache, ModelCache

G, D = 2, 8


def kv(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, G, D, generator=g), torch.randn(B, T, G, D, generator=g)


def test_capacity_grows_to_the_key_blocks_the_longest_row_needs():
    cache = LayerCache()
    capacities = []
    for start, stop in [(0, 1), (1, KEY_BLOCK), (KEY_BLOCK, KEY_BLOCK + 1), (KEY_BLOCK + 1, 300), (300, 301)]:
        k, v = kv(1, stop - start, seed=start)
        keys_BLGD, values_BLGD = cache.append_kv(k, v, torch.arange(start, stop)[None])
        capacities.append(cache.k_BGLD.shape[2])
        # the keys land at their positions, the values followed by ones, and the returned views are the cache
        assert torch.equal(keys_BLGD[:, start:stop], k) and torch.equal(values_BLGD[:, start:stop, :, :D], v)
        assert torch.equal(values_BLGD[:, start:stop, :, D:], torch.ones(1, stop - start, G, ONES_COLUMNS))
        assert keys_BLGD.data_ptr() == cache.k_BGLD.data_ptr()
        assert values_BLGD.data_ptr() == cache.v_BGLD.data_ptr()
    blocks = lambda n: -(-n // KEY_BLOCK) * KEY_BLOCK
    assert capacities == [blocks(1), blocks(KEY_BLOCK), blocks(KEY_BLOCK + 1), blocks(300), blocks(301)]


def test_selecting_rows_shrinks_the_capacity_to_the_kept_rows():
    cache = ModelCache.empty(3, 1)
    k, v = kv(3, 300)
    cache.layers[0].append_kv(k, v, torch.arange(300).expand(3, -1))
    cache.lengths_B = torch.tensor([300, 10, 129])
    assert cache.layers[0].k_BGLD.shape[2] == 3 * KEY_BLOCK

    kept = cache.select(torch.tensor([1, 2]))
    layer = kept.layers[0]
    assert layer.k_BGLD.shape == (2, G, 2 * KEY_BLOCK, D) and layer.k_BGLD.is_contiguous()
    assert torch.equal(kept.lengths_B, torch.tensor([10, 129]))
    assert torch.equal(layer.k_BGLD.transpose(1, 2), k[[1, 2], : 2 * KEY_BLOCK])
    assert torch.equal(layer.v_BGLD.transpose(1, 2)[..., :D], v[[1, 2], : 2 * KEY_BLOCK])

    short = cache.select(torch.tensor([1]))
    assert short.layers[0].k_BGLD.shape[2] == KEY_BLOCK
    # and decoding goes on from there: the next key of row 1 lands at its position, within the same block
    k1, v1 = kv(1, 1, seed=1)
    short.layers[0].append_kv(k1, v1, torch.tensor([[10]]))
    assert short.layers[0].k_BGLD.shape[2] == KEY_BLOCK
    assert torch.equal(short.layers[0].k_BGLD[0, :, 10], k1[0, 0])


def test_a_cache_of_the_old_value_layout_is_refused():
    """Values without their ones columns (a cache kept before that layout) would give wrong row sums: refused with
    the fix named, before anything is written."""
    k, v = kv(1, 3)
    cache = LayerCache(k_BGLD=k.transpose(1, 2).contiguous(), v_BGLD=v.transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match="values_with_ones"):
        cache.append_kv(*kv(1, 1, seed=1), torch.tensor([[3]]))
    assert torch.equal(cache.k_BGLD, k.transpose(1, 2))
