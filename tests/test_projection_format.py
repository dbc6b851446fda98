"""Projection storage: quantisation bounds and round trips, lossless encoding, batched crops against one-by-one crops."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tb_convviz import plugin_data_pb2
from tb_convviz import projection_format as fmt
from tb_convviz.geometry import ReceptiveField, crop, record_box
from tb_convviz.projection import stored_crops


def projections(seed: int, n: int, shape=(3, 5, 7)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Heavy tails and exact zeros, like real projections.
    p = rng.standard_t(2, size=(n, *shape)).astype(np.float32) * rng.uniform(1e-6, 1e3, size=(n, 1, 1, 1))
    p[rng.random(p.shape) < 0.3] = 0
    return p.astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), levels=st.sampled_from([1, 7, fmt.LEVELS, 127]))
def test_quantisation_error_is_within_half_a_step(seed, n, levels):
    p = projections(seed, n)
    q, scale = fmt.quantize_many(p, levels)
    assert q.dtype == np.uint8 and q.shape == p.shape
    for one, qs, s in zip(p, q, scale):
        back = fmt.dequantize(qs, float(s))
        assert s == np.abs(one).max()
        # Half a step of the levels, plus half of the 8-bit rounding of the step's grey value.
        np.testing.assert_allclose(back, one, rtol=0, atol=float(s) * (0.5 / levels + 0.5 / 127) * 1.0001)
        assert np.abs(back).max() == pytest.approx(float(s), rel=1e-6)  # the peak is exact
        assert (back[one == 0] == 0).all()
        assert len(np.unique(qs)) <= 2 * levels + 1
        # Re-quantising what a reader de-quantised gives the stored pixels back (export, plugin tests rely on it).
        np.testing.assert_array_equal(fmt.quantize(back, levels)[0], qs)


def test_zero_and_non_finite_projections_are_flat_grey():
    p = np.zeros((3, 3, 4, 4), np.float32)
    p[1, 0, 0, 0] = np.nan
    p[2, 0, 0, 0] = np.inf
    q, scale = fmt.quantize_many(p)
    assert (q == 128).all()
    assert scale[0] == 0 and np.isnan(scale[1]) and np.isnan(scale[2])
    one, one_scale = fmt.quantize(p[0])
    assert (one == 128).all() and one_scale == 0.0


@pytest.mark.parametrize("encoding", ["webp", "png"])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_encoding_is_lossless(encoding, channels):
    q = fmt.quantize_many(projections(3, 4, (channels, 9, 6)))[0]
    blobs = fmt.encode_many(list(q), encoding)
    for one, blob in zip(q, blobs):
        np.testing.assert_array_equal(fmt.decode_pixels(blob, channels, 9, 6), one)
    with pytest.raises(ValueError, match="but its record declares"):
        fmt.decode_pixels(blobs[0], channels, 9, 7)


def test_runs_before_clipping_store_the_whole_box():
    q = fmt.quantize(projections(5, 1, (3, 9, 6))[0])[0]
    info = plugin_data_pb2.ProjectionInfo(channels=3, height=9, width=6)  # clipped unset, as older runs wrote it
    np.testing.assert_array_equal(fmt.decode_projection(fmt.encode_pixels(q), info, (-50, -50, -41, -44)), q)


def test_runs_before_the_levels_field_read_as_8_bit():
    assert fmt.levels_of(plugin_data_pb2.ProjectionInfo(layer="a")) == 127
    assert fmt.levels_of(plugin_data_pb2.ProjectionInfo(layer="a", levels=fmt.LEVELS)) == fmt.LEVELS


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 40), stride=st.integers(1, 8),
       offset=st.floats(-6, 6), n=st.integers(1, 5), positional=st.booleans(),
       method=st.sampled_from(["analytic", "global"]))
def test_a_stored_region_decodes_to_the_whole_box(seed, size, stride, offset, n, positional, method):
    """Storing only the box inside the image, then padding it back, equals cropping the whole box."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((n, 3, 13, 17)).astype(np.float32)
    pixels[rng.random(pixels.shape) < 0.3] = 0
    field = ReceptiveField(size=(size, size + 1), stride=(stride, stride), offset=(offset, -offset), method=method)
    ys, xs = rng.integers(-1, 6, size=n), rng.integers(-1, 6, size=n)
    boxes = np.array([record_box(field, positional, int(y), int(x)) for y, x in zip(ys, xs)])
    info = plugin_data_pb2.ProjectionInfo(channels=3, height=size, width=size + 1, clipped=True, image_height=13,
                                          image_width=17)
    for one, box, stored in zip(pixels, boxes, stored_crops(pixels, boxes)):
        q, scale = fmt.quantize(stored)
        whole = crop(np.moveaxis(one, 0, -1), tuple(box), fill=0).transpose(2, 0, 1)
        assert scale == np.abs(whole).max()  # outside the image there is nothing to miss
        got = fmt.decode_projection(fmt.encode_pixels(q), info, tuple(int(v) for v in box))
        np.testing.assert_array_equal(got, fmt.quantize(whole)[0])


def test_a_grey_model_s_projections_read_back(tmp_path):
    import torch
    from torch import nn

    from tb_convviz import ConvVizLogger, ProbeSet, read_run

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU())
    probe = ProbeSet(torch.rand(12, 1, 16, 16))
    with ConvVizLogger(net, probe, tmp_path, layers=["1", "4"], k=2, projections="topk") as logger:
        logger.log(0)
    run = read_run(tmp_path)
    for layer in run.layers:
        info = run.projection_info(layer.name)
        assert (info.channels, info.encoding, info.levels) == (1, fmt.ENCODING, fmt.LEVELS)
        for unit in range(layer.units):
            p = run.projection(layer.name, 0, unit, rank=1)
            assert p.shape == (1, *layer.receptive_field.size)
            assert np.abs(p).max() == pytest.approx(float(run.projection_record(layer.name, 0, unit, 1)["scale"]))
            np.testing.assert_array_equal(run.projection_pixels(layer.name, 0, unit, rank=1), fmt.quantize(p)[0])
