"""Probe-image encoding and chunking of the log format."""

import io

import numpy as np
from PIL import Image

from tb_convviz import summary
from tb_convviz.demo.shapes import Shapes


def test_large_images_are_jpeg_under_30_kb_on_average_small_ones_lossless_webp():
    # Textured, gradient-lit 224x224 scenes; the budget is what a 50,000-image probe set needs.
    large = Shapes(12, seed=3, train=False, size=224).images.permute(0, 2, 3, 1).numpy()
    encoded = [summary.encode_image(image) for image in large]
    assert all(Image.open(io.BytesIO(b)).format == "JPEG" for b in encoded)
    assert np.mean([len(b) for b in encoded]) <= 30_000, [len(b) for b in encoded]
    small = Shapes(4, seed=3, train=False, size=64).images.permute(0, 2, 3, 1).numpy()
    for image in small:
        decoded = Image.open(io.BytesIO(summary.encode_image(image)))
        assert decoded.format == "WEBP"
        np.testing.assert_array_equal(np.asarray(decoded), image)


def test_grayscale_images_stay_single_channel():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    decoded = Image.open(io.BytesIO(summary.encode_image(image)))
    assert decoded.format == "PNG"
    np.testing.assert_array_equal(np.asarray(decoded), image[:, :, 0])


def test_chunks_respect_the_byte_limit_and_keep_order():
    sizes = [100, 200, 300, 50, 900, 10]
    chunks = summary.split_chunks(sizes, limit=400)
    assert [list(range(len(sizes)))[c] for c in chunks] == [[0, 1], [2, 3], [4], [5]]
    assert summary.split_chunks([], limit=400) == []


def test_a_new_event_file_sorts_after_the_ones_already_there(tmp_path):
    import time

    from tb_convviz.reader import event_files

    later = int(time.time()) + 100  # e.g. an earlier process of the same second, with a larger pid
    (tmp_path / f"events.out.tfevents.{later:010d}.host.99999.0.convviz").write_bytes(b"")
    first = summary.EventWriter(str(tmp_path))
    second = summary.EventWriter(str(tmp_path))  # a retry in the same second and process
    first.close()
    second.close()
    names = [f.rsplit("/", 1)[-1] for f in event_files(str(tmp_path))]
    assert names[0].startswith(f"events.out.tfevents.{later:010d}.host.99999")
    assert names[1].startswith(f"events.out.tfevents.{later + 1:010d}.")
    assert names[2].startswith(f"events.out.tfevents.{later + 2:010d}.")
