"""End-to-end smoke run of experiments/deep_knn_table2.py on the real data (tiny subsets)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.experiments import run_smoke

DATASETS = ("skin7", "pneumonia")
RUNS = ("triplet", "deep_knn", "classifier", "deep_knn_star")
MEASURED_ROWS = ("knn_efficientnet_lite0@1", "knn_efficientnet_lite0@5", "triplet@1",
                 "triplet@5", "deep_knn@1", "deep_knn@5", "ce_softmax", "ce_knn@1", "ce_knn@5",
                 "deep_knn_star@1", "deep_knn_star@5")
# Without their Keras ImageNet weights in the cache (this machine is offline) a smoke run reports
# these rows as not run, with the reason.
OPTIONAL_ROWS = ("knn_vgg19@1", "knn_vgg19@5", "knn_resnet50@1", "knn_resnet50@5")


def test_smoke_run_writes_every_row_intervals_figure_and_resumes(tmp_path, shared_data_dir):
    for folder in ("ham10000_subset", "pneumoniamnist"):
        if not (shared_data_dir / folder).is_dir():
            pytest.skip(f"{folder} is not in the real data folder {shared_data_dir}")
    workdir = tmp_path / "table2"
    run_smoke("deep_knn_table2.py", workdir, shared_data_dir)

    results = json.loads((workdir / "results.json").read_text())
    assert results["settings"]["config"] == "tiny"
    for dataset in DATASETS:
        rows = results["datasets"][dataset]["rows"]
        assert set(rows) == set(MEASURED_ROWS) | set(OPTIONAL_ROWS)
        for row, entry in rows.items():
            if row in OPTIONAL_ROWS and "metrics" not in entry:
                assert entry["status"].startswith("not run: "), entry
                continue
            for metric in ("accuracy", "mcr", "rs"):
                value = entry["metrics"][metric]
                assert 0.0 <= value["low"] <= value["value"] <= value["high"] <= 1.0, (row, value)
        # The paper's numbers stand beside ours (Table 2, percent).
        paper = results["paper_table2_percent"]
        assert rows["deep_knn@1"]["paper_percent"] == paper["deep_knn@1"][dataset]
        assert rows["ce_knn@5"]["paper_percent"] is None  # not a Table 2 row
        for gain in results["datasets"][dataset]["gains"].values():
            for metric in ("accuracy", "mcr", "rs"):
                assert gain[metric]["low"] <= gain[metric]["difference"] <= gain[metric]["high"]
        for run in RUNS:
            assert not results["runs"][dataset][run]["skipped"]
            assert (workdir / dataset / run / "final.keras").exists()
        # Fig. 2's column is logged every epoch of both compared runs.
        for run in ("deep_knn", "triplet"):
            log = (workdir / dataset / run / "log.csv").read_text().splitlines()
            assert "train_knn@1_accuracy" in log[0] and len(log) == 3  # header + 2 epochs
        # deep kNN* starts from the classifier's feature extractor.
        config = json.loads((workdir / dataset / "deep_knn_star" / "config.json").read_text())
        assert config["task"]["args"]["init_from"].endswith(
            os.path.join(dataset, "classifier", "best.keras"))
    assert paper["deep_knn@1"]["skin7"] == {"accuracy": 88.2, "mcr": 77.4, "rs": 77.0}
    # RS is the recall of the training split's smallest class (the lowest label among the
    # equally small classes of a smoke subset).
    for dataset in DATASETS:
        smallest = results["datasets"][dataset]["smallest_class"]
        train_counts = results["data"]["counts"][dataset]["train"]["per_class"]
        assert smallest["train_items"] == train_counts[smallest["name"]] == min(
            train_counts.values())
        assert smallest["name"] == [name for name, count in train_counts.items()
                                    if count == min(train_counts.values())][0]
    table = (workdir / "table.md").read_text()
    assert "SMOKE RUN" in table and "88.2 / 77.4 / 77.0" in table and "deep kNN*" in table
    assert "--smoke" in (workdir / "flags.txt").read_text()
    with Image.open(workdir / "fig2_convergence.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[1] > 500 and pixels.std() > 5
    first_table = table

    log = run_smoke("deep_knn_table2.py", workdir, shared_data_dir)
    rerun = json.loads((workdir / "results.json").read_text())
    assert all(rerun["runs"][dataset][run]["skipped"] for dataset in DATASETS for run in RUNS)
    assert "Running " not in log.stdout
    assert (workdir / "table.md").read_text() == first_table
