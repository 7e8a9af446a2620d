"""EnsembleMember and StyleEnsemble: presets, output shapes, serialisation and argument checks."""

import keras
import numpy as np
import pytest

from tfmir.models import EnsembleMember, StyleEnsemble, gram_outputs

# The tiny member: a 7-stage small_resnet (widths 8, 8, 8, 16, 16, 16, 16) at 32 px.
TINY_CHANNELS = (8, 8, 8, 16, 16, 16, 16)


def _pixels(seed=0, batch=2):
    return np.random.default_rng(seed).uniform(0, 255, (batch, 32, 32, 3)).astype("float32")


def test_tiny_member_shapes_and_config_round_trip():
    member = EnsembleMember.from_preset("tiny")
    outputs = member(_pixels(), training=False)
    assert outputs["probability"].shape == (2, 1) and outputs["embedding"].shape == (2, 16)
    probability = np.asarray(outputs["probability"])
    assert np.all((probability > 0) & (probability < 1))
    assert member.style_stages == [f"stage{index}" for index in range(1, 8)]
    rebuilt = EnsembleMember.from_config(member.get_config())
    assert rebuilt.get_config() == member.get_config()


def test_single_member_ensemble_has_one_gram_per_stage(tmp_path):
    keras.utils.set_random_seed(0)
    ensemble = StyleEnsemble([EnsembleMember.from_preset("tiny")], feature_dim=32)
    assert gram_outputs(ensemble) == tuple(f"gram_{level}" for level in range(1, 8))
    outputs = ensemble(_pixels(), training=False)
    assert outputs["embedding"].shape == (2, 32)
    for level, channels in enumerate(TINY_CHANNELS, 1):
        gram = np.asarray(outputs[f"gram_{level}"])
        assert gram.shape == (2, channels, channels)
        np.testing.assert_allclose(gram, np.swapaxes(gram, 1, 2), rtol=1e-5, atol=1e-6)
    path = tmp_path / "ensemble.keras"
    ensemble.save(path)
    restored = keras.saving.load_model(path)
    again = restored(_pixels(), training=False)
    for name in outputs:
        np.testing.assert_allclose(np.asarray(again[name]), np.asarray(outputs[name]), atol=1e-5)
    # A restored ensemble keeps its members frozen: only the head trains.
    assert all(not member.trainable for member in restored.members)


@pytest.mark.parametrize("members, message", [
    ([], "members must be a non-empty list of tfmir.models.EnsembleMember"),
    (["member.keras"], r"Received: \['str'\]"),
])
def test_bad_members(members, message):
    with pytest.raises(ValueError, match=message):
        StyleEnsemble(members)


def test_bad_feature_dim():
    with pytest.raises(ValueError, match="feature_dim must be positive. Received: feature_dim=0"):
        StyleEnsemble([EnsembleMember.from_preset("tiny")], feature_dim=0)
