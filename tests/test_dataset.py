"""Tests for trainer.data.dataset: epoch-keyed order, per-sample seeded augmentation, skips, collate."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader

import helpers
from trainer.config import AugConfig, InputConfig
from trainer.data.dataset import (
    EpochSampler,
    ImageDataset,
    Skipped,
    StreamingImageDataset,
    _SampleDecoder,
    collate,
    sample_seed,
)
from trainer.data.decode import DecodeError
from trainer.data.readers import FolderReader, HFReader, HFStreamReader, Sample

SIZE = 16


def train_transform(**kwargs):
    """timm's training transform with uint8 output, as the trainer uses it (normalize on device)."""
    return create_transform(input_size=(3, SIZE, SIZE), is_training=True, use_prefetcher=True, **kwargs)


def val_transform():
    return create_transform(input_size=(3, SIZE, SIZE), is_training=False, crop_pct=0.875, use_prefetcher=False)


def dataset(reader, transform=None, on_error="skip", seed=0, num_classes=None) -> ImageDataset:
    decoder = _SampleDecoder(transform or train_transform(), num_classes or len(reader.classes), None, on_error, seed)
    return ImageDataset(reader, decoder)


class ListReader:
    """A Reader over given samples, for labels and bytes no real source would produce."""

    def __init__(self, samples: list[Sample], classes: list[str]) -> None:
        self.samples, self.classes = samples, classes

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Sample:
        return self.samples[index]


# --- EpochSampler -------------------------------------------------------------------------


def test_sampler_keys_are_epoch_and_index_covering_every_sample():
    sampler = EpochSampler(10, shuffle=True, seed=1)
    sampler.set_epoch(3)
    keys = list(sampler)
    assert len(sampler) == 10 and len(keys) == 10
    assert all(epoch == 3 for epoch, _ in keys)
    assert sorted(index for _, index in keys) == list(range(10))


def test_sampler_order_is_a_function_of_seed_and_epoch():
    def order(seed, epoch):
        sampler = EpochSampler(50, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return [index for _, index in sampler]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert order(1, 0) != list(range(50))
    before = torch.random.get_rng_state()
    order(1, 5)
    assert torch.equal(torch.random.get_rng_state(), before)  # a private generator


def test_sampler_without_shuffle_is_sequential():
    sampler = EpochSampler(5, shuffle=False, seed=9)
    sampler.set_epoch(2)
    assert list(sampler) == [(2, i) for i in range(5)]


def test_sample_seed_differs_by_seed_epoch_and_index():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= s < 2**63 for s in seeds)


# --- per-sample seeded augmentation -------------------------------------------------------


def test_same_key_gives_the_same_tensor_whatever_came_before(image_folder):
    ds = dataset(FolderReader(image_folder / "train"), seed=7)
    first = ds[(1, 4)][0]
    random.seed(123)
    torch.manual_seed(123)
    np.random.seed(123)
    for key in [(1, 0), (0, 4), (2, 4), (1, 17), (1, 3)]:
        ds[key]
    again = ds[(1, 4)][0]
    assert first.dtype == torch.uint8 and first.shape == (3, SIZE, SIZE)
    assert torch.equal(first, again)
    assert torch.equal(dataset(FolderReader(image_folder / "train"), seed=7)[(1, 4)][0], first)  # a fresh dataset too


def test_augmentation_differs_by_epoch_and_seed(image_folder):
    ds = dataset(FolderReader(image_folder / "train"), seed=0)
    n = len(ds)
    differs_by_epoch = [not torch.equal(ds[(0, i)][0], ds[(1, i)][0]) for i in range(n)]
    assert sum(differs_by_epoch) >= n - 1, differs_by_epoch
    other_seed = dataset(FolderReader(image_folder / "train"), seed=1)
    assert sum(not torch.equal(ds[(0, i)][0], other_seed[(0, i)][0]) for i in range(n)) >= n - 1


