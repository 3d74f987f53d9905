"""Annotation loaders on every real annotation file, val carve-out, noise protocol, images, leakage check."""

import collections
import csv
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_data import LAYOUTS, synthetic_image, write_synthetic_dataset

from msa.data import (
    DEFAULT_VAL_FRACTION,
    AnnotationError,
    CaptionPairDataset,
    EpochSampler,
    ImageLoadError,
    add_caption_noise,
    build_augmentation,
    carve_val,
    check_images,
    collate_pairs,
    find_bad_images,
    find_shared_images,
    image_decode_problem,
    image_header_problem,
    load_annotations,
    load_caption_csv,
    load_image,
    load_nwpu_json,
)

# Real data is an extra layer on top of the synthetic datasets: the repository's sibling folder shared/data, or
# MSA_SHARED_DATA.
DATA = Path(os.environ.get("MSA_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
CAPTIONS = DATA / "rs_captions"
MINI = DATA / "rs_mini"
needs_captions = pytest.mark.skipif(
    not CAPTIONS.is_dir(), reason="real caption annotations (rs_captions) not available; set MSA_SHARED_DATA"
)
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason="real images (rs_mini) not available; set MSA_SHARED_DATA")


@needs_captions
@pytest.mark.parametrize(
    "name, filename, expected",
    [
        ("ucm", "dataset_ucm.json", {"train": (1680, 8400), "val": (210, 1050), "test": (210, 1050)}),
        ("sydney", "dataset_sydney.json", {"train": (497, 2485), "val": (58, 290), "test": (58, 290)}),
        ("rsicd", "dataset_rsicd.json", {"train": (8734, 43668), "val": (1094, 5469), "test": (1093, 5465)}),
        ("rsitmd", "dataset_rsitmd.json", {"train": (3432, 17160), "val": (859, 4295), "test": (452, 2260)}),
        ("nwpu", "nwpu_captions_test.csv", {"test": (3150, 15750)}),
    ],
)
def test_real_annotation_counts(name, filename, expected):
    annotations = load_annotations(name, annotations=CAPTIONS / filename, skip_bad=True)
    assert annotations.counts() == expected
    test = annotations.split("test")
    assert len(test.captions) == len(test.text_to_image) == expected["test"][1]
    per_image = collections.Counter(test.text_to_image)
    assert sorted(per_image) == list(range(expected["test"][0])) and set(per_image.values()) == {5}


@needs_captions
def test_rsicd_empty_captions_error_or_are_counted():
    # RSICD holds 3 empty sentences (2 train, 1 val): an error naming the image when train or val is used, counted
    # with skip_bad; the clean test split loads either way.
    strict = load_annotations("rsicd", annotations=CAPTIONS / "dataset_rsicd.json")
    with pytest.raises(AnnotationError, match="bridge_218.jpg"):
        strict.split("train")
    with pytest.raises(AnnotationError, match="bridge_59.jpg"):
        strict.split("val")
    assert strict.split("test").num_captions == 5465
    annotations = load_annotations("rsicd", annotations=CAPTIONS / "dataset_rsicd.json", skip_bad=True)
    assert annotations.skipped == {"empty_caption": 3}
    test = annotations.split("test")
    # Duplicate captions in RSICD test: ties in text->image ranking are real.
    assert len(set(test.captions)) < 3400


def test_missing_split_names_the_ones_present(synthetic_dataset):
    data = synthetic_dataset("nwpu_csv")
    annotations = load_annotations("nwpu", data.data_root)
    with pytest.raises(KeyError, match=r"splits present: \['test'\]"):
        annotations.split("train")


def _karpathy(tmp_path, records, name="dataset.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"dataset": "toy", "images": records}))
    return path


def _record(filename, split, captions):
    return {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}


def test_dataset_folder_layout_search(tmp_path):
    (tmp_path / "RSICD_images").mkdir()
    _karpathy(
        tmp_path,
        [_record("a.jpg", "train", ["one ."]), _record("b.jpg", "test", ["two", "  three  "])],
        "dataset_rsicd.json",
    )
    annotations = load_annotations("rsicd", tmp_path)
    assert annotations.image_root == tmp_path / "RSICD_images"
    test = annotations.split("test")
    assert test.captions == ["two", "three"] and test.image_paths == [tmp_path / "RSICD_images" / "b.jpg"]
    with pytest.raises(FileNotFoundError, match="dataset_RSITMD.json"):
        load_annotations("rsitmd", tmp_path / "RSICD_images")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_annotations("coco", tmp_path)


def test_tokens_used_when_raw_missing(tmp_path):
    path = _karpathy(tmp_path, [{"filename": "a.tif", "split": "restval", "sentences": [{"tokens": ["a", "b"]}]}])
    annotations = load_annotations("karpathy", annotations=path)
    assert annotations.images[0].captions == ["a b"] and annotations.images[0].split == "train"


def test_nwpu_json_layout(tmp_path):
    data = {
        "airplane": [
            {
                "filename": "airplane_001.jpg",
                "split": "train",
                "raw": "a plane .",
                "raw_1": "b",
                "raw_2": "c",
                "raw_3": "d",
                "raw_4": "e",
                "imgid": 0,
            },
            {
                "filename": "airplane_002.jpg",
                "split": "test",
                "raw": "x",
                "raw_1": "y",
                "raw_2": "z",
                "raw_3": "w",
                "raw_4": "v",
                "imgid": 1,
            },
        ],
        "beach": [
            {
                "filename": "beach_001.jpg",
                "split": "val",
                "raw": "sand",
                "raw_1": "sea",
                "raw_2": "",
                "raw_3": "s",
                "raw_4": "t",
                "imgid": 2,
            },
        ],
    }
    (tmp_path / "dataset_nwpu.json").write_text(json.dumps(data))
    (tmp_path / "images").mkdir()
    with pytest.raises(AnnotationError, match="beach/beach_001.jpg"):
        load_annotations("nwpu", tmp_path).split("val")
    annotations = load_annotations("nwpu", tmp_path, skip_bad=True)
    assert annotations.counts() == {"train": (1, 5), "val": (1, 4), "test": (1, 5)}
    assert annotations.images[0].captions == ["a plane .", "b", "c", "d", "e"]
    assert annotations.split("test").image_paths == [tmp_path / "images" / "airplane" / "airplane_002.jpg"]
    assert load_nwpu_json(tmp_path / "dataset_nwpu.json", skip_bad=True).skipped == {"empty_caption": 1}


def test_csv_groups_rows_and_split_from_name(tmp_path):
    path = tmp_path / "captions_val.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "title"])
        writer.writerows([["b.jpg", "b one"], ["a.jpg", "a one"], ["b.jpg", "b, two"]])
    annotations = load_caption_csv(path)
    split = annotations.split("val")
    assert [p.name for p in split.image_paths] == ["b.jpg", "a.jpg"]
    assert split.captions == ["b one", "b, two", "a one"] and split.text_to_image == [0, 0, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\na,b\n")
    with pytest.raises(AnnotationError, match="filename,title"):
        load_caption_csv(bad)


def test_val_carve_out_is_seeded_by_image_and_keeps_test(tmp_path):
    records = [_record(f"{i}.jpg", "train", [f"c{i}"]) for i in range(50)] + [_record("t.jpg", "test", ["t"])]
    annotations = load_annotations("karpathy", annotations=_karpathy(tmp_path, records))
    carved = carve_val(annotations, fraction=0.2, seed=3)
    assert carved.counts() == {"train": (40, 40), "val": (10, 10), "test": (1, 1)}
    # Independent of record order, reproducible, seed-dependent.
    shuffled = load_annotations("karpathy", annotations=_karpathy(tmp_path, records[::-1], "rev.json"))
    val = {r.filename for r in carved.images if r.split == "val"}
    assert val == {r.filename for r in carve_val(shuffled, 0.2, seed=3).images if r.split == "val"}
    assert val != {r.filename for r in carve_val(annotations, 0.2, seed=4).images if r.split == "val"}
    # The input is not modified; a dataset with val is returned as is.
    assert annotations.counts()["train"] == (50, 50)
    assert carve_val(carved, 0.5) is carved


@needs_captions
def test_carve_out_on_rsitmd_as_distributed():
    annotations = load_annotations("rsitmd", annotations=CAPTIONS / "dataset_rsitmd.json")
    for record in annotations.images:
        if record.split == "val":
            record.split = "train"  # the distributed file: train 4291 / test 452
    carved = carve_val(annotations, fraction=0.2, seed=0)
    counts = carved.counts()
    assert counts["val"][0] == round(0.2 * 4291) and counts["train"][0] == 4291 - counts["val"][0]
    assert counts["test"] == (452, 2260)


def _check_noise_protocol(train, ratio):
    noisy, drawn = add_caption_noise(train, ratio, seed=0)
    assert sum(drawn) == round(ratio * train.num_captions)
    assert noisy.text_to_image == train.text_to_image and noisy.image_paths == train.image_paths
    # Rows not drawn are untouched; the drawn rows' captions are a permutation of their original captions.
    assert all(n == c for n, c, d in zip(noisy.captions, train.captions, drawn) if not d)
    assert collections.Counter(c for c, d in zip(noisy.captions, drawn) if d) == collections.Counter(
        c for c, d in zip(train.captions, drawn) if d
    )
    changed = sum(n != c for n, c in zip(noisy.captions, train.captions))
    assert changed > 0.9 * sum(drawn)  # almost all drawn rows now carry another image's caption
    again, drawn_again = add_caption_noise(train, ratio, seed=0)
    assert again.captions == noisy.captions and drawn_again == drawn
    assert add_caption_noise(train, ratio, seed=1)[0].captions != noisy.captions


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6, 0.8])
def test_noise_protocol_counts(synthetic_dataset, ratio):
    data = synthetic_dataset("rsitmd", num_images=100)
    train = load_annotations("rsitmd", data.data_root).split("train")
    assert train.num_captions == 400  # train 80 images, test 20
    _check_noise_protocol(train, ratio)


@needs_captions
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6, 0.8])
def test_noise_protocol_counts_on_rsitmd(ratio):
    train = load_annotations("rsitmd", annotations=CAPTIONS / "dataset_rsitmd.json").split("train")
    assert train.num_captions == 17160
    _check_noise_protocol(train, ratio)


