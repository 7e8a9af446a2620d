"""Tests for tfmir.data.datasets: readers, file checks, splits and class balancing."""

import csv
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tfmir.data import datasets
from tfmir.data.datasets import (
    Examples,
    concatenate,
    downsample_top_classes,
    find_unreadable,
    keep_single_label,
    load_csv_manifest,
    load_image_folder,
    load_medmnist,
    load_medmnist_npz,
    split_by_column,
    split_examples,
)

OFFICIAL_URL = "https://zenodo.org/records/10519652/files/{}?download=1"


def _in_memory(labels, sources="s", class_names=None, size=1):
    labels = np.asarray(labels)
    class_names = class_names or tuple(str(i) for i in range(int(labels.max()) + 1))
    return Examples(labels=labels, sources=sources,
                    ids=np.array([f"item{i}" for i in range(len(labels))]),
                    class_names=class_names,
                    images=np.zeros((len(labels), size, size, 3), np.uint8))


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def _csv_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# --- MedMNIST on real data ---------------------------------------------------------------------


def test_load_medmnist_npz_retina_official_splits(shared_data_dir):
    path = shared_data_dir / "retinamnist" / "retinamnist.npz"
    splits = load_medmnist_npz(path)
    assert {name: len(part) for name, part in splits.items()} == {
        "train": 1080, "val": 120, "test": 400}
    raw = np.load(path)
    train = splits["train"]
    assert train.images.shape == (1080, 28, 28, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images, raw["train_images"])
    assert train.labels.dtype == np.int64 and train.labels.shape == (1080,)
    # Per-grade counts from retinamnist/SOURCE.md.
    assert np.bincount(train.labels).tolist() == [486, 128, 206, 194, 66]
    assert np.bincount(splits["test"].labels).tolist() == [174, 46, 92, 68, 20]
    assert train.class_names == ("0", "1", "2", "3", "4")
    assert train.source_names == ("retinamnist",)
    assert train.ids[17] == "retinamnist/train/17"
    assert set(train.splits) == {"train"}
    assert train.in_memory and train.paths is None


def test_load_medmnist_npz_pneumonia_gray_to_rgb(shared_data_dir):
    path = shared_data_dir / "pneumoniamnist" / "pneumoniamnist.npz"
    splits = load_medmnist_npz(path, source="xray")
    assert [len(splits[name]) for name in ("train", "val", "test")] == [4708, 524, 624]
    raw = np.load(path)["val_images"]
    images = splits["val"].images
    assert raw.shape == (524, 28, 28) and images.shape == (524, 28, 28, 3)
    for channel in range(3):
        np.testing.assert_array_equal(images[..., channel], raw)
    assert splits["train"].class_names == ("normal", "pneumonia")
    assert np.bincount(splits["train"].labels).tolist() == [1214, 3494]
    assert splits["val"].source_names == ("xray",)


def test_load_medmnist_finds_file_in_named_subfolder(shared_data_dir, monkeypatch):
    splits = load_medmnist("retinamnist", data_dir=shared_data_dir)
    assert len(splits["val"]) == 120
    monkeypatch.setenv("TFMIR_DATA_DIR", str(shared_data_dir))
    assert len(load_medmnist("pneumoniamnist")["test"]) == 624


def test_md5_table_holds_the_published_checksums(shared_data_dir):
    assert datasets.MEDMNIST_MD5["retinamnist"][28] == "bd4c0672f1bba3e3a89f0e4e876791e4"
    assert datasets.MEDMNIST_MD5["pneumoniamnist"][28] == "28209eda62fecd6e6a2d98b1501bb15f"
    # The shared retinamnist.npz is the official file byte for byte (its SOURCE.md).
    official = shared_data_dir / "retinamnist" / "retinamnist.npz"
    assert _md5(official) == "bd4c0672f1bba3e3a89f0e4e876791e4"


def test_load_medmnist_npz_refuses_wrong_layout(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="train_images"):
        load_medmnist_npz(tmp_path / "bad.npz")
    arrays = {f"{split}_{kind}": (np.zeros((2, 4, 4), np.uint8) if kind == "images"
                                  else np.zeros((2, 3), np.uint8))
              for split in ("train", "val", "test") for kind in ("images", "labels")}
    np.savez(tmp_path / "multilabel.npz", **arrays)
    with pytest.raises(ValueError, match="multi-label"):
        load_medmnist_npz(tmp_path / "multilabel.npz")


