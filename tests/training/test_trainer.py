"""`train_embedder` on real data: the loss goes down, a crashed run resumes from its backup."""

import json

import keras
import numpy as np
import pytest

from tfmir.configs import SamplerConfig
from tfmir.data import load_medmnist_npz
from tfmir.training import evaluate_retrieval, make_sampler, make_strategy, read_log, train_embedder
from tfmir.training.strategy import STRATEGIES


@pytest.fixture(scope="module")
def xray(shared_data_dir):
    splits = load_medmnist_npz(shared_data_dir / "pneumoniamnist" / "pneumoniamnist.npz",
                               source="xray")
    rng = np.random.default_rng(0)
    train = splits["train"].subset(np.sort(rng.choice(len(splits["train"]), 600, replace=False)))
    val = splits["val"].subset(np.arange(120))
    return train, val


class SimulatedCrash(Exception):
    pass


class CrashAfterEpoch(keras.callbacks.Callback):
    """Stands in for a killed process: raises once `epoch` has been backed up."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch
        self.weights = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.weights = [w.copy() for w in self.model.get_weights()]
            raise SimulatedCrash(f"crash after epoch {epoch}")


class WeightsAtStart(keras.callbacks.Callback):
    """Records the weights fit() starts from (after BackupAndRestore has restored them)."""

    def on_train_begin(self, logs=None):
        self.weights = [w.copy() for w in self.model.get_weights()]


def test_training_lowers_the_loss_and_resumes_after_a_crash(xray, tmp_path):
    train, val = xray
    settings = dict(workdir=tmp_path, preset="tiny", epochs=4, steps_per_epoch=12,
                    learning_rate=3e-3, num_classes_per_batch=2, num_per_class=10, verbose=0)
    crash = CrashAfterEpoch(1)
    with pytest.raises(SimulatedCrash):
        train_embedder(train, val, callbacks=[crash], **settings)
    assert (tmp_path / "backup").is_dir()
    assert read_log(tmp_path / "log.csv")["epoch"] == [0.0, 1.0]

    start = WeightsAtStart()
    result = train_embedder(train, val, callbacks=[start], **settings)

    assert result.initial_epoch == 2
    for restored, saved in zip(start.weights, crash.weights):
        np.testing.assert_array_equal(restored, saved)
    history = result.history
    assert history["epoch"] == [0.0, 1.0, 2.0, 3.0]
    assert history["loss"][-1] < history["loss"][0]
    assert {"val_recall@1", "val_recall@8"} <= set(history)
    assert not (tmp_path / "backup").exists()  # a finished run removes its backup
    best = keras.saving.load_model(result.best_path)
    final = keras.saving.load_model(result.final_path)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(final.predict(images, verbose=0),
                               result.model.predict(images, verbose=0), atol=1e-6)
    # best.keras holds the epoch with the highest validation Recall@1.
    best_recall = evaluate_retrieval(best, val, resize_size=result.resize_size)["average"]["recall@1"]
    assert best_recall == pytest.approx(max(history["val_recall@1"]), abs=1e-6)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["task"]["model"]["image_size"] == 32 and config["resize_size"] == 36


def test_sampling_choice_for_several_sources(shared_data_dir):
    from tfmir.data import concatenate

    retina = load_medmnist_npz(shared_data_dir / "retinamnist" / "retinamnist.npz", source="retina")
    xray = load_medmnist_npz(shared_data_dir / "pneumoniamnist" / "pneumoniamnist.npz",
                             source="xray")
    both = concatenate([retina["train"], xray["train"]])
    by_source = make_sampler(both, SamplerConfig("source_aware", num_classes_per_batch=3,
                                                 num_per_class=5))
    by_class = make_sampler(both, SamplerConfig("class_balanced", num_classes_per_batch=7,
                                                num_per_class=5))
    batches = iter(by_source)
    seen = set()
    for batch in [next(batches) for _ in range(40)]:
        assert len(set(both.sources[batch])) == 1
        seen |= set(both.sources[batch])
    assert seen == {"retina", "xray"}
    mixed = next(iter(by_class))  # all 7 classes of both sources, 5 images each
    assert sorted(np.unique(both.labels[mixed], return_counts=True)[1]) == [5] * 7
    assert set(both.sources[mixed]) == {"retina", "xray"}
    with pytest.raises(ValueError, match="Received: sampler='random'"):
        make_sampler(both, SamplerConfig("random"))
    with pytest.raises(ValueError, match=r"this task trains on \['source_aware'\] batches. "
                                         "Received: sampler='shuffled'"):
        make_sampler(both, SamplerConfig("shuffled"), allowed=("source_aware",))
    with pytest.raises(ValueError, match="Received: sampling='random'"):
        train_embedder(both, None, workdir="unused", sampling="random")


@pytest.mark.parametrize("name", ["default", "one_device", "mirrored"])
def test_strategies_build_on_cpu(name):
    strategy = make_strategy(name)
    assert strategy.num_replicas_in_sync == 1


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="Received: strategy='tpu_pod'"):
        make_strategy("tpu_pod")
    assert "multi_worker" in STRATEGIES


def test_training_under_mirrored_strategy(xray, tmp_path):
    train, _ = xray
    result = train_embedder(train, None, workdir=tmp_path, preset="tiny", epochs=1,
                            steps_per_epoch=2, strategy="mirrored", verbose=0)
    assert result.best_path is None
    assert len(result.history["loss"]) == 1 and np.isfinite(result.history["loss"][0])


def test_empty_splits_are_refused(xray, tmp_path):
    train, val = xray
    with pytest.raises(ValueError, match="training split is empty"):
        train_embedder(train.subset([]), val, workdir=tmp_path, preset="tiny")
    with pytest.raises(ValueError, match="validation split is empty"):
        train_embedder(train, val.subset([]), workdir=tmp_path, preset="tiny")


@pytest.mark.parametrize("tf_config, message", [
    (None, "strategy 'multi_worker' needs TF_CONFIG"),
    ("{cluster: 1", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG must hold a cluster with a list of workers"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "ps", "index": 0}}',
     r"TF_CONFIG's task must name a job of its cluster \['worker'\]"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     r"task index must lie in \[0, 2\) for the 2 worker\(s\)"),
])
def test_a_bad_tf_config_is_named_before_anything_starts(tf_config, message, monkeypatch):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=message):
        make_strategy("multi_worker")


def test_a_resume_with_other_data_or_config_is_refused(xray, tmp_path, capsys):
    train, val = xray
    settings = dict(workdir=tmp_path, preset="tiny", epochs=3, steps_per_epoch=2, verbose=0)
    with pytest.raises(SimulatedCrash):
        train_embedder(train, val, callbacks=[CrashAfterEpoch(0)], **settings)
    config_before = (tmp_path / "config.json").read_text()
    other_data = train.subset(np.arange(len(train) - 10))
    with pytest.raises(ValueError, match=r"holds an interrupted run with another config or other "
                                         r"data \(differs in \['data.train'\]\)"):
        train_embedder(other_data, val, **settings)
    with pytest.raises(ValueError, match=r"differs in \['config.optimizer.learning_rate'\]"):
        train_embedder(train, val, learning_rate=0.1, **settings)
    assert (tmp_path / "config.json").read_text() == config_before  # nothing was rewritten
    capsys.readouterr()
    result = train_embedder(train, val, **settings)  # the same command resumes
    assert result.initial_epoch == 1 and result.history["epoch"] == [0.0, 1.0, 2.0]
    # ... and says so (issue 11, finding 9: a resumed run never said it resumed).
    assert f"Resuming the run in {tmp_path} from its backup: epoch 2 of 3." in capsys.readouterr().out


def test_a_monitor_no_evaluator_produces_is_refused_before_training(xray, tmp_path):
    from tfmir.training import fit, preset_config
    from tfmir.configs import override

    train, val = xray
    config = override(preset_config("specialist", "tiny"), {"monitor": "val_map@10"})
    with pytest.raises(ValueError, match="monitor 'val_map@10' is produced by no evaluator"):
        fit(config, {"train": train, "val": val}, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_class_too_small_for_its_share_is_named_by_its_name(xray, tmp_path):
    train, val = xray
    pneumonia = np.flatnonzero(train.labels == 1)
    few = train.subset(np.sort(np.concatenate([np.flatnonzero(train.labels == 0),
                                               pneumonia[:3]])))
    with pytest.raises(ValueError, match=r"class 'pneumonia' \(label 1\) has 3 images, fewer "
                                         r"than num_per_class=5"):
        train_embedder(few, val, workdir=tmp_path / "run", preset="tiny",
                       num_classes_per_batch=2, num_per_class=5)
    assert not (tmp_path / "run").exists()


def test_a_second_run_on_a_workdir_being_written_is_refused(xray, tmp_path):
    import subprocess
    import sys

    from tfmir.files import LockedError

    train, val = xray
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tfmir.files import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1], 'training run'):\n"
         "    print('locked', flush=True); sys.stdin.readline()", str(workdir / "run")],
        text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=rf"{workdir / 'run'} is being written by another "
                                              r"training run"):
            train_embedder(train, val, workdir=workdir, preset="tiny", epochs=1,
                           steps_per_epoch=1, verbose=0)
        assert sorted(path.name for path in workdir.iterdir()) == ["run.lock"]
    finally:
        holder.communicate("\n")
    # Once the other run has ended, the same command trains.
    result = train_embedder(train, val, workdir=workdir, preset="tiny", epochs=1,
                            steps_per_epoch=1, verbose=0)
    assert result.history["epoch"] == [0.0]