def test_images_load_and_transform(synthetic_dataset):
    from torchvision import transforms

    data = synthetic_dataset("ucm", num_images=15)
    split = check_images(load_annotations("ucm", data.data_root).split("train"), decode=True)
    assert split.num_images == 9 and split.num_captions == 45
    image = load_image(split.image_paths[0])
    assert image.mode == "RGB" and image.size == (64, 64)
    transform = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor()])
    dataset = CaptionPairDataset(split, transform, build_augmentation(["flip", "rot90", "crop"]), seed=5)
    first = dataset[7]
    assert first[0].shape == (3, 64, 64) and first[1] == split.captions[7] and first[2] == 1
    # Augmentation depends on (seed, epoch, row) only, not on the global RNG state.
    torch.manual_seed(123)
    assert torch.equal(dataset[7][0], first[0])
    batch = collate_pairs([dataset[0], dataset[5], dataset[6]])
    assert batch["images"].shape == (3, 3, 64, 64) and batch["image_ids"].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_augmentation(["mixup"])


@needs_mini
@pytest.mark.parametrize(
    "folder, count, size", [("ucm", 9, (256, 256)), ("sydney", 9, (500, 500)), ("rsicd", 22, None)]
)
def test_real_images_decode(folder, count, size):
    annotations = load_annotations("karpathy", annotations=MINI / folder / "dataset.json")
    split = check_images(annotations.split("train"), decode=True)
    assert split.num_images == count and split.num_captions == 5 * count
    image = load_image(split.image_paths[0])
    assert image.mode == "RGB" and (size is None or image.size == size)


