"""`train_universal` on two real sources: RKD goes down, students are saved, a crash resumes."""

import json

import keras
import numpy as np
import pytest

from tfmir.data import concatenate, load_medmnist_npz
from tfmir.models import Embedder
from tfmir.training import evaluate_retrieval, read_log, train_universal


@pytest.fixture(scope="module")
def two_sources(shared_data_dir):
    rng = np.random.default_rng(0)
    parts = {}
    for name, folder in [("retina", "retinamnist"), ("xray", "pneumoniamnist")]:
        splits = load_medmnist_npz(shared_data_dir / folder / f"{folder}.npz", source=name)
        train = splits["train"]
        parts[name] = (train.subset(np.sort(rng.choice(len(train), 300, replace=False))),
                       splits["val"].subset(np.arange(60)))
    train = concatenate([train for train, _ in parts.values()])
    val = concatenate([val for _, val in parts.values()])
    return train, val


@pytest.fixture(scope="module")
def retina_specialist(tmp_path_factory):
    """A fixed tiny embedder standing in for the retina specialist, given as a .keras path."""
    keras.utils.set_random_seed(1)
    path = tmp_path_factory.mktemp("specialists") / "retina.keras"
    Embedder.from_preset("tiny", name="retina_specialist").save(path)
    return path


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
            self.weights = [w.copy() for w in self.model.student.get_weights()]
            raise SimulatedCrash(f"crash after epoch {epoch}")


class WeightsAtStart(keras.callbacks.Callback):
    """Records the student's weights fit() starts from (after BackupAndRestore restored them)."""

    def on_train_begin(self, logs=None):
        self.weights = [w.copy() for w in self.model.student.get_weights()]


def test_distils_resumes_after_a_crash_and_saves_students(two_sources, retina_specialist,
                                                          tmp_path):
    train, val = two_sources
    # retina has a specialist (RKD); xray has none, so it is out of domain (Multi-Similarity).
    settings = dict(specialists={"retina": retina_specialist}, workdir=tmp_path, preset="tiny",
                    epochs=4, steps_per_epoch=25, learning_rate=3e-3, num_classes_per_batch=4,
                    num_per_class=5, source_weights={"retina": 4.0, "xray": 1.0}, verbose=0)
    crash = CrashAfterEpoch(1)
    with pytest.raises(SimulatedCrash):
        train_universal(train, val, callbacks=[crash], **settings)
    assert read_log(tmp_path / "log.csv")["epoch"] == [0.0, 1.0]

    start = WeightsAtStart()
    result = train_universal(train, val, callbacks=[start], **settings)

    assert result.initial_epoch == 2
    for restored, saved in zip(start.weights, crash.weights):
        np.testing.assert_array_equal(restored, saved)
    history = result.history
    assert history["epoch"] == [0.0, 1.0, 2.0, 3.0]
    assert history["rkd_loss"][-1] < history["rkd_loss"][0]
    assert all(np.isfinite(history["ms_loss"]))
    # The same evaluation keys as train_embedder, so the same tables and plots read both.
    assert {"loss", "val_recall@1", "val_recall@8", "val_recall@1_retina",
            "val_recall@1_xray"} <= set(history)
    assert not (tmp_path / "backup").exists()

    assert isinstance(result.model, Embedder)
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    for path in (result.best_path, result.final_path):
        student = keras.saving.load_model(path)
        assert type(student) is Embedder
        assert student.predict(images, verbose=0).shape == (3, 128)
    # best.keras holds the student of the epoch with the highest validation Recall@1.
    best = keras.saving.load_model(result.best_path)
    best_recall = evaluate_retrieval(best, val, resize_size=result.resize_size)["average"]
    assert best_recall["recall@1"] == pytest.approx(max(history["val_recall@1"]), abs=1e-6)
    final = keras.saving.load_model(result.final_path)
    np.testing.assert_allclose(final.predict(images, verbose=0),
                               result.model.predict(images, verbose=0), atol=1e-6)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["task"]["name"] == "distillation"
    assert list(config["task"]["args"]["specialists"]) == ["retina"]  # xray is out of domain
    assert config["task"]["args"]["specialists"]["retina"].endswith("retina.keras")


def test_specialist_of_an_unknown_source_is_named(two_sources, retina_specialist, tmp_path):
    train, val = two_sources
    with pytest.raises(ValueError, match=r"specialists names sources \['derm'\].*'retina', 'xray'"):
        train_universal(train, val, specialists={"derm": retina_specialist},
                        workdir=tmp_path / "run", preset="tiny")
    with pytest.raises(ValueError, match="specialist of 'xray' was not found: .*missing.keras"):
        train_universal(train, val, specialists={"xray": tmp_path / "missing.keras"},
                        workdir=tmp_path / "run", preset="tiny")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_distils_under_mirrored_strategy_with_an_in_memory_specialist(two_sources, tmp_path):
    train, _ = two_sources
    keras.utils.set_random_seed(2)
    xray_specialist = Embedder.from_preset("tiny", embedding_dim=32, name="xray_specialist")
    result = train_universal(train, None, specialists={"xray": xray_specialist},
                             workdir=tmp_path, preset="tiny", epochs=1, steps_per_epoch=3,
                             strategy="mirrored", verbose=0)
    assert result.best_path is None
    assert {"loss", "rkd_loss", "ms_loss"} <= set(result.history)
    assert np.isfinite(result.history["loss"][0])
