import keras
import numpy as np
import pytest

from tfmir.models import ConcatenationEmbedder, Embedder, pca_projection


def _selector(columns, name, width=4):
    """A specialist that returns chosen coordinates of a (1, 1, width) "image" (a fixed Dense)."""
    inputs = keras.Input((1, 1, width))
    flat = keras.layers.Reshape((width,))(inputs)
    outputs = keras.layers.Dense(len(columns), use_bias=False)(flat)
    model = keras.Model(inputs, outputs, name=name)
    kernel = np.zeros((width, len(columns)), np.float32)
    kernel[columns, np.arange(len(columns))] = 1.0
    model.layers[-1].set_weights([kernel])
    return model


def _as_images(features):
    return np.asarray(features, np.float32).reshape(len(features), 1, 1, -1)


@pytest.fixture()
def two_selectors():
    # Specialist "a" sees coordinates 0-1 of the 4-vector, "b" sees 2-3: concatenated, the
    # 4-vector itself comes back.
    return {"a": _selector([0, 1], "a"), "b": _selector([2, 3], "b")}


def test_pca_recovers_a_known_plane_like_an_eigendecomposition_oracle():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(6, 2)))[0].T  # 2 orthonormal rows in R^6
    coefficients = rng.normal(size=(200, 2)) * [3.0, 1.0]
    offset = rng.normal(size=6)
    features = offset + coefficients @ basis
    mean, components = pca_projection(features, 2)
    np.testing.assert_allclose(mean, features.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(components.T @ components, np.eye(2), atol=1e-5)
    # The kept axes span exactly the data's plane.
    np.testing.assert_allclose(components @ components.T, basis.T @ basis, atol=1e-5)
    # Oracle: eigenvectors of the covariance matrix (not an SVD), equal up to sign.
    values, vectors = np.linalg.eigh(np.cov(features, rowvar=False))
    oracle = vectors[:, np.argsort(values)[::-1][:2]]
    np.testing.assert_allclose(np.abs(np.sum(components * oracle, axis=0)), [1.0, 1.0], atol=1e-5)
    # The sign convention: each axis' largest-magnitude entry is positive.
    largest = np.argmax(np.abs(components), axis=0)
    assert np.all(components[largest, [0, 1]] > 0)


def test_pca_arguments_are_checked():
    with pytest.raises(ValueError, match=r"num_components must be an integer in \[1, 3\].*5"):
        pca_projection(np.zeros((4, 3)), 5)
    with pytest.raises(ValueError, match=r"non-empty 2-D.*\(3,\)"):
        pca_projection(np.zeros(3), 1)


def test_hand_derived_output(two_selectors):
    # Training features: mean m plus points (±2, 0) and (0, ±1) in the basis
    # e1 = (1, 1, 0, 0)/√2, e2 = (0, 0, 0.8, -0.6), so the variances are 2 along e1 and 0.5 along
    # e2: PCA gives components (e1, e2) (each one's largest-magnitude entry positive; for e1 the
    # tie goes to either entry, both positive), centred on m.
    m = np.array([1.0, -2.0, 0.5, 3.0])
    e1 = np.array([1.0, 1.0, 0.0, 0.0]) / np.sqrt(2)
    e2 = np.array([0.0, 0.0, 0.8, -0.6])
    train = np.stack([m + 2 * e1, m - 2 * e1, m + e2, m - e2])
    model = ConcatenationEmbedder(two_selectors, embedding_dim=2)
    embeddings = model.specialist_embeddings(_as_images(train))
    np.testing.assert_allclose(embeddings["a"], train[:, :2], atol=1e-6)
    model.fit_projection(embeddings)
    # x = m + 3 e1 + 4 e2 projects to (3, 4), which L2-normalises to (0.6, 0.8); x = m - e1 to
    # (-1, 0).
    queries = np.stack([m + 3 * e1 + 4 * e2, m - e1])
    output = keras.ops.convert_to_numpy(model(_as_images(queries)))
    np.testing.assert_allclose(output, [[0.6, 0.8], [-1.0, 0.0]], atol=1e-5)


def test_config_and_keras_round_trip_with_tiny_embedders(tmp_path):
    keras.utils.set_random_seed(0)
    # Both are called "embedder": the wrapper renames them so they can share one model.
    specialists = {"skin": Embedder.from_preset("tiny"), "xray": Embedder.from_preset("tiny")}
    model = ConcatenationEmbedder(specialists, embedding_dim=8)
    assert [layer.name for layer in model.layers[1:3]] == ["specialist_skin", "specialist_xray"]
    assert model.image_size == 32 and model.specialist_dims == (128, 128)
    images = np.random.default_rng(1).uniform(0, 255, (12, 32, 32, 3)).astype("float32")
    model.fit_projection(model.specialist_embeddings(images))
    expected = model.predict(images, verbose=0)
    assert expected.shape == (12, 8)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)
    # The specialists inside the model are unchanged copies of the originals.
    np.testing.assert_allclose(model.specialists["skin"].predict(images, verbose=0),
                               specialists["skin"].predict(images, verbose=0), atol=1e-6)

    config = model.get_config()
    assert list(config["specialists"]) == ["skin", "xray"] and config["embedding_dim"] == 8
    rebuilt = ConcatenationEmbedder.from_config(config)
    assert rebuilt.count_params() == model.count_params()
    assert model.get_layer("pca").trainable is False

    path = tmp_path / "concatenation.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, ConcatenationEmbedder)
    assert restored.specialist_names == ("skin", "xray")
    np.testing.assert_allclose(restored.predict(images, verbose=0), expected, atol=1e-5)


def test_mismatched_inputs_are_named(two_selectors):
    model = ConcatenationEmbedder(two_selectors, embedding_dim=2)
    four = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match=r"exactly the specialists \('a', 'b'\).*unknown \['c'\]"
                                         r".*for \['b'\]"):
        model.fit_projection({"a": four, "c": four})
    with pytest.raises(ValueError, match=r"specialist 'b' must have shape \(N, 2\).*\(5, 3\)"):
        model.fit_projection({"a": four, "b": np.zeros((5, 3))})
    with pytest.raises(ValueError, match=r"same N images.*'a': 5, 'b': 4"):
        model.fit_projection([four, four[:4]])
    with pytest.raises(ValueError, match=r"one embedding array per specialist \(2"):
        model.fit_projection([four])
    with pytest.raises(ValueError, match=r"components \(4, 2\). Received \(4,\) and \(4, 3\)"):
        model.set_projection(np.zeros(4), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"embedding_dim must be an integer in \[1, 4\].*9"):
        ConcatenationEmbedder(two_selectors, embedding_dim=9)
    wider = _selector([0, 1], "wide", width=5)
    with pytest.raises(ValueError, match=r"same input shape.*a: \(1, 1, 4\).*wide: \(1, 1, 5\)"):
        ConcatenationEmbedder({"a": two_selectors["a"], "wide": wider}, embedding_dim=2)
    with pytest.raises(ValueError, match="must be a keras.Model. Received: str"):
        ConcatenationEmbedder({"a": "skin.keras"})
