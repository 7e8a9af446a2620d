"""End-to-end smoke run of experiments/deep_knn_table3.py on the real data (a few images)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "deep_knn_table3.py"
RUN_METHODS = ("knn_basic", "knn_basic_cosine", "nca", "mlp_triplet", "mlp_ce", "mlp_deep_knn")
TABLE_ROWS = ("kNN-basic", "NCA", "LMNN", "MLP+triplets", "MLP+CE", "MLP+deep-kNN")
METRICS = ("accuracy", "mean_class_recall", "smallest_class_recall")


def _run(workdir, data, *extra, expect_success=True):
    command = [sys.executable, str(SCRIPT), "--smoke", f"--workdir={workdir}", f"--data={data}",
               *extra]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment,
                               timeout=900, check=False)
    if expect_success:
        assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory, shared_data_dir):
    data = shared_data_dir / "ham10000_subset"
    if not (data / "labels.csv").exists():
        pytest.skip(f"ham10000_subset is not in the real data folder {shared_data_dir}")
    workdir = tmp_path_factory.mktemp("table3")
    first = _run(workdir, data)
    return workdir, data, first


def test_smoke_run_writes_every_row_with_intervals(smoke_workdir):
    workdir, _, first = smoke_workdir
    results = json.loads((workdir / "results.json").read_text())
    for method in (*RUN_METHODS, "mlp_ce_softmax"):
        for kp, scores in results["test"][method].items():
            for metric in METRICS:
                value = scores[metric]
                assert 0.0 <= value["low"] <= value["value"] <= value["high"] <= 1.0, (
                    method, kp, metric, value)
    for method in RUN_METHODS:
        assert set(results["test"][method]) == {"kp1", "kp5"}
        assert results["runs"][method]["status"] == "done"
        assert results["runs"][method]["seconds"] >= 0
    # LMNN either ran or says why not; never a number it did not measure.
    lmnn = results["runs"]["lmnn"]
    if lmnn["status"] == "not run":
        assert lmnn["reason"] and "lmnn" not in results["test"]
    else:
        assert set(results["test"]["lmnn"]) == {"kp1", "kp5"}
    assert results["paper_table3_percent"]["mlp_deep_knn"] == {
        "accuracy": 85.09, "mean_class_recall": 66.08, "smallest_class_recall": 67.30}
    assert results["settings"]["smoke"] is True
    table = (workdir / "table.md").read_text()
    for row in TABLE_ROWS:
        assert f"\n| {row} | " in table, row
    assert "66.08" in table and "K_p = 1" in table and "K_p = 5" in table
    assert "features: " in first.stdout


def test_rerun_reuses_features_and_runs(smoke_workdir):
    workdir, data, _ = smoke_workdir
    features_before = (workdir / "features.npz").stat().st_mtime_ns
    table_before = json.loads((workdir / "results.json").read_text())["test"]
    rerun = _run(workdir, data)
    assert "Features: reused" in rerun.stdout
    assert "Running knn_basic" not in rerun.stdout and "Running mlp_deep_knn" not in rerun.stdout
    assert (workdir / "features.npz").stat().st_mtime_ns == features_before
    results = json.loads((workdir / "results.json").read_text())
    assert results["features"]["reused"] is True
    assert all(results["runs"][method]["reused"] for method in RUN_METHODS)
    assert results["test"] == table_before  # same predictions, same seeded bootstrap


def test_a_workdir_of_another_setting_is_refused_unless_overwritten(smoke_workdir, tmp_path):
    workdir, data, _ = smoke_workdir
    results_before = (workdir / "results.json").read_text()
    refused = _run(workdir, data, "--seed=1", expect_success=False)
    assert refused.returncode != 0
    assert "holds results of a different setting" in refused.stderr
    assert "seed" in refused.stderr and "--overwrite" in refused.stderr
    assert (workdir / "results.json").read_text() == results_before


_CHECK_WORKDIR = r"""
import importlib.util, json, pathlib, sys
spec = importlib.util.spec_from_file_location("deep_knn_table3_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
workdir, overwrite = pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
try:
    module.check_workdir(workdir, {"config": "cpu", "seed": 1}, overwrite=overwrite)
except Exception as error:
    print(error)
    sys.exit(3)
"""


def _check_workdir(workdir, overwrite):
    # In a process of its own: the experiment's absl flags would clash with other modules'
    # (tfmir.cli.export also defines --overwrite) in a shared test process.
    return subprocess.run([sys.executable, "-c", _CHECK_WORKDIR, str(SCRIPT), str(workdir),
                           "1" if overwrite else "0"], capture_output=True, text=True,
                          timeout=300)


def test_overwrite_clears_only_the_experiments_outputs(tmp_path):
    # check_workdir on its own: a different setting is refused, or with overwrite=True its
    # features, method folders and tables are removed and the new setting recorded; files
    # the experiment does not write stay.
    (tmp_path / "settings.json").write_text(json.dumps({"config": "cpu", "seed": 0}))
    for name in ("features.npz", "table.md", "results.json", "notes.txt"):
        (tmp_path / name).write_text("old")
    (tmp_path / "nca").mkdir()
    (tmp_path / "nca" / "result.json").write_text("{}")
    new_settings = {"config": "cpu", "seed": 1}
    refused = _check_workdir(tmp_path, overwrite=False)
    assert refused.returncode == 3 and "different setting (differences: seed" in refused.stdout
    assert (tmp_path / "features.npz").exists() and (tmp_path / "nca").exists()
    assert _check_workdir(tmp_path, overwrite=True).returncode == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt", "settings.json"]
    assert json.loads((tmp_path / "settings.json").read_text()) == new_settings
    assert _check_workdir(tmp_path, overwrite=False).returncode == 0  # same setting: accepted
