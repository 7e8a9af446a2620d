"""End-to-end smoke run of experiments/universal_table1.py on the real data (tiny subsets)."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.experiments import run_smoke

METHODS = ("specialists", "concatenation", "naive", "ms_ss", "ms_bal", "universal")
SOURCES = ("skin", "retina", "xray")
RUNS = ("specialist_skin", "specialist_retina", "specialist_xray", "naive", "ms_ss", "ms_bal",
        "concatenation", "universal")
FIGURES = ("fig2_naive_recall.png", "fig3_distill_recall.png", "fig4_distance_ratios.png",
           "fig5_retrievals.png")


def test_smoke_run_writes_table_results_figures_and_resumes(tmp_path, shared_data_dir):
    for folder in ("ham10000_subset", "retinamnist", "pneumoniamnist"):
        if not (shared_data_dir / folder).is_dir():
            pytest.skip(f"{folder} is not in the real data folder {shared_data_dir}")
    workdir = tmp_path / "table1"
    run_smoke("universal_table1.py", workdir, shared_data_dir)

    results = json.loads((workdir / "results.json").read_text())
    for method in METHODS:
        for source in SOURCES + ("average",):
            for k in (1, 2, 4):
                value = results["test_recall"][method][source][f"recall@{k}"]
                assert 0.0 <= value <= 1.0, (method, source, k, value)
    assert all(not results["runs"][run]["skipped"] for run in RUNS)
    # Each average's interval is centred on the table's average Recall@1, and the distilled
    # model's paired gain is the difference of two averages.
    intervals = results["average_recall@1_intervals"]
    for method in METHODS:
        average = results["test_recall"][method]["average"]["recall@1"]
        assert intervals[method]["mean"] == pytest.approx(average)
        assert intervals[method]["low"] <= average <= intervals[method]["high"]
        if method != "universal":
            gain = intervals["universal_minus"][method]
            assert gain["difference"] == pytest.approx(
                results["test_recall"]["universal"]["average"]["recall@1"] - average)
            assert gain["low"] <= gain["difference"] <= gain["high"]
    assert results["settings"]["config"] == "tiny"
    # Down-sampled then capped: no class above the smoke cap in any split.
    for source in SOURCES:
        for split in ("train", "val", "test"):
            counts = results["data"]["counts"][source][split]["per_class"].values()
            assert 0 < max(counts) <= results["data"]["smoke_per_class"]
    table = (workdir / "table.md").read_text()
    assert "| paper |" in table and "ours (tiny)" in table and "Dermnet" in table
    assert "| Ours (RKD distillation) | " in table.split("Ours minus method")[1]
    assert "--smoke" in (workdir / "flags.txt").read_text()
    for name in FIGURES:
        with Image.open(workdir / name) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 300
        assert pixels.std() > 5  # not a blank canvas
    for run in RUNS:
        assert (workdir / run / "final.keras").exists()
    first_table = table

    log = run_smoke("universal_table1.py", workdir, shared_data_dir)
    rerun = json.loads((workdir / "results.json").read_text())
    assert all(rerun["runs"][run]["skipped"] for run in RUNS)
    assert "Running " not in log.stdout
    assert (workdir / "table.md").read_text() == first_table