def test_augmentation_leaves_the_callers_random_state_alone(image_folder):
    ds = dataset(FolderReader(image_folder / "train"), transform=train_transform(auto_augment="rand-m9-mstd0.5"))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ds[(0, 3)]
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_rand_augment_is_seeded_per_sample_too(image_folder):
    """timm's RandAugment draws its ops from numpy's global RNG."""
    ds = dataset(FolderReader(image_folder / "train"), transform=train_transform(auto_augment="rand-m9-n3-mstd0.5"))
    outputs = []
    for state in range(4):
        random.seed(state)
        np.random.seed(state)
        torch.manual_seed(state)
        outputs.append(torch.stack([ds[(0, i)][0] for i in range(6)]))
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])


def test_worker_count_does_not_change_the_batches(image_folder):
    ds = dataset(FolderReader(image_folder / "train"), seed=3)
    sampler = EpochSampler(len(ds), shuffle=True, seed=3)
    sampler.set_epoch(1)

    def batches(workers):
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collate)
        return [(b["images"], b["labels"]) for b in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 5
    for (images_a, labels_a), (images_b, labels_b) in zip(serial, parallel):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_folder_and_parquet_sources_give_identical_tensors(image_folder, hf_parquet_dir):
    folder = FolderReader(image_folder / "train")
    hf = HFReader(str(hf_parquet_dir), "train")
    for transform in (train_transform(), val_transform()):
        a, b = dataset(folder, transform, seed=4), dataset(hf, transform, seed=4)
        assert len(a) == len(b) == 18
        for key in [(0, i) for i in range(18)] + [(5, 2), (6, 11)]:
            (image_a, label_a), (image_b, label_b) = a[key], b[key]
            assert label_a == label_b
            assert torch.equal(image_a, image_b), key


def test_val_transform_gives_normalized_floats(image_folder):
    image, label = dataset(FolderReader(image_folder / "val"), val_transform())[2]  # a plain index is epoch 0
    assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE) and label == 0
    assert image.min() < 0  # normalized, not 0..1


def test_the_image_carries_its_class_colour(image_folder):
    """The fixture's classes are learnable: the mean colour of a val crop names the class."""
    ds = dataset(
        FolderReader(image_folder / "val"),
        create_transform(input_size=(3, SIZE, SIZE), is_training=False, use_prefetcher=True),
    )
    for i in range(len(ds)):
        image, label = ds[i]
        mean_rgb = image.float().mean(dim=(1, 2))
        assert int(mean_rgb.argmax()) == int(np.argmax(helpers.PALETTE[label])), (i, mean_rgb)


# --- skipped samples ----------------------------------------------------------------------


