"""Distillation task: each source's teacher inside one compiled step, frozen teachers, the student kept."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.losses import MultiSimilarity, multi_similarity
from tfmir.models import Embedder
from tfmir.tasks import Distillation

SOURCES = ("a", "b", "ood")  # "a" and "b" have specialists, "ood" has none


def numpy_rkd(teacher, student, delta=1.0):
    """Paper 000 eq. 1-3 in NumPy: per-sample mean Huber over pairs j != i."""
    teacher, student = np.asarray(teacher, np.float64), np.asarray(student, np.float64)
    off_diagonal = ~np.eye(len(teacher), dtype=bool)

    def normalised(embeddings):
        distance = np.linalg.norm(embeddings[:, None] - embeddings[None], axis=-1)
        return distance / distance[off_diagonal].mean()

    error = np.abs(normalised(student) - normalised(teacher))
    huber = np.where(error <= delta, 0.5 * error ** 2, delta * (error - 0.5 * delta))
    return np.where(off_diagonal, huber, 0.0).sum(axis=1) / (len(teacher) - 1)


def twin_of(model, name):
    """A separate model with `model`'s architecture and weights."""
    twin = Embedder.from_config({**model.get_config(), "name": name})
    twin.set_weights(model.get_weights())
    return twin


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(0)
    student = Embedder.from_preset("tiny", name="student")
    teacher_a = twin_of(student, "teacher_a")  # embeds exactly like the student
    keras.utils.set_random_seed(1)
    teacher_b = Embedder.from_preset("tiny", embedding_dim=16, name="teacher_b")  # narrower
    return student, teacher_a, teacher_b


@pytest.fixture()
def distiller(models):
    student, teacher_a, teacher_b = models
    return Distillation(twin_of(student, "student"), {"a": teacher_a, "b": teacher_b},
                     source_names=SOURCES)


