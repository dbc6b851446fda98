"""Streaming top-k against a brute-force full sort, ties and all."""

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from tb_convviz.topk import TopK, TopKAccumulator, merge, peaks


def brute_force(acts: np.ndarray, k: int):
    """Full sort of per-image spatial maxima: value desc, then image index asc; first raster position."""
    n, c = acts.shape[:2]
    flat = acts.reshape(n, c, -1)
    peak = flat.max(axis=2)
    first_pos = (flat == peak[:, :, None]).argmax(axis=2)
    images = np.stack([np.lexsort((np.arange(n), -peak[:, u]))[:k] for u in range(c)])
    values = np.take_along_axis(peak.T, images, axis=1)
    positions = np.take_along_axis(first_pos.T, images, axis=1)
    return values, images, positions


def accumulate(acts: torch.Tensor, k: int, batch: int) -> TopK:
    acc = TopKAccumulator(k)
    for first in range(0, len(acts), batch):
        acc.update(acts[first:first + batch], first)
    return acc.result


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40), c=st.integers(1, 6), h=st.integers(1, 5), w=st.integers(1, 5),
    batch=st.integers(1, 17), levels=st.sampled_from([3, 1000]), data=st.data(),
)
def test_streaming_topk_equals_full_sort(n, c, h, w, batch, levels, data):
    k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**31 - 1))
    # Few levels force many exact ties, across images and across positions.
    acts = np.random.default_rng(seed).integers(0, levels, size=(n, c, h, w)).astype(np.float32)
    got = accumulate(torch.from_numpy(acts), k, batch)
    values, images, positions = brute_force(acts, k)
    np.testing.assert_array_equal(got.image.numpy(), images)
    np.testing.assert_array_equal(got.values.numpy(), values)
    np.testing.assert_array_equal(got.position.numpy(), positions)


def test_fully_connected_outputs_have_no_position():
    acts = torch.tensor([[1.0, 5.0], [3.0, 5.0], [2.0, 0.0]])
    got = accumulate(acts, k=2, batch=2)
    assert got.image.tolist() == [[1, 2], [0, 1]]
    assert got.values.tolist() == [[3.0, 2.0], [5.0, 5.0]]
    assert (got.position == -1).all()


def test_nan_ranks_lowest_and_inf_highest():
    acts = torch.tensor([[[[float("nan")]]], [[[1.0]]], [[[float("inf")]]]])
    got = accumulate(acts, k=3, batch=1)
    assert got.image.tolist() == [[2, 1, 0]]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), parts=st.integers(1, 5), k=st.integers(1, 6))
def test_merge_of_shards_equals_one_pass(seed, parts, k):
    """What distributed ranks do: top-k per contiguous shard, merged in any order."""
    rng = np.random.default_rng(seed)
    n = max(k, 12)
    acts = torch.from_numpy(rng.integers(0, 4, size=(n, 3, 2, 2)).astype(np.float32))
    bounds = np.linspace(0, n, parts + 1).astype(int)
    shards = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc = TopKAccumulator(k)
        for first in range(lo, hi, 3):
            acc.update(acts[first:min(first + 3, hi)], first)
        shards.append(acc.result if acc.result is not None else TopK.empty(3, k))
    rng.shuffle(shards)
    merged = shards[0]
    for shard in shards[1:]:
        merged = merge(merged, shard, k)
    whole = accumulate(acts, k, batch=5)
    for field in ("values", "image", "position"):
        assert torch.equal(getattr(merged, field), getattr(whole, field)), field


def test_position_is_the_first_raster_maximum():
    acts = torch.zeros(1, 1, 3, 3)
    acts[0, 0, 1, 2] = acts[0, 0, 2, 0] = 7.0
    got = accumulate(acts, k=1, batch=1)
    assert got.values.item() == 7.0 and got.position.item() == 1 * 3 + 2


def test_channels_last_and_3d_maps_equal_full_sort():
    rng = np.random.default_rng(0)
    acts = rng.integers(0, 4, size=(23, 5, 3, 4)).astype(np.float32)
    got = accumulate(torch.from_numpy(acts).to(memory_format=torch.channels_last), 4, batch=6)
    values, images, positions = brute_force(acts, 4)
    assert np.array_equal(got.image.numpy(), images) and np.array_equal(got.position.numpy(), positions)
    volume = rng.integers(0, 4, size=(11, 2, 2, 3, 2)).astype(np.float32)
    got = accumulate(torch.from_numpy(volume), 3, batch=4)
    values, images, positions = brute_force(volume, 3)
    assert np.array_equal(got.values.numpy(), values) and np.array_equal(got.position.numpy(), positions)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 12), c=st.integers(1, 5), hw=st.integers(1, 4), k=st.integers(1, 6),
       levels=st.sampled_from([3, 1000]), data=st.data())
def test_peaks_positions_every_map_that_can_hold_a_slot(b, c, hw, k, levels, data):
    """With a top-k already held and a batch that repeats images, as the streams feed it."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    distinct = data.draw(st.integers(1, b))
    base = rng.integers(0, levels, size=(distinct, c, hw, hw + 1)).astype(np.float32)
    rows = rng.integers(0, distinct, size=b)
    acts = torch.from_numpy(base[rows])
    held_n = data.draw(st.integers(0, k))
    held = np.full((c, k), -np.inf, dtype=np.float32)
    held[:, :held_n] = -np.sort(-rng.integers(0, levels, size=(c, held_n)), axis=1)
    values, positions = peaks(acts, torch.from_numpy(held))
    flat = acts.flatten(2)
    np.testing.assert_array_equal(values.numpy(), flat.amax(dim=2).numpy())
    first = flat.max(dim=2).indices.numpy()
    # The k-th best over the held images and the batch's distinct images.
    candidates = np.concatenate([held, flat.amax(dim=2)[np.unique(rows, return_index=True)[1]].numpy().T], axis=1)
    kth = -np.sort(-candidates, axis=1)[:, k - 1]
    can_hold = values.numpy() >= kth
    np.testing.assert_array_equal(positions.numpy()[can_hold], first[can_hold])
    assert ((positions.numpy() == -1) | (positions.numpy() == first)).all()
