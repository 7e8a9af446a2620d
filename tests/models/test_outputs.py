"""`tfmir.models.outputs`: which output retrieval, hashing and segmentation read."""

import keras
import numpy as np
import pytest

from tests.models.stand_ins import hash_model
from tfmir.models import (CODE, EMBEDDING, MASK, Embedder, has_mask, output_names, output_shape,
                          retrieval_output, select_output)


def _dict_model(**heads):
    images = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(images)
    return keras.Model(images, {name: keras.layers.Dense(size)(pooled)
                                for name, size in heads.items()})


def test_a_single_output_model_retrieves_with_its_embedding():
    embedder = Embedder.from_preset("tiny")
    assert output_names(embedder) == ()
    assert retrieval_output(embedder) == (EMBEDDING, "float")
    assert not has_mask(embedder)
    assert output_shape(embedder, EMBEDDING) == (None, 128)
    # A Sequential model that was never called has no `output` yet; it is a single-output model.
    sequential = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert retrieval_output(sequential) == (EMBEDDING, "float")
    assert output_shape(sequential, MASK) == (None, 3)  # its one output answers every name


def test_dict_models_retrieve_with_their_code_or_embedding():
    hasher = hash_model(num_bits=36, image_size=16)
    assert output_names(hasher) == (CODE, MASK)
    assert retrieval_output(hasher) == (CODE, "hash") and has_mask(hasher)
    assert output_shape(hasher, CODE) == (None, 36)
    assert output_shape(hasher, MASK) == (None, 16, 16, 1)
    assert retrieval_output(hash_model(64, with_mask=False)) == (CODE, "hash")
    assert not has_mask(hash_model(64, with_mask=False))
    assert retrieval_output(_dict_model(embedding=4, mask=1)) == (EMBEDDING, "float")
    # A model that outputs a code is a hashing model, whatever else it outputs.
    assert retrieval_output(_dict_model(embedding=4, code=8)) == (CODE, "hash")


def test_a_dict_model_without_a_retrieval_output_is_refused_by_name():
    model = _dict_model(logits=3, mask=1)
    with pytest.raises(ValueError, match=r"expected an 'embedding' or a 'code' output. Received "
                                         r"a model with outputs \['logits', 'mask'\]"):
        retrieval_output(model)
    with pytest.raises(ValueError, match=r"no 'code' output. Received a model with outputs "
                                         r"\['logits', 'mask'\]"):
        output_shape(model, CODE)


def test_select_output():
    codes, masks = np.ones((2, 4)), np.zeros((2, 8, 8, 1))
    assert select_output({CODE: codes, MASK: masks}, MASK) is masks
    assert select_output(codes, MASK) is codes  # a single output answers every name
    with pytest.raises(ValueError, match=r"no 'mask' output. Received a model with outputs "
                                         r"\['code'\]"):
        select_output({CODE: codes}, MASK)


def test_the_hash_stand_in_saves_and_loads_with_nothing_registered(tmp_path):
    hasher = hash_model(num_bits=36, image_size=16)
    hasher.save(tmp_path / "hasher.keras")
    loaded = keras.saving.load_model(tmp_path / "hasher.keras")
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    expected, actual = hasher(pixels), loaded(pixels)
    assert retrieval_output(loaded) == (CODE, "hash") and has_mask(loaded)
    for name in (CODE, MASK):
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-6)