def test_bad_images_error_or_skip(tmp_path):
    synthetic_image(0)[0].save(tmp_path / "good.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    records = [
        _record("good.jpg", "train", ["a", "b"]),
        _record("broken.jpg", "train", ["c"]),
        _record("missing.jpg", "train", ["d", "e"]),
    ]
    split = load_annotations("karpathy", annotations=_karpathy(tmp_path, records)).split("train")
    with pytest.raises(ImageLoadError, match="2 bad image.*broken.jpg.*missing.jpg"):
        check_images(split)
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        check_images(split, skip_bad=False, decode=True)
    kept = check_images(split, skip_bad=True, decode=True)
    assert [p.name for p in kept.image_paths] == ["good.jpg"] and kept.captions == ["a", "b"]
    assert kept.text_to_image == [0, 0]
    assert kept.skipped == {"bad_image": 2, "caption_of_bad_image": 3}


def test_leakage_check_finds_identical_files(tmp_path, synthetic_dataset):
    data = synthetic_dataset("rsicd")
    rsicd = load_annotations("rsicd", data.data_root)
    # A second "dataset" whose test split holds a renamed copy of an RSICD train image.
    copied = data.filenames["train"][1]
    shutil.copy(data.image_root / copied, tmp_path / "renamed.jpg")
    synthetic_image(0, seed=99)[0].save(tmp_path / "other.tif")
    records = [_record("renamed.jpg", "test", ["x"]), _record("other.tif", "train", ["y"])]
    other = load_annotations("karpathy", annotations=_karpathy(tmp_path, records))
    report = find_shared_images(rsicd, other)
    assert report.counts[("train", "test")] == 1 and sum(report.counts.values()) == 1
    assert set(report.counts) == {(a, b) for a in ("train", "val", "test") for b in ("train", "test")}
    assert report.shared[("train", "test")][0][:2] == (copied, "renamed.jpg")
    assert "| train | test | 1 |" in report.to_markdown()
    assert find_shared_images(rsicd).counts == {("test", "train"): 0, ("test", "val"): 0, ("train", "val"): 0}
    assert find_shared_images(other, splits_a=["test"]).counts == {}  # one split only: nothing to compare


