"""The `tfmir` command run as a user runs it: a separate process, real data."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tfmir.cli.main import COMMANDS
from tfmir.models import Embedder  # registers the class that .keras files name


# TensorFlow's C++ log lines ("2025-01-31 12:00:00.123456: E external/.../cuda_platform.cc:51]
# failed call to cuInit ...") and its notices that continue on a line of their own.
TENSORFLOW_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |oneDNN custom "
                                 r"operations|rebuild TensorFlow with the appropriate", re.M)


def tfmir(*args, timeout=600, as_user=False):
    """`python -m tfmir.cli ARGS`; as_user: without the TF_CPP_MIN_LOG_LEVEL tests set."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if as_user:
        del env["TF_CPP_MIN_LOG_LEVEL"]
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
    expected = {"train": ["--workdir", "--config"], "search": ["--index", "--k"]}[command]
    for flag in expected:
        assert flag + ":" in help_text, help_text[-2000:]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_prints_no_tensorflow_lines_and_does_not_import_it(command):
    probe = textwrap.dedent("""
        import sys
        from tfmir.cli.main import run
        try:
            run(sys.argv)
        except SystemExit:
            pass
        print("imported tensorflow:", "tensorflow" in sys.modules)
    """)
    env = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", probe, command, "--help"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert f"tfmir {command}" in result.stdout + result.stderr
    assert "imported tensorflow: False" in result.stdout
    assert not TENSORFLOW_LOG_LINE.search(result.stderr), result.stderr


def test_training_prints_no_tensorflow_lines_and_records_only_its_flags(tmp_path):
    workdir = tmp_path / "run"
    result = tfmir("train", "--data=sample", "--config=specialist:tiny", "--config.epochs=1",
                   "--config.steps_per_epoch=2", f"--workdir={workdir}", "--nologtostderr",
                   as_user=True)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    # tf.data's end of sequence ("Local rendezvous is aborting with status: OUT_OF_RANGE") came
    # out in the progress bar, CUDA probing as an error; none of it is the user's problem.
    assert "Local rendezvous" not in output and "OUT_OF_RANGE" not in output
    assert not TENSORFLOW_LOG_LINE.search(output), output[-3000:]
    # The command's flags and the one other flag given, not every library's flags.
    assert (workdir / "flags.txt").read_text().splitlines() == [
        "--config=specialist:tiny", "--data=sample", "--nodownload", "--nostrict",
        f"--workdir={workdir}", "--nologtostderr", "--config.epochs=1",
        "--config.steps_per_epoch=2"]


