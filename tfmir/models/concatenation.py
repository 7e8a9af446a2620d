"""The k-way Concatenation baseline: specialists' embeddings side by side, reduced by PCA.

One input image goes through every specialist; their unit-length embeddings are concatenated,
centred on the training mean, projected onto the training set's leading principal axes, and
L2-normalised. The projection is a fixed (non-trainable) Dense layer, so the result is an ordinary
Keras embedder: it saves to `.keras`, exports and indexes like `Embedder`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
import numpy as np


def pca_projection(features, num_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and leading principal axes of `features` (NumPy SVD in float64).

    The fit runs once, offline, on a few thousand vectors, so NumPy's float64 SVD is used rather
    than `keras.ops`: it is exact, deterministic and backend-independent, and nothing needs a
    gradient. Each axis' sign is fixed so that its largest-magnitude entry is positive (as
    scikit-learn's `svd_flip` does), which makes the result reproducible.

    Args:
        features: (N, D) array, N >= 1.
        num_components: how many axes to keep, 1 <= num_components <= D.

    Returns:
        `(mean, components)`: float32 (D,) and float32 (D, num_components) with orthonormal
        columns, in decreasing order of explained variance; project with
        `(x - mean) @ components`.

    Example:

    ```python
    mean, components = pca_projection(np.random.randn(100, 6), 2)
    components.shape  # (6, 2)
    ```
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError("features must be a non-empty 2-D array (N, D). "
                         f"Received shape {features.shape}")
    dimension = features.shape[1]
    if not isinstance(num_components, (int, np.integer)) or not 1 <= num_components <= dimension:
        raise ValueError(f"num_components must be an integer in [1, {dimension}] (the feature "
                         f"dimension). Received: num_components={num_components!r}")
    mean = features.mean(axis=0)
    # Rows of vt are the principal axes; with fewer samples than components the trailing axes
    # span the null space (zero variance), which full_matrices=True still provides.
    _, _, vt = np.linalg.svd(features - mean, full_matrices=True)
    components = vt[:num_components].T
    largest = np.argmax(np.abs(components), axis=0)
    components *= np.sign(components[largest, np.arange(num_components)])
    return mean.astype(np.float32), components.astype(np.float32)


@keras.saving.register_keras_serializable(package="tfmir")
class ConcatenationEmbedder(keras.Model):
    """k specialists → concatenated embeddings → PCA to `embedding_dim` → L2 normalisation.

    Paper 000's "k-way Concatenation" baseline: an ensemble of the specialist retrieval models
    whose concatenated embedding is brought back to 128 dimensions by PCA "to make the comparison
    fair". The PCA is fitted on the concatenated embeddings of the training splits
    (`fit_projection`), mean-centred. The paper does not say whether the projected vector is
    normalised; here it is L2-normalised, like every other tfmir embedder, so the model is a
    drop-in embedder for cosine/dot-product indexes. (Ranking by cosine similarity is unchanged
    by that normalisation; only Euclidean and dot-product scores change.)

    Until `fit_projection` or `set_projection` is called, the projection is the identity on the
    first `embedding_dim` concatenated coordinates.

    Input: float pixels in [0, 255], shape (batch, image_size, image_size, 3), passed unchanged to
    every specialist. Output: float32 (batch, embedding_dim), unit length.

    Args:
        specialists: {name: keras.Model} (the concatenation order is the mapping's order) or a
            sequence of models (named "specialist_0", ...). All must take the same square RGB
            input and return one vector per image. A model whose name is not
            "specialist_<name>" is rebuilt under that name (from its config, with its weights)
            so that several `Embedder`s, all called "embedder", can sit in one model.
        embedding_dim: the PCA dimension (128 in the paper).
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    model = ConcatenationEmbedder({"skin": skin, "retina": retina, "xray": xray})
    model.fit_projection(model.specialist_embeddings(train_images))
    embeddings = model.predict(test_images)  # (N, 128), unit length
    ```

    Reference:
        Feng, Liu, Luo, "Universal Model for Multi-Domain Medical Image Retrieval", Sec. IV-B (the
        "Concatenation" baseline, PCA to 128-d), https://arxiv.org/abs/2007.08628
    """

    def __init__(self, specialists, embedding_dim: int = 128, **kwargs):
        if isinstance(specialists, Mapping):
            named = [(str(name), model) for name, model in specialists.items()]
        elif isinstance(specialists, Sequence) and not isinstance(specialists, str):
            named = [(f"specialist_{index}", model) for index, model in enumerate(specialists)]
        else:
            raise ValueError("specialists must be a {name: keras.Model} mapping or a sequence of "
                             f"models. Received: {type(specialists).__name__}")
        if not named:
            raise ValueError("specialists must hold at least one model. Received none")
        for name, model in named:
            if not isinstance(model, keras.Model):
                raise ValueError(f"specialist {name!r} must be a keras.Model. Received: "
                                 f"{type(model).__name__}")
        input_shapes = {name: tuple(model.inputs[0].shape[1:]) for name, model in named}
        output_dims = {name: int(model.outputs[0].shape[-1]) for name, model in named}
        if len(set(input_shapes.values())) != 1:
            described = ", ".join(f"{name}: {shape}" for name, shape in input_shapes.items())
            raise ValueError(f"all specialists must take the same input shape. Received: "
                             f"{described}")
        input_shape = next(iter(input_shapes.values()))
        if len(input_shape) != 3 or input_shape[0] != input_shape[1] or input_shape[0] is None:
            raise ValueError(f"specialists must take square images (S, S, C). Received input "
                             f"shape {input_shape}")
        total_dim = sum(output_dims.values())
        if not isinstance(embedding_dim, (int, np.integer)) or not 1 <= embedding_dim <= total_dim:
            raise ValueError(f"embedding_dim must be an integer in [1, {total_dim}] (the "
                             f"concatenated dimension). Received: embedding_dim={embedding_dim!r}")
        layers = {name: _named(model, f"specialist_{name}") for name, model in named}

        # === Functional Model ===
        images = keras.Input(input_shape, name="images")
        parts = [layers[name](images) for name, _ in named]
        joined = (keras.layers.Concatenate(name="concatenation")(parts) if len(parts) > 1
                  else parts[0])
        projected = keras.layers.Dense(embedding_dim, trainable=False, dtype="float32",
                                       name="pca")(joined)
        embeddings = keras.layers.UnitNormalization(axis=-1, dtype="float32", name="l2")(projected)
        kwargs.setdefault("name", "concatenation_embedder")
        super().__init__(inputs=images, outputs=embeddings, **kwargs)

        self.specialist_names = tuple(name for name, _ in named)
        self.specialist_dims = tuple(output_dims[name] for name in self.specialist_names)
        self.embedding_dim = int(embedding_dim)
        self.image_size = int(input_shape[0])
        self._specialist_layers = [layers[name] for name in self.specialist_names]
        self.set_projection(np.zeros(total_dim, np.float32),
                            np.eye(total_dim, self.embedding_dim, dtype=np.float32))

    @property
    def specialists(self) -> dict:
        """{name: the specialist model inside this one}, in concatenation order."""
        return dict(zip(self.specialist_names, self._specialist_layers))

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "specialists": {name: keras.saving.serialize_keras_object(model)
                            for name, model in self.specialists.items()},
            "embedding_dim": self.embedding_dim,
        }

    @classmethod
    def from_config(cls, config: dict) -> "ConcatenationEmbedder":
        config = dict(config)
        config["specialists"] = {name: keras.saving.deserialize_keras_object(serialized)
                                 for name, serialized in config["specialists"].items()}
        return cls(**config)

    def specialist_embeddings(self, images, batch_size: int = 256) -> dict:
        """Each specialist's embeddings of `images` (N, S, S, 3): {name: (N, D_name) float32}."""
        return {name: np.asarray(model.predict(images, batch_size=batch_size, verbose=0),
                                 dtype=np.float32)
                for name, model in self.specialists.items()}

    def concatenate_embeddings(self, embeddings) -> np.ndarray:
        """Joins per-specialist embeddings into the (N, sum of D) input of the projection.

        Args:
            embeddings: {name: (N, D_name)} naming every specialist, or a sequence of arrays in
                concatenation order.

        Returns:
            float32 (N, sum of D).
        """
        if isinstance(embeddings, Mapping):
            given = set(map(str, embeddings))
            unknown = sorted(given - set(self.specialist_names))
            missing = sorted(set(self.specialist_names) - given)
            if unknown or missing:
                raise ValueError(f"embeddings must name exactly the specialists "
                                 f"{self.specialist_names}. Received unknown {unknown} and no "
                                 f"embeddings for {missing}")
            arrays = [np.asarray(embeddings[name], np.float32) for name in self.specialist_names]
        else:
            arrays = [np.asarray(array, np.float32) for array in embeddings]
            if len(arrays) != len(self.specialist_names):
                raise ValueError(f"expected one embedding array per specialist "
                                 f"({len(self.specialist_names)}: {self.specialist_names}). "
                                 f"Received {len(arrays)}")
        for name, dim, array in zip(self.specialist_names, self.specialist_dims, arrays):
            if array.ndim != 2 or array.shape[1] != dim:
                raise ValueError(f"embeddings of specialist {name!r} must have shape (N, {dim}). "
                                 f"Received shape {array.shape}")
        counts = {name: len(array) for name, array in zip(self.specialist_names, arrays)}
        if len(set(counts.values())) != 1:
            raise ValueError(f"every specialist must embed the same N images. Received counts "
                             f"{counts}")
        return np.concatenate(arrays, axis=1)

    def fit_projection(self, embeddings) -> "ConcatenationEmbedder":
        """Fits the PCA on training embeddings and stores it in the projection layer.

        Args:
            embeddings: the specialists' embeddings of the training images, as accepted by
                `concatenate_embeddings` (a {name: (N, D_name)} dict or a sequence), with
                N >= 2.

        Returns:
            self.
        """
        features = self.concatenate_embeddings(embeddings)
        if len(features) < 2:
            raise ValueError(f"PCA needs at least 2 training embeddings. Received {len(features)}")
        self.set_projection(*pca_projection(features, self.embedding_dim))
        return self

    def set_projection(self, mean, components) -> None:
        """Sets the projection to `(x - mean) @ components`.

        Args:
            mean: (sum of D,) the training mean of the concatenated embeddings.
            components: (sum of D, embedding_dim) the principal axes as columns.
        """
        total_dim = sum(self.specialist_dims)
        mean = np.asarray(mean, np.float32)
        components = np.asarray(components, np.float32)
        if mean.shape != (total_dim,) or components.shape != (total_dim, self.embedding_dim):
            raise ValueError(f"mean must have shape ({total_dim},) and components "
                             f"({total_dim}, {self.embedding_dim}). Received {mean.shape} and "
                             f"{components.shape}")
        # (x - mean) W = x W + (-mean W): one affine layer holds the centring and the projection.
        self.get_layer("pca").set_weights([components, -mean @ components])


def _named(model: keras.Model, name: str) -> keras.Model:
    """`model`, or a copy of it (same config and weights) called `name`."""
    if model.name == name:
        return model
    config = model.get_config()
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"specialist {model.name!r} cannot be renamed to {name!r}: its "
                         "get_config() has no 'name'. Pass it already named "
                         f"{name!r}")
    copy = model.__class__.from_config({**config, "name": name})
    copy.set_weights(model.get_weights())
    return copy