@pytest.fixture
def broken_folder(image_folder) -> Path:
    """The image folder plus a zero-byte JPEG and a truncated one in class 1 of train."""
    folder = image_folder / "train" / "n00000001"
    (folder / "empty.JPEG").write_bytes(b"")
    whole = helpers.jpeg_bytes(1, 99, size=(64, 48))
    scan = whole.index(b"\xff\xda")  # start of the pixel data: keep the header whole
    (folder / "truncated.JPEG").write_bytes(whole[: scan + (len(whole) - scan) // 2])
    return image_folder


def test_broken_files_are_skipped_with_name_and_reason(broken_folder):
    reader = FolderReader(broken_folder / "train")
    ds = dataset(reader)
    items = [ds[(0, i)] for i in range(len(ds))]
    skipped = {Path(item.name).name: item.reason for item in items if isinstance(item, Skipped)}
    assert skipped == {"empty.JPEG": "empty file", "truncated.JPEG": "truncated JPEG"}
    assert sum(not isinstance(item, Skipped) for item in items) == 18
    batch = collate(items)
    assert batch["images"].shape == (18, 3, SIZE, SIZE) and batch["labels"].shape == (18,)
    assert sorted(batch["skipped"]) == sorted(
        f"{broken_folder / 'train' / 'n00000001' / name}\t{reason}" for name, reason in skipped.items()
    )


@pytest.mark.parametrize("name, reason", [("empty.JPEG", "empty file"), ("truncated.JPEG", "truncated JPEG")])
def test_broken_files_raise_decode_error_under_on_error_raise(broken_folder, name, reason):
    reader = FolderReader(broken_folder / "train")
    index = next(i for i in range(len(reader)) if reader.read(i).name.endswith(name))
    with pytest.raises(DecodeError) as err:
        dataset(reader, on_error="raise")[(0, index)]
    assert err.value.name == str(broken_folder / "train" / "n00000001" / name)
    assert err.value.reason == reason


def test_a_file_deleted_after_listing_is_skipped_or_raised(image_folder):
    reader = FolderReader(image_folder / "train")
    gone = Path(reader.read(5).name)
    gone.unlink()
    item = dataset(reader)[(0, 5)]
    assert isinstance(item, Skipped) and item.name == str(gone) and item.reason.startswith("unreadable")
    with pytest.raises(DecodeError, match="unreadable"):
        dataset(reader, on_error="raise")[(0, 5)]


def test_labels_out_of_range_and_missing_images_are_skipped():
    data = helpers.jpeg_bytes(0, 0)
    reader = ListReader(
        [
            Sample(data, 0, "ok"),
            Sample(data, 3, "too big"),
            Sample(data, -1, "no label"),
            Sample(None, 1, "no image"),
        ],
        classes=["a", "b", "c"],
    )
    items = [dataset(reader)[i] for i in range(4)]
    assert not isinstance(items[0], Skipped)
    assert items[1:] == [
        Skipped("too big", "label 3 out of range [0, 3)"),
        Skipped("no label", "label -1 out of range [0, 3)"),
        Skipped("no image", "row has no image"),
    ]
    with pytest.raises(DecodeError, match="label 3 out of range"):
        dataset(reader, on_error="raise")[1]


def test_dataset_checks_the_reader_interface():
    class NoRead:
        classes = ["a"]

        def __len__(self):
            return 1

    decoder = _SampleDecoder(val_transform(), 1, None, "skip", 0)
    with pytest.raises(TypeError, match="NoRead does not implement the Reader interface"):
        ImageDataset(NoRead(), decoder)
    with pytest.raises(TypeError, match="StreamReader"):
        StreamingImageDataset(ListReader([], ["a"]), decoder)


# --- collate ------------------------------------------------------------------------------


def test_collate_stacks_uint8_numpy_images():
    items = [(np.full((3, 4, 4), i, dtype=np.uint8), i) for i in range(3)]
    batch = collate(items)
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (3, 3, 4, 4)
    assert batch["images"][2].unique().tolist() == [2]
    assert batch["labels"].tolist() == [0, 1, 2] and batch["labels"].dtype == torch.int64
    assert batch["skipped"] == []


def test_collate_stacks_float_tensors_and_drops_skipped():
    items = [(torch.full((3, 4, 4), 0.5), 1), Skipped("bad.JPEG", "empty file"), (torch.zeros(3, 4, 4), 0)]
    batch = collate(items)
    assert batch["images"].dtype == torch.float32 and batch["images"].shape == (2, 3, 4, 4)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["skipped"] == ["bad.JPEG\tempty file"]


def test_collate_of_only_skipped_items_is_an_empty_batch():
    batch = collate([Skipped("a", "empty file"), Skipped("b", "truncated JPEG")])
    assert batch["images"].numel() == 0 and batch["labels"].numel() == 0
    assert batch["skipped"] == ["a\tempty file", "b\ttruncated JPEG"]


# --- streaming ----------------------------------------------------------------------------


def test_streaming_dataset_decodes_the_same_images(hf_parquet_dir, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)  # absent before datasets 3
    reader = HFStreamReader(str(hf_parquet_dir), "validation", rank=0, world_size=1, seed=0, shuffle=False)
    stream = StreamingImageDataset(reader, _SampleDecoder(val_transform(), 3, None, "skip", 0))
    stream.set_epoch(2)
    mapped = dataset(HFReader(str(hf_parquet_dir), "validation"), val_transform())
    streamed = list(stream)
    assert len(streamed) == 9
    for i, (image, label) in enumerate(streamed):
        expected, expected_label = mapped[(2, i)]
        assert label == expected_label and torch.equal(image, expected)


# --- transforms for the modern recipes: test size, TrivialAugment, policy errors -------------------


def transforms(aug: AugConfig, inp: InputConfig) -> tuple:
    from trainer.data.loader import create_transforms, resolve_input_config

    input_cfg = resolve_input_config(inp, "resnet50")
    return create_transforms(aug=aug, input_cfg=input_cfg, test_img_size=inp.test_img_size, normalize_on_device=True)


def test_test_img_size_sets_the_val_crop_apart_from_the_train_crop():
    inp = InputConfig(img_size=160, test_img_size=224, crop_pct=0.95)
    train, val = transforms(AugConfig(), inp)
    assert tuple(train.transforms[0].size) == (160, 160)
    crops = [t for t in val.transforms if type(t).__name__ == "CenterCrop"]
    assert tuple(crops[0].size) == (224, 224) and val.transforms[0].size in (int(224 / 0.95), [int(224 / 0.95)])


@pytest.mark.parametrize("policy", ["trivial", "ta_wide"])
def test_trivial_augment_follows_the_flip(policy):
    from torchvision.transforms import RandomHorizontalFlip, TrivialAugmentWide

    train, _ = transforms(AugConfig(auto_augment=policy), InputConfig(img_size=32))
    kinds = [type(t) for t in train.transforms]
    assert kinds.index(TrivialAugmentWide) == kinds.index(RandomHorizontalFlip) + 1


def test_an_unknown_augment_policy_is_a_config_error():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"^aug.auto_augment: 'bogus' is not a timm policy"):
        transforms(AugConfig(auto_augment="bogus"), InputConfig(img_size=32))


def test_repeated_copies_are_augmented_differently(tmp_path: Path):
    root = helpers.make_image_folder(tmp_path / "imagenet", classes=1, train_per_class=2)
    transform = create_transform(SIZE, is_training=True, use_prefetcher=True)
    dataset = ImageDataset(FolderReader(root / "train"), _SampleDecoder(transform, 1, None, "raise", seed=0))
    copies = [dataset[(0, 1, c)][0] for c in range(3)]
    assert not np.array_equal(np.asarray(copies[0]), np.asarray(copies[1])) and not np.array_equal(
        np.asarray(copies[1]), np.asarray(copies[2])
    )
    assert np.array_equal(np.asarray(dataset[(0, 1, 0)][0]), np.asarray(dataset[(0, 1)][0]))  # copy 0 is the plain key


@pytest.mark.parametrize("normalize_on_device", [True, False])
def test_trainer_transforms_end_in_a_tensor_on_every_timm(normalize_on_device):
    from PIL import Image

    from trainer.data.loader import create_transforms, resolve_input_config

    inp = InputConfig(img_size=SIZE)
    image = Image.new("RGB", (40, 30), (200, 30, 10))
    input_cfg = resolve_input_config(inp, "resnet50")
    on_device = normalize_on_device
    both = create_transforms(aug=AugConfig(), input_cfg=input_cfg, test_img_size=0, normalize_on_device=on_device)
    for transform in both:
        out = transform(image)
        assert isinstance(out, torch.Tensor) and out.shape == (3, SIZE, SIZE)
        assert out.dtype == (torch.uint8 if normalize_on_device else torch.float32)


def test_timm_to_numpy_ending_becomes_the_same_uint8_tensor():
    # timm before 1.0.16 ends its use_prefetcher pipelines in ToNumpy (trainer/data/loader.py)
    from PIL import Image
    from timm.data.transforms import MaybePILToTensor, ToNumpy
    from torchvision import transforms as T

    from trainer.data.loader import _uint8_tensor_output

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8))
    expected = ToNumpy()(image)
    transform = _uint8_tensor_output(T.Compose([T.CenterCrop(4), ToNumpy()]))
    assert type(transform.transforms[-1]) is MaybePILToTensor
    assert np.array_equal(transform(image).numpy(), ToNumpy()(T.CenterCrop(4)(image))) and expected.shape == (3, 6, 5)