def batch(seed, size=8):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (size, 32, 32, 3)).astype("float32")
    labels = np.repeat([0, 1], size // 2).astype("int64")
    return images, labels


def source_batches(num_batches, order):
    """A dataset of ({"image"}, {"label", "source"}) batches cycling through `order`."""
    parts = [batch(step) for step in range(num_batches)]
    sources = [np.full(len(parts[0][1]), order[step % len(order)], "int32")
               for step in range(num_batches)]
    return tf.data.Dataset.from_tensor_slices((
        {"image": np.stack([p[0] for p in parts])},
        {"label": np.stack([p[1] for p in parts]), "source": np.stack(sources)}))


def test_each_source_gets_its_own_teacher_or_multi_similarity(distiller, models):
    _, teacher_a, teacher_b = models
    images, labels = batch(0)
    student_embeddings = distiller.student(images, training=False).numpy()
    compiled = tf.function(distiller.distillation_losses)
    for losses in (distiller.distillation_losses, compiled):
        # Teacher a embeds like the student: distances agree exactly, loss 0.
        np.testing.assert_allclose(losses(images, labels, np.zeros(8, "int32")), np.zeros(8),
                                   atol=1e-6)
        np.testing.assert_allclose(
            losses(images, labels, np.ones(8, "int32")),
            numpy_rkd(teacher_b(images, training=False), student_embeddings), rtol=1e-4)
        ood = losses(images, labels, np.full(8, 2, "int32"))
        np.testing.assert_allclose(ood, multi_similarity(labels, student_embeddings), rtol=1e-5)
        np.testing.assert_allclose(ood, MultiSimilarity(reduction=None)(labels, student_embeddings),
                                   rtol=1e-5)
    assert numpy_rkd(teacher_b(images), student_embeddings).mean() > 0.01  # b really differs


@pytest.fixture(scope="module")
def trained(models):
    """One short fit over batches of sources a, b, ood, a, b, ood (a fit compiles for ~10 s)."""
    student, teacher_a, teacher_b = models
    traces, traces_after_batch = [], []

    class CountingDistiller(Distillation):
        def train_step(self, data):
            traces.append(1)  # Python runs once per trace, not once per step
            return super().train_step(data)

    class CountTraces(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            traces_after_batch.append(len(traces))

    distiller = CountingDistiller(twin_of(student, "student"), {"a": teacher_a, "b": teacher_b},
                                  source_names=SOURCES)
    weights_before = {
        "a": [w.copy() for w in teacher_a.get_weights()],
        "b": [w.copy() for w in teacher_b.get_weights()],
        "student": [w.copy() for w in distiller.student.get_weights()],
    }
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(source_batches(6, order=[0, 1, 2]), epochs=1, verbose=0,
                            shuffle=False, callbacks=[CountTraces()]).history
    return {"distiller": distiller, "history": history, "traces": traces_after_batch,
            "weights_before": weights_before}


def test_alternating_sources_never_retrace(trained):
    # Keras traces its step function on the first batch (twice: once more after creating
    # variables); batches of other sources after it must not add any trace.
    traces = trained["traces"]
    assert len(traces) == 6 and traces == [traces[0]] * 6
    distiller = trained["distiller"]
    compiled = tf.function(distiller.distillation_losses)
    images, labels = batch(1)
    for source in [0, 1, 2, 0, 2, 1]:
        compiled(images, labels, tf.fill([8], tf.constant(source, tf.int32)))
    assert compiled.experimental_get_tracing_count() == 1


def test_logs_split_the_loss_by_kind(trained):
    history = trained["history"]
    assert set(history) == {"loss", "rkd_loss", "ms_loss"}
    # 4 batches of a and b (RKD) and 2 of ood (Multi-Similarity): loss is their weighted mean.
    expected = (4 * history["rkd_loss"][0] + 2 * history["ms_loss"][0]) / 6
    assert history["loss"][0] == pytest.approx(expected, rel=1e-4)


def test_teachers_stay_frozen_and_only_the_student_learns(trained, models):
    _, teacher_a, teacher_b = models
    distiller, before = trained["distiller"], trained["weights_before"]
    assert not teacher_a.trainable and not teacher_b.trainable
    assert len(distiller.trainable_weights) == len(distiller.student.trainable_weights)
    for name, model in [("a", teacher_a), ("b", teacher_b)]:
        for after, original in zip(model.get_weights(), before[name]):
            np.testing.assert_array_equal(after, original)  # moving BN statistics included
    assert any(not np.array_equal(after, original) for after, original
               in zip(distiller.student.get_weights(), before["student"]))


def test_student_is_saved_alone_as_an_embedder(trained, tmp_path):
    distiller = trained["distiller"]
    path = tmp_path / "student.keras"
    distiller.student.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored) is Embedder and restored.embedding_dim == 128
    images, _ = batch(3)
    np.testing.assert_allclose(restored.predict(images, verbose=0),
                               distiller.predict({"image": images}, verbose=0), atol=1e-6)


def test_config_round_trip_and_keras_file(distiller, tmp_path):
    config = distiller.get_config()
    assert config["source_names"] == list(SOURCES) and config["delta"] == 1.0
    assert sorted(config["specialists"]) == ["a", "b"]
    rebuilt = Distillation.from_config(config)
    assert rebuilt.source_names == SOURCES and not rebuilt.specialists["b"].trainable
    path = tmp_path / "distiller.keras"
    distiller.save(path)
    restored = keras.saving.load_model(path)
    images, labels = batch(4)
    np.testing.assert_allclose(restored.predict({"image": images}, verbose=0),
                               distiller.predict({"image": images}, verbose=0), atol=1e-6)
    np.testing.assert_allclose(restored.distillation_losses(images, labels, np.ones(8, "int32")),
                               distiller.distillation_losses(images, labels, np.ones(8, "int32")),
                               rtol=1e-5, atol=1e-7)


def test_without_specialists_every_source_uses_multi_similarity(models):
    student = models[0]
    distiller = Distillation(student, {}, source_names=("x", "y"))
    images, labels = batch(5)
    np.testing.assert_allclose(distiller.distillation_losses(images, labels, np.ones(8, "int32")),
                               multi_similarity(labels, student(images, training=False)),
                               rtol=1e-5)
    distiller.compile(optimizer="adam")  # Keras' loss tracker comes with compile()
    assert [metric.name for metric in distiller.metrics] == ["loss", "ms_loss"]
    assert np.isnan(float(distiller.ms_loss_tracker.result()))  # no batch yet: not measured, not 0


def test_invalid_arguments_are_named(models):
    student, teacher_a, _ = models
    with pytest.raises(ValueError, match=r"specialists names sources \['ct'\]"):
        Distillation(student, {"ct": teacher_a}, source_names=("a", "b"))
    with pytest.raises(ValueError, match="the specialist of 'a' is the student itself"):
        Distillation(student, {"a": student}, source_names=("a",))
    other_size = Embedder.from_preset("tiny", image_size=48)
    with pytest.raises(ValueError, match=r"specialist of 'a' takes inputs of shape \(48, 48, 3\)"):
        Distillation(student, {"a": other_size}, source_names=("a",))
    with pytest.raises(ValueError, match="distinct names"):
        Distillation(student, {}, source_names=("a", "a"))
    distiller = Distillation(student, {}, source_names=("a", "b"))
    images, labels = batch(6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must come from one source"):
        distiller.distillation_losses(images, labels, np.array([0] * 7 + [1], "int32"))