def test_epoch_sampler_resume_and_shards():
    sampler = EpochSampler(23, batch_size=4, seed=7)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(full) == 20 and len(set(full)) == 20 and sampler.batches_per_epoch() == 5
    sampler.set_epoch(2, start_batch=3)
    assert list(sampler) == full[12:]
    sampler.set_epoch(3)
    assert list(sampler) != full
    shards = [EpochSampler(23, batch_size=4, seed=7, rank=r, world_size=2) for r in range(2)]
    for shard in shards:
        shard.set_epoch(2)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == 8 and not set(a) & set(b)


def test_msa_data_cli_leakage_and_stats(tmp_path, capsys, synthetic_dataset):
    from msa.cli import main

    sydney = synthetic_dataset("sydney")
    copied = sydney.filenames["train"][2]
    shutil.copy(sydney.image_root / copied, tmp_path / "copy.tif")
    _karpathy(tmp_path, [_record("copy.tif", "test", ["a copy"])])
    main(
        ["leakage", "--dataset", "sydney", "--data-root", str(sydney.data_root), "--other-dataset", "karpathy",
         "--other-annotations", str(tmp_path / "dataset.json"), "--list", "--no-progress",
         "--output-json", str(tmp_path / "leak.json")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "| train | test | 1 |" in out and copied in out and "copy.tif" in out
    report = json.loads((tmp_path / "leak.json").read_text())
    assert report["shared"][0]["file_a"] == copied and sum(c["shared"] for c in report["counts"]) == 1
    ucm = synthetic_dataset("ucm", num_images=15)
    main(["stats", "--dataset", "ucm", "--annotations", str(ucm.annotations)])
    assert "| train | 9 | 45 |" in capsys.readouterr().out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_synthetic_datasets_load_in_every_layout(synthetic_dataset, layout):
    data = synthetic_dataset(layout, num_images=12)
    explicit = load_annotations(data.dataset, annotations=data.annotations, image_root=data.image_root)
    assert explicit.counts() == data.counts
    if data.dataset not in ("karpathy", "csv"):
        searched = load_annotations(data.dataset, data.data_root)
        assert searched.counts() == data.counts and searched.image_root == data.image_root
    for split, filenames in data.filenames.items():
        loaded = check_images(explicit.split(split), decode=True)
        assert loaded.image_paths == [data.image_root / f for f in filenames]
        assert loaded.num_captions == data.counts[split][1]
    if layout == "rsitmd":
        assert "val" not in data.counts
    sizes = {load_image(p).size for split in data.counts for p in explicit.split(split).image_paths}
    assert len(sizes) == 3


def test_synthetic_dataset_is_seeded(tmp_path):
    first = write_synthetic_dataset(tmp_path / "a", "karpathy", num_images=6, seed=3)
    again = write_synthetic_dataset(tmp_path / "b", "karpathy", num_images=6, seed=3)
    other = write_synthetic_dataset(tmp_path / "c", "karpathy", num_images=6, seed=4)
    assert first.annotations.read_bytes() == again.annotations.read_bytes()
    assert first.annotations.read_bytes() != other.annotations.read_bytes()
    name = first.filenames["train"][0]
    assert (first.image_root / name).read_bytes() == (again.image_root / name).read_bytes()


def _gradient(low: float, high: float, dtype) -> np.ndarray:
    return np.linspace(low, high, 24 * 16).reshape(16, 24).astype(dtype)


@pytest.mark.parametrize(
    "mode, values",
    [
        ("I;16", _gradient(1000, 4000, np.uint16)),  # 12-bit data in a 16-bit file, as many sensors write it
        ("I", _gradient(-70000, 90000, np.int32)),
        ("F", _gradient(-0.5, 2.5, np.float32)),
    ],
)
def test_high_bit_depth_images_are_stretched_by_their_range(tmp_path, mode, values):
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode == mode
    image = load_image(path)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and image.size == (24, 16)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    row = pixels[..., 0].ravel()
    assert row.min() == 0 and row.max() == 255 and (np.diff(row.astype(int)) >= 0).all()
    expected = np.rint((values.astype(np.float64) - values.min()) * 255 / (values.max() - values.min()))
    assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 1


def test_float_image_with_nan_and_constant_image(tmp_path):
    values = _gradient(0.0, 1.0, np.float32)
    values[0, 0] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    pixels = np.asarray(load_image(tmp_path / "nan.tif"))
    assert pixels[0, 0, 0] == 0 and pixels[..., 0].max() == 255
    Image.fromarray(np.full((8, 8), 700, np.uint16)).save(tmp_path / "flat.tif")
    assert not np.asarray(load_image(tmp_path / "flat.tif")).any()


def test_grayscale_rgba_palette_cmyk_load_as_rgb(tmp_path):
    rgb = synthetic_image(0, size=(32, 24))[0]
    cases = {
        "gray.png": rgb.convert("L"),
        "gray_alpha.png": rgb.convert("LA"),
        "bilevel.png": rgb.convert("1"),
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.tif": rgb.convert("CMYK"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "palette.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
    }
    transparent = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent.info["transparency"] = 0
    cases["palette_transparent.png"] = transparent
    for name, image in cases.items():
        image.save(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's "Palette images with Transparency" warning
        loaded = {name: load_image(tmp_path / name) for name in cases}
    for name, image in loaded.items():
        assert image.mode == "RGB" and image.size == (32, 24), name
    reference = np.asarray(rgb, dtype=int)
    assert np.array_equal(np.asarray(loaded["rgba.png"]), np.asarray(rgb))
    assert np.abs(np.asarray(loaded["cmyk.tif"], dtype=int) - reference).max() <= 2
    assert np.abs(np.asarray(loaded["palette.png"], dtype=int) - reference).mean() < 12
    gray = np.asarray(loaded["gray.png"])
    assert np.array_equal(gray[..., 0], np.asarray(rgb.convert("L"))) and (gray[..., 0] == gray[..., 2]).all()


@pytest.fixture
def small_pixel_limit(monkeypatch):
    """PIL's decompression-bomb limit lowered to 10,000 pixels (its hard limit to 20,000), so that small files play
    the part of huge scenes."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_scenes_above_the_pixel_limit_are_reduced_on_load(tmp_path, small_pixel_limit, suffix):
    path = tmp_path / f"scene{suffix}"
    synthetic_image(1, size=(160, 110))[0].save(path)  # 17,600 pixels: PIL would warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(path)
    assert image.mode == "RGB" and image.width * image.height <= 10_000
    assert image.size == (80, 55)  # the smallest integer factor, 2
    assert image_header_problem(path) is None


def test_scenes_above_the_hard_limit_are_named_and_counted(tmp_path, small_pixel_limit):
    synthetic_image(2, size=(150, 150))[0].save(tmp_path / "huge.png")  # 22,500 pixels > 2 x 10,000
    synthetic_image(3, size=(64, 64))[0].save(tmp_path / "fine.png")
    with pytest.raises(ImageLoadError, match="huge.png.*exceeds limit"):
        load_image(tmp_path / "huge.png")
    assert "exceeds limit" in image_header_problem(tmp_path / "huge.png")
    records = [_record("huge.png", "train", ["a", "b"]), _record("fine.png", "train", ["c"])]
    split = load_annotations("karpathy", annotations=_karpathy(tmp_path, records)).split("train")
    with pytest.raises(ImageLoadError, match="huge.png"):
        check_images(split)
    kept = check_images(split, skip_bad=True)
    assert [p.name for p in kept.image_paths] == ["fine.png"] and kept.skipped["bad_image"] == 1


def test_header_check_and_full_decode_name_bad_files(tmp_path):
    good = tmp_path / "good.jpg"
    synthetic_image(4, size=(64, 64))[0].save(good)
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "text.png").write_text("not an image")
    paths = [tmp_path / n for n in ("good.jpg", "truncated.jpg", "text.png", "missing.tif", "good.jpg")]
    header = find_bad_images(paths)
    assert list(header) == [tmp_path / "text.png", tmp_path / "missing.tif"]
    assert header[tmp_path / "missing.tif"] == "missing file" and "cannot identify" in header[tmp_path / "text.png"]
    decoded = find_bad_images(paths, decode=True)
    assert list(decoded) == [tmp_path / "truncated.jpg", tmp_path / "text.png", tmp_path / "missing.tif"]
    assert "truncated" in decoded[tmp_path / "truncated.jpg"]
    assert image_decode_problem(good) is None and image_header_problem(good) is None


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


KARPATHY_OK = json.dumps({"images": [_record("a.jpg", "train", ["one"]), _record("b.jpg", "test", ["two"])]})


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("dataset.json", b"", "dataset.json: empty file"),
        ("dataset.json", b"  \n", "dataset.json: empty file"),
        ("dataset.json", KARPATHY_OK[:50], "dataset.json: invalid JSON at line 1 column"),
        ("dataset.json", KARPATHY_OK.replace("one", "caf\xe9").encode("latin-1"), "dataset.json: not UTF-8 text"),
        ("dataset.json", KARPATHY_OK.encode("utf-16"), "dataset.json: not UTF-8 text"),
        ("dataset.json", json.dumps([1, 2]), "not a Karpathy-style JSON"),
        (
            "dataset.json",
            json.dumps(
                {"images": [_record("a.jpg", "train", ["x"]), {**_record("b.jpg", "test", []), "sentences": "b"}]}
            ),
            r"image record 1 \(b.jpg\): 'sentences' must be a list of sentence objects, got str",
        ),
        (
            "dataset.json",
            json.dumps({"images": [{**_record("a.jpg", "test", []), "sentences": None}]}),
            r"image record 0 \(a.jpg\): 'sentences' must be a list of sentence objects, got null",
        ),
        (
            "dataset.json",
            json.dumps({"images": [{"filename": "a.jpg", "sentences": ["a plane"]}]}),
            r"image record 0 \(a.jpg\): sentence 0 must be an object, got str",
        ),
        (
            "dataset.json",
            json.dumps({"images": [{"filename": "a.jpg", "sentences": [{"raw": 7}]}]}),
            r"image record 0 \(a.jpg\): sentence 0: 'raw' must be a string, got int",
        ),
        (
            "dataset.json",
            json.dumps({"images": [{"filename": 12, "sentences": [{"raw": "x"}]}]}),
            "image record 0: 'filename' must be a non-empty string, got 12",
        ),
        (
            "dataset.json",
            json.dumps({"images": [{"filename": "a.jpg"}]}),
            r"image record 0 \(a.jpg\): no 'sentences'",
        ),
        (
            "dataset_nwpu.json",
            json.dumps({"beach": [{"filename": "b.jpg", "raw": "sand", "raw_1": ["sea"]}]}),
            r"category 'beach' record 0 \(b.jpg\): 'raw_1' must be a string, got list",
        ),
        ("dataset_nwpu.json", json.dumps({"beach": {"filename": "b.jpg"}}), "category 'beach' must hold a list"),
        ("captions.csv", "filename,title\na.jpg,one\n,two\n", "captions.csv: line 3: a row needs a filename"),
        ("captions.csv", "filename,title\na.jpg,caf\xe9\n".encode("latin-1"), "captions.csv: not UTF-8 text"),
        ("captions.csv", b"", "captions.csv: empty file"),
    ],
)
def test_bad_annotation_files_are_named_in_one_line(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    dataset = {"dataset.json": "karpathy", "dataset_nwpu.json": "nwpu", "captions.csv": "csv"}[name]
    with pytest.raises(AnnotationError, match=message) as caught:
        load_annotations(dataset, annotations=path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_byte_order_mark_is_accepted(tmp_path):
    path = _write(tmp_path / "dataset.json", b"\xef\xbb\xbf" + KARPATHY_OK.encode())
    assert load_annotations("karpathy", annotations=path).counts() == {"train": (1, 1), "test": (1, 1)}
    csv_path = _write(tmp_path / "captions_val.csv", b"\xef\xbb\xbffilename,title\na.jpg,one\na.jpg,two\n")
    assert load_annotations("csv", annotations=csv_path).counts() == {"val": (1, 2)}


def test_json_format_is_told_by_structure_not_by_its_first_64_kib(tmp_path):
    # A Karpathy file whose "images" key comes after a long header field.
    records = [_record("a.jpg", "train", ["one"]), _record("b.jpg", "test", ["two"])]
    data = {"info": "x" * 70_000, "licenses": ["images are CC-BY"], "images": records}
    path = _write(tmp_path / "dataset_rsicd.json", json.dumps(data))
    assert '"images"' not in path.read_text()[:65536]
    for dataset in ("karpathy", "rsicd", "nwpu"):
        assert load_annotations(dataset, annotations=path).counts() == {"train": (1, 1), "test": (1, 1)}
    assert load_annotations("rsicd", tmp_path).counts() == {"train": (1, 1), "test": (1, 1)}
    nwpu = _write(tmp_path / "dataset_nwpu.json", json.dumps({"beach": [{"filename": "b.jpg", "raw": "sand"}]}))
    assert load_annotations("nwpu", annotations=nwpu).counts() == {"train": (1, 1)}
    with pytest.raises(AnnotationError, match="dataset_nwpu.json: not a Karpathy-style JSON"):
        load_annotations("karpathy", annotations=nwpu)


@pytest.mark.parametrize("split", ["Test", None, "validation", 3])
def test_unknown_split_name_is_an_error_listing_the_known_ones(tmp_path, split):
    records = [_record("a.jpg", "train", ["one"]), _record("b.jpg", split, ["two"])]
    path = _karpathy(tmp_path, records)
    with pytest.raises(
        AnnotationError, match=r"image record 1 \(b.jpg\): unknown split .*known splits: train, val, test"
    ):
        load_annotations("karpathy", annotations=path)
    nwpu = _write(tmp_path / "n.json", json.dumps({"beach": [{"filename": "b.jpg", "split": split, "raw": "sand"}]}))
    with pytest.raises(AnnotationError, match=r"category 'beach' record 0 \(b.jpg\): unknown split"):
        load_annotations("nwpu", annotations=nwpu)


def test_csv_split_must_be_known(tmp_path):
    path = _write(tmp_path / "captions.csv", "filename,title\na.jpg,one\n")
    with pytest.raises(AnnotationError, match="captions.csv: the CSV's split: unknown split 'Test'"):
        load_annotations("csv", annotations=path, csv_split="Test")


def test_repeated_images_and_images_in_several_splits_are_warned_with_counts(tmp_path, caplog):
    records = [
        _record("a.jpg", "train", ["a"]),
        _record("b.jpg", "train", ["b"]),
        _record("c.jpg", "test", ["c"]),
        _record("c.jpg", "test", ["c again"]),
        _record("c.jpg", "test", ["c thrice"]),
        _record("d.jpg", "test", ["d"]),
        _record("d.jpg", "test", ["d again"]),
        _record("a.jpg", "test", ["a in test"]),
        _record("b.jpg", "val", ["b in val"]),
    ]
    with caplog.at_level(logging.WARNING, logger="msa.data"):
        annotations = load_annotations("karpathy", annotations=_karpathy(tmp_path, records))
    assert annotations.repeated_within_splits() == {"test": {"c.jpg": 3, "d.jpg": 2}}
    assert annotations.images_in_several_splits() == {"a.jpg": ["train", "test"], "b.jpg": ["train", "val"]}
    messages = [r.getMessage() for r in caplog.records]
    assert any("3 repeated image listing(s) within a split {'test': 3}" in m for m in messages), messages
    assert any("2 image(s) listed in several splits {'train+test': 1, 'train+val': 1}" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="msa.data"):
        load_annotations("karpathy", annotations=_karpathy(tmp_path, records[:3], "clean.json"))
    assert not caplog.records


def test_leakage_reports_images_repeated_within_a_split(tmp_path, capsys):
    from msa.cli import main

    for index, name in enumerate(["a.png", "b.png", "c.png"]):
        synthetic_image(index)[0].save(tmp_path / name)
    shutil.copy(tmp_path / "b.png", tmp_path / "b_copy.png")
    records = [
        _record("a.png", "train", ["a"]),
        _record("a.png", "train", ["a listed twice"]),
        _record("b.png", "test", ["b"]),
        _record("b_copy.png", "test", ["b under another name"]),
        _record("c.png", "test", ["c"]),
    ]
    path = _karpathy(tmp_path, records)
    report = find_shared_images(load_annotations("karpathy", annotations=path))
    assert report.counts == {("test", "train"): 0}
    assert report.repeated == {("toy", "train"): [["a.png", "a.png"]], ("toy", "test"): [["b.png", "b_copy.png"]]}
    assert report.repeated_counts() == {("toy", "train"): 1, ("toy", "test"): 1}
    assert main(["leakage", "--dataset", "karpathy", "--annotations", str(path), "--no-progress", "--list"]) == 0
    out = capsys.readouterr().out
    assert "| toy | test | 1 |" in out and "| toy | train | 1 |" in out
    assert "repeated in toy test:\tb.png\tb_copy.png" in out


def test_msa_data_stats_carves_val_as_training_does(synthetic_dataset, capsys):
    from msa.cli import main
    from msa.train import TrainConfig

    assert TrainConfig().val_fraction == DEFAULT_VAL_FRACTION
    data = synthetic_dataset("rsitmd", num_images=30)  # train 24 / test 6, no val
    assert main(["stats", "--dataset", "rsitmd", "--data-root", str(data.data_root)]) == 0
    out = capsys.readouterr().out
    carved = round(DEFAULT_VAL_FRACTION * 24)
    assert f"| train | {24 - carved} |" in out and f"| val | {carved} |" in out and "val carved out" in out
    assert main(["stats", "--dataset", "rsitmd", "--data-root", str(data.data_root), "--val-fraction", "0"]) == 0
    assert "| train | 24 | 120 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["stats", "--dataset", "rsicd", "--data-root", "{missing}"], "rsicd: no annotation file in"),
        (["stats", "--dataset", "karpathy", "--annotations", "{bad}"], "bad.json: invalid JSON at line"),
        (["stats", "--dataset", "coco", "--data-root", "{root}"], "unknown dataset 'coco'"),
        (["stats", "--dataset", "karpathy", "--annotations", "{tiny}"], "too few to carve a val split.*0 for no"),
        (
            ["leakage", "--dataset", "rsicd", "--data-root", "{root}", "--splits", "Test"],
            r"--splits: no split \['Test'\]",
        ),
        (["stats", "--dataset", "karpathy", "--annotations", "{root}"], "Is a directory"),
    ],
)
def test_msa_data_user_errors_print_one_line_and_exit_2(tmp_path, capsys, synthetic_dataset, arguments, message):
    from msa.cli import main

    bad = _write(tmp_path / "bad.json", KARPATHY_OK[:40])
    tiny = _karpathy(tmp_path, [_record("a.jpg", "train", ["a"]), _record("b.jpg", "test", ["b"])], "tiny.json")
    places = {"missing": tmp_path / "nowhere", "bad": bad, "tiny": tiny, "root": synthetic_dataset("rsicd").data_root}
    argv = [a.format(**places) for a in arguments]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("msa-data: error: ") and err.count("\n") == 1 and re.search(message, err), err
    with pytest.raises((AnnotationError, OSError, ValueError, KeyError), match=message):
        main([*argv, "--debug"])


def test_records_without_a_split_are_train_with_a_warning(tmp_path, caplog):
    records = [{"filename": "a.jpg", "sentences": [{"raw": "one"}]}, _record("b.jpg", "test", ["two"])]
    with caplog.at_level(logging.WARNING, logger="msa.data"):
        annotations = load_annotations("karpathy", annotations=_karpathy(tmp_path, records))
    assert annotations.counts() == {"train": (1, 1), "test": (1, 1)}
    assert any("1 image record(s) without a 'split' field, read as train" in r.getMessage() for r in caplog.records)


def test_images_without_captions_error_or_are_counted(tmp_path):
    records = [
        _record("a.jpg", "test", ["one"]),
        _record("b.jpg", "test", []),
        _record("c.jpg", "test", ["", "  "]),
        _record("d.jpg", "train", ["four"]),
    ]
    path = _karpathy(tmp_path, records)
    strict = load_annotations("karpathy", annotations=path)
    with pytest.raises(AnnotationError, match=r"2 image\(s\) of split 'test' have an empty caption or none.*b.jpg"):
        strict.split("test")
    assert strict.split("train").captions == ["four"]
    lenient = load_annotations("karpathy", annotations=path, skip_bad=True)
    assert lenient.skipped == {"empty_caption": 2, "image_without_caption": 2}
    test = lenient.split("test")
    assert [p.name for p in test.image_paths] == ["a.jpg"] and test.text_to_image == [0]


def test_msa_data_check_lists_unreadable_images(tmp_path, capsys, synthetic_dataset):
    from msa.cli import main

    data = synthetic_dataset("rsicd")
    assert main(["check", "--dataset", "rsicd", "--data-root", str(data.data_root), "--no-progress"]) == 0
    assert "| test | 2 | 0 |" in capsys.readouterr().out
    root = tmp_path / "rsicd"
    shutil.copytree(data.data_root, root)
    truncated, removed = data.filenames["test"][0], data.filenames["train"][3]
    image = root / "RSICD_images" / truncated
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # header intact, pixels cut
    (root / "RSICD_images" / removed).unlink()
    argv = ["check", "--dataset", "rsicd", "--data-root", str(root), "--no-progress"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "| train | 6 | 1 |" in out and f"{removed}\tmissing file" in out and truncated not in out
    assert main([*argv, "--decode", "--splits", "test"]) == 1
    out = capsys.readouterr().out
    assert "| test | 2 | 1 |" in out and truncated in out and "train" not in out
