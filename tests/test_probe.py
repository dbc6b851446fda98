"""ProbeSet: construction, display de-normalisation, fingerprints, dataset-backed sets."""

import numpy as np
import pytest
import torch

from tb_convviz import ProbeSet
from tb_convviz import probe as probe_module


class Pairs(torch.utils.data.Dataset):
    classes = ["even", "odd"]

    def __init__(self, n=50, size=8, channels=3):
        self.images = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 2


def test_from_dataset_draws_n_distinct_images_by_seed():
    data = Pairs()
    a = ProbeSet.from_dataset(data, n=20, seed=3)
    b = ProbeSet.from_dataset(data, n=20, seed=3)
    c = ProbeSet.from_dataset(data, n=20, seed=4)
    assert len(a) == 20 and a.class_names == ["even", "odd"]
    assert a.fingerprint == b.fingerprint != c.fingerprint
    drawn = {int(torch.nonzero((data.images == a.image(i)).flatten(1).all(1))[0]) for i in range(20)}
    assert len(drawn) == 20
    assert all(a.label(i) == int((data.images == a.image(i)).flatten(1).all(1).nonzero()[0]) % 2 for i in range(20))


def test_from_dataset_caps_n_at_dataset_size():
    assert len(ProbeSet.from_dataset(Pairs(n=7), n=1024)) == 7


def test_dataset_backed_when_too_large_for_memory(monkeypatch):
    monkeypatch.setattr(probe_module, "IN_MEMORY_BYTES", 100)
    data = Pairs(n=30)
    lazy = ProbeSet.from_dataset(data, n=30, seed=0)
    eager = ProbeSet(torch.stack([data[i][0] for i in range(30)]), labels=[i % 2 for i in range(30)])
    batches_lazy = torch.cat([b for _, b in lazy.batches(7)])
    batches_eager = torch.cat([b for _, b in eager.batches(7)])
    assert torch.equal(batches_lazy, batches_eager)
    assert [lazy.label(i) for i in range(30)] == [eager.label(i) for i in range(30)]
    assert lazy.fingerprint == ProbeSet.from_dataset(data, n=30, seed=0).fingerprint


def test_display_undoes_normalisation():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    raw = torch.rand(2, 3, 4, 4)
    normalised = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    shown = ProbeSet(normalised, mean=mean, std=std).display(1)
    assert shown.dtype == np.uint8 and shown.shape == (4, 4, 3)
    np.testing.assert_allclose(shown, raw[1].permute(1, 2, 0).numpy() * 255, atol=1.0)


def test_batches_cover_a_shard():
    probe = ProbeSet(torch.arange(10.0).view(10, 1, 1, 1))
    got = [(first, b.flatten().tolist()) for first, b in probe.batches(3, start=2, stop=8)]
    assert got == [(2, [2.0, 3.0, 4.0]), (5, [5.0, 6.0, 7.0])]


@pytest.mark.parametrize("kwargs, message", [
    ({"labels": [1, 2]}, "got 2 labels for 3 probe images"),
    ({"mean": [0.5, 0.5]}, "mean has 2 values for 3-channel images"),
])
def test_bad_metadata(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProbeSet(torch.rand(3, 3, 4, 4), **kwargs)


def test_non_tensor_images_say_what_to_do():
    with pytest.raises(TypeError, match="torch.Tensor"):
        ProbeSet(np.zeros((3, 3, 4, 4)))


def test_from_dataset_given_a_data_loader_says_to_pass_its_dataset():
    loader = torch.utils.data.DataLoader(Pairs(n=10), batch_size=4)
    with pytest.raises(TypeError, match=r"not a DataLoader \(which yields batches\): pass loader\.dataset"):
        ProbeSet.from_dataset(loader, n=5)
    assert len(ProbeSet.from_dataset(loader.dataset, n=5)) == 5

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(3, 4, 4), 0

    with pytest.raises(TypeError, match="needs a dataset with len.. and indexing .a map-style dataset., got Stream"):
        ProbeSet.from_dataset(Stream())
