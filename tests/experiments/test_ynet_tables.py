"""End-to-end smoke run of experiments/ynet_tables.py on the real PH2 data (a subset)."""

import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from tests.experiments import run_smoke

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "ynet_tables.py"
RUNS = ("ynet", "learnable", "sum", "no_fpn", "no_rmac", "no_branches", "cross_entropy")
ROWS = ({f"ynet@{bits}" for bits in (36, 64, 128, 256)}
        | {f"{run}@64" for run in RUNS if run != "ynet"}
        | {f"pool_{name}" for name in ("rmac", "spoc", "gem", "crow", "cam")})


def test_smoke_run_writes_every_table_figure_and_resumes(tmp_path, shared_data_dir):
    if not (shared_data_dir / "ph2" / "labels.csv").exists():
        pytest.skip(f"ph2 is not in the real data folder {shared_data_dir}")
    workdir = tmp_path / "ynet"
    run_smoke("ynet_tables.py", workdir, shared_data_dir)

    results = json.loads((workdir / "results.json").read_text())
    assert results["settings"]["config"] == "tiny"
    assert set(results["rows"]) == ROWS
    for row, entry in results["rows"].items():
        assert entry["num_queries"] == 12  # the smoke split: 96 / 12 / 12
        for k in (5, 10, 20, 50):
            value = entry["metrics"][f"map@{k}"]
            assert 0.0 <= value["low"] <= value["value"] <= value["high"] <= 1.0, (row, value)
    # The paper's numbers stand beside ours: Table II/III at top-5/10/20/50, Table I by bits.
    assert results["rows"]["ynet@64"]["paper"]["fundus"]["map@10"] == 0.6102
    assert results["rows"]["no_rmac@64"]["paper"]["jsrt"]["map@50"] == 0.4285
    assert results["rows"]["pool_spoc"]["paper"] is None
    assert results["paper"]["table1"]["jsrt"]["256"] == 0.5809
    for gain in results["gains"].values():
        assert gain["low"] <= gain["difference"] <= gain["high"]
    # Masks are scored for every run with an FPN branch, and only those.
    assert set(results["segmentation"]) == {"ynet", "learnable", "sum", "no_rmac",
                                            "cross_entropy"}
    for scores in results["segmentation"].values():
        assert 0.0 <= scores["iou"] <= scores["dice"] <= 1.0
    timing = results["timing"]
    assert timing["codes_per_second"] > 0 and timing["queries"] == 12
    for run in RUNS:
        assert not results["runs"]["fold0"][run]["skipped"]
        assert (workdir / "fold0" / run / "final.keras").exists()
        assert (workdir / "fold0" / run / "task.keras").exists()
    table = (workdir / "table.md").read_text()
    assert "SMOKE RUN" in table and "0.6102" in table and "Table III" in table
    with Image.open(workdir / "fig_top5.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[1] > 400 and pixels.std() > 5
    first_table = table

    rerun = run_smoke("ynet_tables.py", workdir, shared_data_dir)
    results = json.loads((workdir / "results.json").read_text())
    assert all(results["runs"]["fold0"][run]["skipped"] for run in RUNS)
    assert "Running " not in rerun.stdout
    # The evaluation reads the cached features: the same tables again, bit for bit.
    assert (workdir / "table.md").read_text() == first_table


def _experiment_module():
    """experiments/ynet_tables.py imported in-process (its absl flags join the global ones)."""
    import importlib.util

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("ynet_tables_under_test", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_folds_put_every_image_in_one_test_fold():
    from tfmir.data import Examples

    labels = np.repeat([0, 1, 2], [80, 80, 40])  # PH2's class sizes
    examples = Examples(labels=labels, sources="ph2", ids=[f"IMD{i:03d}" for i in range(200)],
                        class_names=("atypical", "common", "melanoma"),
                        images=np.zeros((200, 8, 8, 3), np.uint8))
    experiment = _experiment_module()
    folds = experiment.fold_splits(examples, 5, seed=0)
    assert len(folds) == 5
    test_ids = np.concatenate([fold["test"].ids for fold in folds])
    assert sorted(test_ids) == sorted(examples.ids)  # every image a test query exactly once
    for fold in folds:
        assert [len(fold[name]) for name in ("train", "val", "test")] == [140, 20, 40]
        parts = [set(fold[name].ids) for name in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        # Stratified: each test fold holds a fifth of every class.
        assert np.bincount(fold["test"].labels).tolist() == [16, 16, 8]
    single = experiment.fold_splits(examples, 0, seed=0)[0]
    assert [len(single[name]) for name in ("train", "val", "test")] == [160, 20, 20]


@pytest.mark.large  # a second Y-Net smoke run (about 76 s): kept out of `make test` for CI time
def test_cross_validation_queries_every_image_once(tmp_path, shared_data_dir):
    if not (shared_data_dir / "ph2" / "labels.csv").exists():
        pytest.skip(f"ph2 is not in the real data folder {shared_data_dir}")
    workdir = tmp_path / "folds"
    run_smoke("ynet_tables.py", workdir, shared_data_dir, "--folds=5", "--runs=ynet")
    results = json.loads((workdir / "results.json").read_text())
    assert results["settings"]["folds"] == 5 and sorted(results["runs"]) == [
        f"fold{index}" for index in range(5)]
    # The smoke subset's 120 images, each a test query in exactly one fold (24 per fold).
    assert results["rows"]["ynet@64"]["num_queries"] == 120
    assert set(results["rows"]) == {f"ynet@{bits}" for bits in (36, 64, 128, 256)} | {
        f"pool_{name}" for name in ("rmac", "spoc", "gem", "crow", "cam")}
    assert list(results["segmentation"]) == ["ynet"]
