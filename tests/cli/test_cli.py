"""The `tfmir` command run as a user runs it: a separate process, real data."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfmir.cli.main import COMMANDS
from tfmir.cli.train import parse_source_weights


def tfmir(*args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "tfmir.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_usage_lists_the_commands():
    result = tfmir("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout
    unknown = tfmir("frobnicate")
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr


@pytest.mark.parametrize("command", ["train", "search"])
def test_command_help_lists_its_flags(command):
    result = tfmir(command, "--help")  # absl exits with 1 after --help
    help_text = result.stdout + result.stderr
    assert f"tfmir {command}" in help_text
    # Flags defined by that command's module, not just absl's "Try --helpfull".
    expected = {"train": ["--workdir", "--preset"], "search": ["--index", "--k"]}[command]
    for flag in expected:
        assert flag + ":" in help_text, help_text[-2000:]


def test_train_writes_models_and_test_table(shared_data_dir, tmp_path):
    workdir = tmp_path / "run"
    result = tfmir("train", f"--data=retina={shared_data_dir / 'retinamnist' / 'retinamnist.npz'}",
                   "--preset=tiny", "--epochs=1", "--steps_per_epoch=3", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| retina | best |" in result.stdout
    results = json.loads((workdir / "results.json").read_text())
    recall = results["test"]["retina"]
    assert 0.0 <= recall["recall@1"] <= recall["recall@2"] <= recall["recall@4"] <= recall["recall@8"] <= 1.0
    assert {"best.keras", "final.keras", "log.csv", "flags.txt", "table.md"} <= set(os.listdir(workdir))
    model = keras.saving.load_model(workdir / "best.keras")
    assert model.predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0).shape == (1, 128)


def test_train_refuses_a_missing_dataset_by_name(tmp_path):
    result = tfmir("train", f"--data={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'run'}",
                   "--preset=tiny")
    assert result.returncode != 0
    assert "nowhere" in result.stderr and "Expected [source=]location" in result.stderr


def test_train_refuses_an_unknown_preset(tmp_path):
    result = tfmir("train", "--data=sample", f"--workdir={tmp_path}", "--preset=huge")
    assert result.returncode != 0
    assert "preset" in result.stderr and "huge" in result.stderr


def test_train_skips_unreadable_files_and_strict_refuses_them(shared_data_dir, tmp_path):
    images = sorted((shared_data_dir / "ph2" / "images").glob("*.jpg"))
    folder = tmp_path / "folder"
    for index, source in enumerate(images[:48]):
        label = "a" if index % 2 else "b"
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / source.name).write_bytes(source.read_bytes())
    (folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    args = ("train", f"--data=skin={folder}", "--preset=tiny", "--epochs=1", "--steps_per_epoch=2",
            "--classes_per_batch=2", "--per_class=3")
    lenient = tfmir(*args, f"--workdir={tmp_path / 'lenient'}")
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    assert "broken.jpg" in lenient.stderr and "skipped 1 of 49" in lenient.stderr
    strict = tfmir(*args, "--strict", f"--workdir={tmp_path / 'strict'}")
    assert strict.returncode != 0 and "broken.jpg" in strict.stderr


def test_demo_smoke_prints_both_domains_and_writes_a_gallery(tmp_path):
    result = tfmir("demo", "--preset=tiny", "--epochs=1", "--steps_per_epoch=2",
                   f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("| retina | untrained |", "| retina | trained |", "| xray | untrained |",
                "| xray | trained |"):
        assert row in result.stdout
    assert (tmp_path / "gallery.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["test_recall"]) == {"untrained", "trained"}
    recall = results["test_recall"]
    for source in ("retina", "xray"):
        gain = results["recall@1_gain"][source]
        # The paired per-query difference is the difference of the two tables' Recall@1.
        assert gain["difference"] == pytest.approx(
            recall["trained"][source]["recall@1"] - recall["untrained"][source]["recall@1"])
        assert gain["low"] <= gain["difference"] <= gain["high"] and gain["num_queries"] == 400
        assert f"  {source}: {100 * gain['difference']:+.1f} points" in result.stdout


def test_source_weights_flag_parsing():
    assert parse_source_weights("size") == "size"
    assert parse_source_weights("retina:1,xray:2.5") == {"retina": 1.0, "xray": 2.5}
    with pytest.raises(ValueError, match="Received: 'retina'"):
        parse_source_weights("retina")
