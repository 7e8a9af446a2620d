"""Stand-in models for tests of what consumes model outputs (evaluators, export, index, serving).

`hash_model` has the outputs of paper 002's deployable Y-Net without its size: a functional
`keras.Model` from (B, S, S, 3) pixels in [0, 255] to {"code": (B, k) tanh values, "mask":
(B, S, S, 1) sigmoid probabilities}, built from stock Keras layers only, so its `.keras` file
loads with nothing registered.
"""

import keras


def hash_model(num_bits: int = 36, image_size: int = 16, *, with_mask: bool = True,
               seed: int = 0) -> keras.Model:
    """A tiny hashing model: conv features -> pooled per image quarter -> Dense(num_bits, tanh)
    ["code"], and a 1×1 conv of the same features -> sigmoid ["mask"] (omitted with
    `with_mask=False`). `image_size` must be even."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((image_size, image_size, 3), name="images")
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(images)
    features = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(scaled)
    # Pooled per quarter of the image, so the code sees layout as well as colour.
    pooled = keras.layers.Flatten()(keras.layers.AveragePooling2D(image_size // 2)(features))
    # A wide initialisation spreads the tanh values away from 0, so no bit sits on a rounding edge.
    codes = keras.layers.Dense(num_bits, activation="tanh", name="code",
                               kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
                               bias_initializer=keras.initializers.RandomNormal(stddev=0.5))(pooled)
    outputs = {"code": codes}
    if with_mask:
        outputs["mask"] = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(features)
    return keras.Model(images, outputs, name="hash_stand_in")
