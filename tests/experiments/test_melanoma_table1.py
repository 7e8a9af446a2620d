"""End-to-end smoke run of experiments/melanoma_table1.py on the real data (small subsets)."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.experiments import run_smoke

MEASURES = ("euclidean", "cosine", "style", "I1_ED", "I1_CD", "I1_ECD", "I1_SE", "I1_SC", "I1_SD")


def _need_data(shared_data_dir):
    for folder in ("ham10000_subset", "ph2", "drive"):
        if not (shared_data_dir / folder).exists():
            pytest.skip(f"{folder} is not in the real data folder {shared_data_dir}")


def test_smoke_run_writes_table1(tmp_path, shared_data_dir):
    _need_data(shared_data_dir)
    workdir = tmp_path / "melanoma"
    run_smoke("melanoma_table1.py", workdir, shared_data_dir)

    results = json.loads((workdir / "results.json").read_text())
    settings = results["settings"]
    assert settings["config"] == "tiny" and settings["members"] == 2
    assert settings["variants"] == ["r2unet"]
    assert results["data"]["num_queries"] == 12
    # Every measure has our success rate (a multiple of 100 / (5 * 12)) beside the paper's.
    assert set(results["table1"]) == set(MEASURES) | {"chance"}
    assert 0.0 < results["table1"]["chance"]["mean"] < 100.0
    paper = {"euclidean": 40.8, "cosine": 34.0, "style": 61.2, "I1_SD": 6.0}
    for measure in MEASURES:
        row = results["table1"][measure]
        assert 0.0 <= row["low"] <= row["mean"] <= row["high"] <= 100.0, (measure, row)
        assert row["mean"] * 60 / 100 == pytest.approx(round(row["mean"] * 60 / 100), abs=1e-6)
        if measure in paper:
            assert row["paper"] == paper[measure]
    for name, difference in results["comparisons"].items():
        assert difference["low"] <= difference["difference"] <= difference["high"], name
    aucs = results["classification"]["auc"]
    assert set(aucs) == {"member0", "member1", "ensemble"}
    for value in aucs.values():
        assert 0.0 <= value["value"] <= 1.0
    dice = results["segmentation"]["ph2"]["r2unet"]
    assert 0.0 <= dice["low"] <= dice["mean"] <= dice["high"] <= 1.0
    drive = results["segmentation"]["drive"]["r2unet"]
    assert 0.0 <= drive["f1"] <= 1.0 and 0.0 <= drive["accuracy"] <= 1.0
    assert drive["num_pixels"] > 100_000  # every field-of-view pixel of the smoke's test images
    # The style database: every smoke image plus flipped copies up to 200, both search modes.
    benchmark = results["benchmark"]
    assert benchmark["size"] == 200 and benchmark["num_queries"] == 3
    # float16 upper triangles: 2 bytes per entry of every Gram matrix's C (C + 1) / 2.
    packed = 2 * sum(c * (c + 1) // 2 for c in benchmark["channels"])
    assert benchmark["bytes_per_image"]["packed_grams"] == packed
    assert benchmark["bytes_per_image"]["total"] > packed
    assert set(benchmark["measures"]) == set(MEASURES)
    for value in benchmark["measures"].values():
        assert 0.0 <= value["top5_agreement"] <= 1.0 and value["exact_ms"] > 0
    table = (workdir / "table.md").read_text()
    assert "SMOKE RUN" in table and "61.2" in table and "0.8171" in table  # paper, Alom et al.
    with Image.open(workdir / "fig_top5.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 5


@pytest.mark.large  # two smoke runs: kept out of `make test` for CI time
def test_rerun_trains_nothing_and_reproduces_the_table(tmp_path, shared_data_dir):
    _need_data(shared_data_dir)
    workdir = tmp_path / "melanoma"
    run_smoke("melanoma_table1.py", workdir, shared_data_dir, "--nodrive", "--nobenchmark")
    results = json.loads((workdir / "results.json").read_text())
    run_smoke("melanoma_table1.py", workdir, shared_data_dir, "--nodrive", "--nobenchmark")
    again = json.loads((workdir / "results.json").read_text())
    assert all(record["skipped"] for record in again["runs"].values())
    assert again["table1"] == results["table1"]
