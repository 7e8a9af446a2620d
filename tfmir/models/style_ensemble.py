"""Paper 003's ensemble: frozen members, a feature vector and the members' mean Gram matrices."""

from __future__ import annotations

import keras

from tfmir.layers.gram import GramMatrix
from tfmir.models.ensemble_member import EnsembleMember
from tfmir.models.outputs import EMBEDDING, PROBABILITY, gram_output_name

SELU = "selu"


@keras.saving.register_keras_serializable(package="tfmir")
class StyleEnsemble(keras.Model):
    """Frozen `EnsembleMember`s -> GAP -> BN each, concatenated -> Dense(1024, SELU) -> sigmoid.

    The members are trained first (each with the binary focal loss); here they are frozen, their
    batch norms in inference mode, and only the head trains: per member the pooled vector goes
    through its own `BatchNormalization`, the normalised vectors are concatenated, a
    `Dense(feature_dim, activation="selu")` gives the final feature vector and `Dense(1, sigmoid)`
    the melanoma probability. After training the paper drops the sigmoid head; this model keeps
    it as one more output, since the retrieval outputs do not depend on it:

    - `"embedding"`: the (B, feature_dim) SELU feature vector (the paper's FFV);
    - `"gram_1"` .. `"gram_L"`: per style stage (the end of each of EfficientNet's 7 block
      groups), the (B, C_l, C_l) Gram matrix (`tfmir.layers.GramMatrix`: normalised by the number
      of positions) averaged over the members;
    - `"probability"`: (B, 1).

    All outputs are float32.

    Args:
        members: the trained members (same backbone and image size).
        feature_dim: the length of the feature vector (1024 in the paper).
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    ensemble = StyleEnsemble([EnsembleMember.from_preset("tiny") for _ in range(2)])
    outputs = ensemble(np.zeros((2, 32, 32, 3)))  # embedding (2, 1024), gram_1 .. gram_7
    ```

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data using
        Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, Sec. 3.3, Fig. 1-2;
        Gatys et al., "Image Style Transfer Using Convolutional Neural Networks", CVPR 2016.
    """

    def __init__(self, members, feature_dim: int = 1024, **kwargs):
        members = list(members)
        if not members or not all(isinstance(member, EnsembleMember) for member in members):
            raise ValueError("members must be a non-empty list of tfmir.models.EnsembleMember. "
                             f"Received: {[type(member).__name__ for member in members]}")
        shapes = {(member.backbone, member.image_size) for member in members}
        if len(shapes) != 1:
            raise ValueError("every member must have the same backbone and image size. "
                             f"Received (backbone, image_size): {sorted(shapes)}")
        if int(feature_dim) <= 0:
            raise ValueError(f"feature_dim must be positive. Received: feature_dim={feature_dim!r}")
        for member in members:
            member.trainable = False  # frozen: only the head trains
        image_size = members[0].image_size
        stages = members[0].style_stages

        # === Functional Model ===
        images = keras.Input((image_size, image_size, 3), name="images")
        normalised, stage_maps = [], []
        for index, member in enumerate(members):
            *maps, pooled = member.stage_maps(f"member{index}")(images)
            stage_maps.append(maps)
            normalised.append(keras.layers.BatchNormalization(name=f"member{index}_bn")(pooled))
        joined = (keras.layers.Concatenate(name="concatenate")(normalised) if len(members) > 1
                  else normalised[0])
        features = keras.layers.Dense(int(feature_dim), activation=SELU, name="features")(joined)
        embedding = keras.layers.Activation("linear", dtype="float32", name=EMBEDDING)(features)
        probability = keras.layers.Dense(1, activation="sigmoid", dtype="float32",
                                         name=PROBABILITY)(features)
        outputs = {EMBEDDING: embedding, PROBABILITY: probability}
        gram = GramMatrix(name="gram")
        for level, stage in enumerate(stages):
            grams = [gram(maps[level]) for maps in stage_maps]
            name = gram_output_name(level + 1)
            if len(grams) > 1:
                outputs[name] = keras.layers.Average(dtype="float32", name=name)(grams)
            else:
                outputs[name] = keras.layers.Activation("linear", dtype="float32",
                                                        name=name)(grams[0])
        kwargs.setdefault("name", "style_ensemble")
        super().__init__(inputs=images, outputs=outputs, **kwargs)

        self.members = members
        self.feature_dim = int(feature_dim)
        self.image_size = int(image_size)
        self.style_stages = stages

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "members": [keras.saving.serialize_keras_object(member) for member in self.members],
            "feature_dim": self.feature_dim,
        }

    @classmethod
    def from_config(cls, config: dict) -> "StyleEnsemble":
        config = dict(config)
        config["members"] = [keras.saving.deserialize_keras_object(member)
                             for member in config["members"]]
        return cls(**config)
