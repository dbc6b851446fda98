"""The streams' image pool: what it holds, the memory it counts, and its bound, against a plain dict."""

import torch
from hypothesis import given, settings, strategies as st

from tb_convviz.image_pool import ImagePool

IMAGE = (2, 3, 3)
IMAGE_BYTES = 2 * 3 * 3 * 4


def storage_bytes(pool: ImagePool) -> int:
    """The CPU memory the pool's images really keep alive: each storage once."""
    storages = {image.untyped_storage().data_ptr(): image.untyped_storage().nbytes() for image in pool.images.values()}
    return sum(storages.values())


operations = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(st.integers(0, 40), min_size=1, max_size=8)),
    st.tuples(st.just("drop"), st.lists(st.integers(0, 40), max_size=8)),
    st.tuples(st.just("keep"), st.lists(st.integers(0, 40), max_size=8)),
    st.tuples(st.just("evict"), st.permutations(range(41))),
), max_size=25)


@settings(max_examples=80, deadline=None)
@given(ops=operations, bound=st.integers(0, 12))
def test_pool_holds_what_was_added_and_counts_its_memory(ops, bound):
    pool, expected = ImagePool(bound * IMAGE_BYTES), {}
    source = torch.arange(41 * 18, dtype=torch.float32).view(41, *IMAGE)
    for op, keys in ops:
        if op == "add":
            batch = source[keys]  # a forward's images; keys may repeat within it and repeat held ones
            pool.add(keys, batch, list(range(len(keys))))
            batch.zero_()  # the user's tensor may change after the forward: the pool holds copies
            for key in keys:
                expected.setdefault(key, source[key])
        elif op == "drop":
            pool.drop(keys)
            for key in keys:
                expected.pop(key, None)
        elif op == "keep":
            pool.keep(set(keys))
            expected = {key: image for key, image in expected.items() if key in keys}
        else:
            held = [key for key in keys if key in expected]
            dropped = pool.evict(keys)
            assert dropped == held[:len(dropped)]  # in the order given
            for key in dropped:
                expected.pop(key)
            assert pool.bytes <= pool.max_bytes
            assert pool.bytes == len(expected) * IMAGE_BYTES  # each image its own memory: no more left than needed
        assert pool.images.keys() == expected.keys()
        for key, image in expected.items():
            assert torch.equal(pool.image(key), image)
        assert pool.bytes == storage_bytes(pool)
        assert pool.bytes <= 2 * len(expected) * IMAGE_BYTES  # blocks are compacted once half their images are gone


def test_one_block_per_forward_until_an_eviction():
    pool = ImagePool(100 * IMAGE_BYTES)
    images = torch.rand(8, *IMAGE)
    pool.add(list(range(8)), images, list(range(8)))
    assert len({image.untyped_storage().data_ptr() for image in pool.images.values()}) == 1
    pool.drop([0, 1, 2])  # 5 of 8 left: the block stays
    assert pool.bytes == 8 * IMAGE_BYTES
    pool.drop([3, 4])  # 3 of 8 left: compacted
    assert pool.bytes == 3 * IMAGE_BYTES == storage_bytes(pool)
    assert all(torch.equal(pool.image(key), images[key]) for key in (5, 6, 7))