def test_the_search_gallery_captions_the_prediction_as_a_prediction(tmp_path):
    # In another process: tfmir.cli.search defines absl flags that other CLI modules share.
    script = textwrap.dedent("""
        import json, sys
        from PIL import ImageDraw
        from tfmir.cli.search import write_gallery

        drawn = []
        draw_text = ImageDraw.ImageDraw.text

        def recording_text(self, xy, text, *args, **kwargs):
            drawn.append(text)
            return draw_text(self, xy, text, *args, **kwargs)

        ImageDraw.ImageDraw.text = recording_text
        results = [{"label": label, "path": None} for label in ("nevus", "melanoma")]
        output = [{"query": "q.png", "results": results, "predicted_label": "nevus"}]
        write_gallery(sys.argv[1], ["q.png"], output, None)
        write_gallery(sys.argv[1], ["q.png"], output, "melanoma")
        print(json.dumps(drawn))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "gallery.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = json.loads(result.stdout)
    assert drawn.count("predicted: nevus") == 2
    # The true label only where --query_label gave it.
    assert [text for text in drawn if text.startswith("query:")] == ["query: melanoma"]


def test_train_writes_models_and_test_table(shared_data_dir, tmp_path):
    workdir = tmp_path / "run"
    result = tfmir("train", f"--data=retina={shared_data_dir / 'retinamnist' / 'retinamnist.npz'}",
                   "--config=specialist:tiny", "--config.epochs=1",
                   "--config.steps_per_epoch=3", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| retina | best |" in result.stdout
    results = json.loads((workdir / "results.json").read_text())
    recall = results["test"]["retina"]
    assert 0.0 <= recall["recall@1"] <= recall["recall@2"] <= recall["recall@4"] <= recall["recall@8"] <= 1.0
    assert {"best.keras", "final.keras", "log.csv", "flags.txt", "table.md",
            "run.json"} <= set(os.listdir(workdir))
    assert "--config.steps_per_epoch=3" in (workdir / "flags.txt").read_text()
    config = json.loads((workdir / "run.json").read_text())["config"]
    assert (config["epochs"], config["steps_per_epoch"], config["task"]["name"]) == (
        1, 3, "metric_learning")
    model = keras.saving.load_model(workdir / "best.keras")
    assert model.predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0).shape == (1, 128)


def test_train_refuses_a_missing_dataset_by_name(tmp_path):
    result = tfmir("train", f"--data={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'run'}",
                   "--config=specialist:tiny")
    assert result.returncode != 0
    assert "nowhere" in result.stderr and "Expected [source=]location" in result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--config=specialist:huge"], "setting must be one of ('tiny', 'cpu', 'paper'). "
                                   "Received: 'huge'"),
    (["--config=melanoma"], "config must be one of ['deep_knn', 'deep_knn_classifier', "
                              "'deep_knn_triplet', 'melanoma_ensemble', 'melanoma_member', "
                              "'segmenter', 'segmenter_drive', 'specialist', 'universal', "
                              "'ynet']"),
    (["--config.optimizer.lr=1"], "unknown config key 'optimizer.lr'; valid keys here are "
                                  "['optimizer.name', 'optimizer.learning_rate'"),
    (["--config.epochs=many"], "config key 'epochs' takes a int (default 6). Received: 'many'"),
    (["--config.monitor=val_dice"], "monitor 'val_dice' is produced by no evaluator"),
    (["--config.sampler.name=stratified"], "sampler must be one of ('class_balanced', "
                                           "'source_aware', 'shuffled')"),
])
def test_train_refuses_bad_configs_in_one_line(arguments, message, tmp_path):
    result = tfmir("train", "--data=sample", f"--workdir={tmp_path / 'run'}", *arguments)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_train_refuses_an_output_path_that_is_a_file(tmp_path):
    blocked = tmp_path / "run"
    blocked.write_text("not a folder")
    result = tfmir("train", "--data=sample", f"--workdir={blocked}", "--config=specialist:tiny")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"workdir {blocked} is a file; expected a folder" in result.stderr
    assert blocked.read_text() == "not a folder"


def test_train_distils_the_universal_model_from_the_command_line(tmp_path):
    specialist = tmp_path / "retina.keras"
    keras.utils.set_random_seed(0)
    Embedder.from_preset("tiny").save(specialist)
    workdir = tmp_path / "universal"
    result = tfmir("train", "--data=sample", "--config=universal:tiny", "--config.epochs=1",
                   "--config.steps_per_epoch=4",
                   f"--config.task.args.specialists={{'retina': '{specialist}'}}",
                   f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| retina | best |" in result.stdout and "| xray | best |" in result.stdout
    log = (workdir / "log.csv").read_text().splitlines()
    assert {"rkd_loss", "ms_loss", "val_recall@1_retina"} <= set(log[0].split(","))
    student = keras.saving.load_model(workdir / "best.keras")
    assert type(student).__name__ == "Embedder"


def test_train_skips_unreadable_files_and_strict_refuses_them(shared_data_dir, tmp_path):
    images = sorted((shared_data_dir / "ph2" / "images").glob("*.jpg"))
    folder = tmp_path / "folder"
    for index, source in enumerate(images[:48]):
        label = "a" if index % 2 else "b"
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / source.name).write_bytes(source.read_bytes())
    (folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    args = ("train", f"--data=skin={folder}", "--config=specialist:tiny", "--config.epochs=1",
            "--config.steps_per_epoch=2", "--config.sampler.num_classes_per_batch=2",
            "--config.sampler.num_per_class=3")
    lenient = tfmir(*args, f"--workdir={tmp_path / 'lenient'}")
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    assert "broken.jpg" in lenient.stderr and "skipped 1 of 49" in lenient.stderr
    strict = tfmir(*args, "--strict", f"--workdir={tmp_path / 'strict'}")
    assert strict.returncode != 0 and "broken.jpg" in strict.stderr


def test_demo_smoke_prints_both_domains_and_writes_a_gallery(tmp_path):
    result = tfmir("demo", "--preset=tiny", "--epochs=1", "--steps_per_epoch=2",
                   f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    models = ("raw pixels", "untrained features", "trained")  # tiny: a random backbone
    for source in ("retina", "xray", "average"):
        for model in models:
            assert f"| {source} | {model} |" in result.stdout
    assert (tmp_path / "gallery.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["test_recall"]) == set(models)
    recall = results["test_recall"]
    for baseline in models[:2]:
        gains = results["recall@1_gain"][baseline]
        assert f"Recall@1 gain of the trained model over {baseline}" in result.stdout
        for source in ("retina", "xray"):
            gain = gains[source]
            # The paired per-query difference is the difference of the two tables' Recall@1.
            assert gain["difference"] == pytest.approx(
                recall["trained"][source]["recall@1"] - recall[baseline][source]["recall@1"])
            assert gain["low"] <= gain["difference"] <= gain["high"]
            assert gain["num_queries"] == 400
            assert f"  {source}: {100 * gain['difference']:+.1f} points" in result.stdout
        # The average over domains is the mean of the two domains' gains (equal weights).
        average = gains["average"]
        assert average["difference"] == pytest.approx(
            (gains["retina"]["difference"] + gains["xray"]["difference"]) / 2)
        assert (average["num_queries"], average["num_groups"]) == (800, 2)
        unclear = [source for source in ("retina", "xray", "average") if gains[source]["low"] <= 0]
        verdict = f"Not measurably better than {baseline} on: {', '.join(unclear)}"
        assert (verdict in result.stdout) == bool(unclear)


def test_the_demo_raw_pixel_embedding_is_the_flattened_input_at_unit_length():
    from tfmir.cli.demo import raw_pixel_model

    images = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype("float32")
    flat = images.reshape(3, -1)
    expected = flat / np.sqrt((flat ** 2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(np.asarray(raw_pixel_model(8)(images)), expected, rtol=1e-5)