def test_load_medmnist_npz_unknown_set_gets_numbered_class_names(tmp_path):
    arrays = {}
    for split, labels in (("train", [0, 3]), ("val", [1]), ("test", [2])):
        arrays[f"{split}_images"] = np.full((len(labels), 5, 5, 1), 7, np.uint8)
        arrays[f"{split}_labels"] = np.array(labels, np.uint8)[:, None]
    np.savez(tmp_path / "mysetmnist_64.npz", **arrays)
    splits = load_medmnist_npz(tmp_path / "mysetmnist_64.npz")
    assert splits["train"].class_names == ("0", "1", "2", "3")
    assert splits["train"].source_names == ("mysetmnist",)
    assert splits["train"].images.shape == (2, 5, 5, 3)


# --- MedMNIST download, without internet ----------------------------------------------------------


@pytest.fixture()
def fake_zenodo(tmp_path, monkeypatch):
    """A local folder served through a file:// URL in place of the Zenodo record."""
    server = tmp_path / "server"
    server.mkdir()
    monkeypatch.setattr(datasets, "MEDMNIST_URL", server.as_uri() + "/{file_name}")
    return server


def test_download_fetches_verifies_and_places_the_file(shared_data_dir, fake_zenodo, tmp_path):
    shutil.copy(shared_data_dir / "retinamnist" / "retinamnist.npz", fake_zenodo)
    cache = tmp_path / "cache"
    splits = load_medmnist("retinamnist", data_dir=cache, download=True)
    assert len(splits["train"]) == 1080
    assert sorted(os.listdir(cache)) == ["retinamnist.npz"]  # no temporary file left behind
    assert _md5(cache / "retinamnist.npz") == "bd4c0672f1bba3e3a89f0e4e876791e4"


def test_download_with_wrong_checksum_is_refused_and_deleted(fake_zenodo, tmp_path):
    (fake_zenodo / "retinamnist.npz").write_bytes(b"this is not the official file")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="MD5.*bd4c0672f1bba3e3a89f0e4e876791e4"):
        load_medmnist("retinamnist", data_dir=cache, download=True)
    assert os.listdir(cache) == []


def test_offline_download_names_file_folder_and_url(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError) as error:
        load_medmnist("pneumoniamnist", data_dir=cache, download=True)
    message = str(error.value)
    assert "pneumoniamnist.npz" in message and str(cache) in message
    assert OFFICIAL_URL.format("pneumoniamnist.npz") in message
    assert not list(cache.iterdir())


def test_missing_file_without_download(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_medmnist("retinamnist", data_dir=tmp_path, size=64)
    message = str(error.value)
    assert "retinamnist_64.npz" in message and str(tmp_path) in message
    assert OFFICIAL_URL.format("retinamnist_64.npz") in message
    with pytest.raises(ValueError, match="size must be one of"):
        load_medmnist("retinamnist", data_dir=tmp_path, size=32)
    with pytest.raises(FileNotFoundError, match="not a known 2D MedMNIST"):
        load_medmnist("nosuchmnist", data_dir=tmp_path, download=True)


# --- Files on disk -------------------------------------------------------------------------------


@pytest.fixture()
def real_jpegs(shared_data_dir):
    """A few real dermoscopy JPEGs: {class name: [paths]} from PH2 and HAM10000."""
    ph2 = _csv_rows(shared_data_dir / "ph2" / "labels.csv")
    ham = _csv_rows(shared_data_dir / "ham10000_subset" / "labels.csv")
    pick = lambda rows, column, value, root: [  # noqa: E731
        shared_data_dir / root / row["image"] for row in rows if row[column] == value][:2]
    return {
        "melanoma": pick(ph2, "diagnosis_name", "melanoma", "ph2"),
        "common_nevus": pick(ph2, "diagnosis_name", "common_nevus", "ph2"),
        "vasc": pick(ham, "dx", "vasc", "ham10000_subset"),
    }


def _build_folder(root, real_jpegs):
    for class_name, paths in real_jpegs.items():
        (root / class_name).mkdir(parents=True)
        for path in paths:
            shutil.copy(path, root / class_name / path.name)
    truncated = real_jpegs["melanoma"][0].read_bytes()
    (root / "melanoma" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    (root / "common_nevus" / "empty.png").write_bytes(b"")
    (root / "vasc" / "notes.png").write_text("a text file renamed .png\n")
    (root / "vasc" / "readme.txt").write_text("ignored: not an image extension\n")


def test_load_image_folder_skips_and_counts_bad_files(tmp_path, real_jpegs, caplog):
    root = tmp_path / "derm"
    _build_folder(root, real_jpegs)
    with caplog.at_level(logging.WARNING):
        examples = load_image_folder(root)
    assert examples.class_names == ("common_nevus", "melanoma", "vasc")
    assert len(examples) == 6
    assert np.bincount(examples.labels).tolist() == [2, 2, 2]
    assert examples.source_names == ("derm",)
    expected_ids = sorted(f"{name}/{path.name}" for name, paths in real_jpegs.items()
                          for path in paths)
    assert sorted(examples.ids) == expected_ids
    assert all(os.path.isabs(path) and os.path.isfile(path) for path in examples.paths)
    for bad in ("truncated.jpg", "empty.png", "notes.png"):
        assert sum(bad in line for line in caplog.messages) == 1
    assert f"skipped 3 of 9 files under {root}: not readable images" in caplog.messages


def test_load_image_folder_strict_names_the_first_bad_file(tmp_path, real_jpegs):
    root = tmp_path / "derm"
    _build_folder(root, real_jpegs)
    with pytest.raises(ValueError, match="empty.png.*empty file"):
        load_image_folder(root, strict=True, source="skin")


def test_load_image_folder_accepts_16_bit_png(tmp_path):
    (tmp_path / "xray" / "normal").mkdir(parents=True)
    pixels = np.tile(np.array([[0, 1000], [40000, 65535]], np.uint16), (4, 4))  # 8 x 8
    Image.fromarray(pixels).save(tmp_path / "xray" / "normal" / "a.png")
    examples = load_image_folder(tmp_path / "xray", source="xray")
    assert examples.ids.tolist() == ["normal/a.png"]


def test_load_image_folder_errors_name_the_root(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}.*sub-folder per class"):
        load_image_folder(tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="Found 1 image files directly"):
        load_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")


def test_find_unreadable_reports_each_bad_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("hello")
    reasons = dict(find_unreadable([good, empty, text, tmp_path / "missing.png"]))
    assert list(reasons) == [str(empty), str(text), str(tmp_path / "missing.png")]
    assert reasons[str(empty)] == "an empty file"
    assert reasons[str(tmp_path / "missing.png")] == "file not found"
    assert reasons[str(text)].startswith("not in a known image format")


def test_find_unreadable_refuses_bombs_and_tiny_images_from_the_header(tmp_path, monkeypatch):
    # Issue 11, finding 3: a 64-megapixel PNG of a few KB and a JPEG whose header claims
    # 8000 x 8000 were decoded (GBs of memory, crashes); a 1 x 1 image got a confident answer.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8000, 8000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    jpeg = tmp_path / "claims_8000.jpg"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(jpeg, quality=90)
    data = bytearray(jpeg.read_bytes())
    sof = data.index(b"\xff\xc0")  # baseline start of frame: length, precision, height, width
    data[sof + 5:sof + 9] = (8000).to_bytes(2, "big") * 2
    jpeg.write_bytes(bytes(data))
    tiny = tmp_path / "one_pixel.png"
    Image.new("RGB", (1, 1)).save(tiny)
    smallest = tmp_path / "eight.png"
    Image.new("RGB", (8, 8)).save(smallest)

    decoded = []
    original_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or
                        original_load(self))
    reasons = dict(find_unreadable([bomb, jpeg, tiny, smallest]))
    assert reasons == {
        str(bomb): "8000 × 8000 = 64000000 pixels, more than max_image_pixels=50000000",
        str(jpeg): "8000 × 8000 = 64000000 pixels, more than max_image_pixels=50000000",
        str(tiny): "1 × 1 pixels, a side shorter than the minimum of 8"}
    assert (8000, 8000) not in decoded  # refused from the header, never decoded
    assert find_unreadable([smallest], max_image_pixels=63) == [
        (str(smallest), "8 × 8 = 64 pixels, more than max_image_pixels=63")]


def test_csv_manifest_string_labels_masks_splits(tmp_path, shared_data_dir):
    rows = _csv_rows(shared_data_dir / "ph2" / "labels.csv")
    chosen = [row for row in rows if row["diagnosis_name"] == "melanoma"][:2] + \
             [row for row in rows if row["diagnosis_name"] == "atypical_nevus"][:2]
    data = tmp_path / "ph2"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
    with open(data / "manifest.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "mask", "split", "comment"])
        for number, row in enumerate(chosen):
            shutil.copy(shared_data_dir / "ph2" / row["image"], data / row["image"])
            shutil.copy(shared_data_dir / "ph2" / row["mask"], data / row["mask"])
            writer.writerow([row["image"], row["diagnosis_name"], row["mask"],
                             "train" if number % 2 == 0 else "test", "ignored"])
    examples = load_csv_manifest(data / "manifest.csv", source="ph2")
    assert examples.class_names == ("atypical_nevus", "melanoma")
    assert examples.labels.tolist() == [1, 1, 0, 0]
    assert examples.ids.tolist() == [row["image"] for row in chosen]
    assert examples.paths.tolist() == [str(data / row["image"]) for row in chosen]
    assert examples.mask_paths.tolist() == [str(data / row["mask"]) for row in chosen]
    assert examples.source_names == ("ph2",)
    parts = split_by_column(examples)
    assert list(parts) == ["train", "test"]
    assert parts["train"].ids.tolist() == [chosen[0]["image"], chosen[2]["image"]]


def test_csv_manifest_integer_labels_root_and_bad_rows(tmp_path, real_jpegs, caplog):
    images = tmp_path / "archive"
    images.mkdir()
    names = []
    for paths in real_jpegs.values():
        shutil.copy(paths[0], images / paths[0].name)
        names.append(paths[0].name)
    (images / "broken.png").write_text("not an image")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    lines = ["path,label,source", f"{names[0]},0,derm", f"{names[1]},2,", f"{names[2]},2,derm",
             "broken.png,1,derm"]
    (manifests / "list.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        examples = load_csv_manifest(manifests / "list.csv", root=images)
    assert examples.class_names == ("0", "1", "2")
    assert examples.labels.tolist() == [0, 2, 2]
    assert examples.sources.tolist() == ["derm", "manifests", "derm"]
    assert examples.splits is None and examples.mask_paths is None
    assert any("broken.png" in message for message in caplog.messages)
    assert any("skipped 1 of 4 files" in message for message in caplog.messages)
    with pytest.raises(ValueError, match="broken.png"):
        load_csv_manifest(manifests / "list.csv", root=images, strict=True)


def test_csv_manifest_missing_column_names_column_file_and_found(shared_data_dir, tmp_path):
    # The HAM10000 labels file calls its path column "image", not "path".
    labels_csv = shared_data_dir / "ham10000_subset" / "labels.csv"
    with pytest.raises(ValueError) as error:
        load_csv_manifest(labels_csv)
    message = str(error.value)
    assert "'path'" in message and str(labels_csv) in message and "'image'" in message
    (tmp_path / "no_label.csv").write_text("path,dx\na.png,nv\n")
    with pytest.raises(ValueError, match="no_label.csv has no 'label' column.*'dx'"):
        load_csv_manifest(tmp_path / "no_label.csv")


def test_csv_manifest_reads_other_column_names(tmp_path, real_jpegs):
    # HAM10000's layout: image paths in "image", class names in "dx", a "label" column of ints
    # and a "source" column that the mapping replaces.
    names = []
    for paths in real_jpegs.values():
        shutil.copy(paths[0], tmp_path / paths[0].name)
        names.append(paths[0].name)
    lines = ["image_id,image,label,dx,split,source", f"a,{names[0]},5,nv,train,HAM10000",
             f"b,{names[1]},4,mel,train,HAM10000", f"c,{names[2]},5,nv,test,HAM10000"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    examples = load_csv_manifest(tmp_path / "labels.csv", source="skin",
                                 columns={"path": "image", "label": "dx", "source": None})
    assert examples.class_names == ("mel", "nv")  # names sorted, then numbered
    assert examples.labels.tolist() == [1, 0, 1]
    assert examples.sources.tolist() == ["skin"] * 3
    assert examples.splits.tolist() == ["train", "train", "test"]
    assert examples.ids.tolist() == names
    with pytest.raises(ValueError, match=r"columns keys must be among path, label, source, mask, "
                                         r"split. Received: columns=\{'id': 'image_id'\}"):
        load_csv_manifest(tmp_path / "labels.csv", columns={"id": "image_id"})


# --- Examples and concatenate -----------------------------------------------------------------


def test_examples_validation():
    images = np.zeros((2, 3, 3, 3), np.uint8)
    common = dict(labels=[0, 1], sources="s", ids=["a", "b"], class_names=("x", "y"))
    with pytest.raises(ValueError, match="exactly one of"):
        Examples(**common)
    with pytest.raises(ValueError, match="exactly one of"):
        Examples(**common, images=images, paths=["p", "q"])
    with pytest.raises(ValueError, match="ids of length 3"):
        Examples(**{**common, "ids": ["a", "b", "c"]}, images=images)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        Examples(**{**common, "labels": [0, 2]}, images=images)
    with pytest.raises(ValueError, match="unique"):
        Examples(**{**common, "ids": ["a", "a"]}, images=images)
    with pytest.raises(ValueError, match="uint8"):
        Examples(**common, images=images.astype(np.float32))


def test_subset_keeps_order_and_source_names_are_sorted():
    examples = _in_memory([0, 1, 2, 1], sources=np.array(["b", "a", "b", "c"], dtype=object))
    part = examples.subset([3, 0])
    assert part.ids.tolist() == ["item3", "item0"] and part.labels.tolist() == [1, 0]
    assert part.class_names == examples.class_names
    assert examples.source_names == ("a", "b", "c")
    assert examples.subset(examples.labels == 1).ids.tolist() == ["item1", "item3"]


def test_concatenate_separates_classes_of_sources():
    retina = _in_memory([0, 1, 1], sources="retina", class_names=("g0", "g1"))
    xray = _in_memory([1, 0], sources="xray", class_names=("normal", "pneumonia"))
    joined = concatenate([retina, xray])
    assert joined.class_names == ("retina/g0", "retina/g1", "xray/normal", "xray/pneumonia")
    assert joined.labels.tolist() == [0, 1, 1, 3, 2]
    # Ids collided ("item0" in both), so they are made unique with the source.
    assert joined.ids.tolist() == ["retina/item0", "retina/item1", "retina/item2", "xray/item0",
                                   "xray/item1"]
    merged = concatenate([retina, _in_memory([0], sources="r2", class_names=("g1",))],
                         separate_classes=False)
    assert merged.class_names == ("g0", "g1") and merged.labels.tolist() == [0, 1, 1, 1]


def test_concatenate_refuses_mixed_storage_and_sizes():
    memory = _in_memory([0], sources="a")
    disk = Examples(labels=[0], sources="b", ids=["x"], class_names=("0",), paths=["/x.png"])
    with pytest.raises(ValueError, match=r"part 0 \(a\) in memory.*part 1 \(b\) on disk"):
        concatenate([memory, disk])
    with pytest.raises(ValueError, match=r"equal height and width.*\(1, 1\).*\(2, 2\)"):
        concatenate([memory, _in_memory([0], sources="c", size=2)])
    with pytest.raises(ValueError, match="both hold source 'a'"):
        concatenate([memory, memory])


def _with_masks(examples):
    """`examples` with mask i filled with the value i (so subsets and joins can be traced)."""
    height, width = examples.images.shape[1:3]
    masks = np.broadcast_to(np.arange(len(examples), dtype=np.uint8)[:, None, None],
                            (len(examples), height, width)).copy()
    return dataclasses.replace(examples, masks=masks)


def test_in_memory_masks_are_validated():
    examples = _in_memory([0, 1], size=3)
    assert examples.masks is None
    masked = _with_masks(examples)
    assert masked.masks.shape == (2, 3, 3) and masked.masks.dtype == np.uint8
    with pytest.raises(ValueError, match=re.escape(
            "masks must be uint8 of shape (2, 3, 3) (N, H, W), like images. "
            "Received dtype uint8 and shape (2, 3, 4)")):
        dataclasses.replace(examples, masks=np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match=re.escape(
            "masks must be uint8 of shape (2, 3, 3) (N, H, W), like images. "
            "Received dtype bool and shape (2, 3, 3)")):
        dataclasses.replace(examples, masks=np.zeros((2, 3, 3), bool))
    with pytest.raises(ValueError, match=re.escape(
            "masks (in memory) need images in memory; give masks of images on disk as "
            "mask_paths. Received masks with paths")):
        Examples(labels=[0], sources="s", ids=["a"], class_names=("0",), paths=["/a.png"],
                 masks=np.zeros((1, 3, 3), np.uint8))


def test_subset_and_concatenate_keep_masks():
    retina = _with_masks(_in_memory([0, 1, 1], sources="retina", size=2))
    assert retina.subset([2, 0]).masks[:, 0, 0].tolist() == [2, 0]
    xray = _with_masks(_in_memory([1, 0], sources="xray", size=2))
    joined = concatenate([retina, xray])
    assert joined.masks.shape == (5, 2, 2)
    assert joined.masks[:, 0, 0].tolist() == [0, 1, 2, 0, 1]
    assert concatenate([_in_memory([0], sources="a"), _in_memory([0], sources="b")]).masks is None
    with pytest.raises(ValueError, match=re.escape(
            "some parts have masks and others not (without masks: part 1 (xray)). Give every "
            "part masks, or drop them with dataclasses.replace(part, masks=None)")):
        concatenate([retina, _in_memory([1, 0], sources="xray", size=2)])


# --- Splits and class balance -----------------------------------------------------------------


def _stratified_fixture():
    labels = np.array([0] * 40 + [1] * 13 + [2] * 7 + [0] * 9 + [1] * 6)
    sources = np.array(["derm"] * 60 + ["xray"] * 15)
    return _in_memory(labels, sources=sources)


def test_split_examples_honours_ratios_per_class():
    examples = _stratified_fixture()
    parts = split_examples(examples, (2, 1, 1), seed=3)
    assert list(parts) == ["train", "val", "test"]
    all_ids = np.concatenate([part.ids for part in parts.values()])
    assert sorted(all_ids) == sorted(examples.ids)  # complete and disjoint
    for source in ("derm", "xray"):
        for label in range(3):
            group = np.sum((examples.sources == source) & (examples.labels == label))
            for name, share in (("train", 0.5), ("val", 0.25), ("test", 0.25)):
                part = parts[name]
                count = np.sum((part.sources == source) & (part.labels == label))
                assert abs(count - group * share) <= 1, (source, label, name, count, group)
    for part in parts.values():  # items keep their original relative order
        positions = [int(item[len("item"):]) for item in part.ids]
        assert positions == sorted(positions)


def test_split_examples_is_deterministic_for_a_seed():
    examples = _stratified_fixture()
    first = split_examples(examples, seed=7)
    again = split_examples(examples, seed=7)
    other = split_examples(examples, seed=8)
    assert all(first[name].ids.tolist() == again[name].ids.tolist() for name in first)
    assert any(first[name].ids.tolist() != other[name].ids.tolist() for name in first)
    unstratified = split_examples(examples, (3, 1), stratify=False, names=("train", "test"))
    assert [len(part) for part in unstratified.values()] == [56, 19]


def test_split_examples_refuses_empty_split():
    with pytest.raises(ValueError, match="split 'test' would be empty"):
        split_examples(_in_memory([0, 1]), (2, 1, 1), stratify=False)
    with pytest.raises(ValueError, match="same length"):
        split_examples(_in_memory([0, 1]), (1, 1), names=("a", "b", "c"))


def test_split_by_column_needs_splits():
    with pytest.raises(ValueError, match="no split column"):
        split_by_column(_in_memory([0, 1]))


def test_downsample_top_classes_equalises_the_top_classes():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20 + [3] * 5)
    rng = np.random.default_rng(0)
    shuffled = labels[rng.permutation(len(labels))]
    kept = downsample_top_classes(shuffled, 3, seed=1)
    assert np.all(np.diff(kept) > 0)
    assert np.bincount(shuffled[kept]).tolist() == [20, 20, 20, 5]
    kept_two = downsample_top_classes(shuffled, 2)
    assert np.bincount(shuffled[kept_two]).tolist() == [30, 30, 20, 5]
    assert downsample_top_classes(shuffled, 1).tolist() == list(range(len(labels)))
    assert downsample_top_classes(shuffled, 3, seed=1).tolist() == kept.tolist()
    assert downsample_top_classes(shuffled, 3, seed=2).tolist() != kept.tolist()
    with pytest.raises(ValueError, match="num_equalized"):
        downsample_top_classes(shuffled, 5)


def test_keep_single_label():
    labels = ["Mass", "Effusion|Mass", "No Finding", "", "Nodule"]
    assert keep_single_label(labels).tolist() == [0, 2, 4]
