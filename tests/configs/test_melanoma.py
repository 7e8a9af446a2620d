"""The melanoma_member and melanoma_ensemble configs (paper 003)."""

import pytest

from tfmir.configs import Config, get_config
from tfmir.configs import melanoma


def test_paper_augmentations_are_the_pipelines():
    from tfmir.data.augmentation import PAPER_AUGMENTATIONS

    assert melanoma.PAPER_AUGMENTATIONS == PAPER_AUGMENTATIONS


@pytest.mark.parametrize("setting", ["tiny", "cpu", "paper"])
def test_settings(setting):
    member = get_config(f"melanoma_member:{setting}")
    ensemble = get_config(f"melanoma_ensemble:{setting}")
    for config in (member, ensemble):
        assert config.task.name == "focal_classification"
        assert config.task.args == {"positive_class": "mel", "alpha": 0.25, "gamma": 2.0}
        assert config.monitor == "val_auc" and config.mode == "max"
        assert Config.from_dict(config.to_dict()) == config
    assert member.task.model["architecture"] == "member"
    assert ensemble.task.model == {"architecture": "ensemble", "members": [], "feature_dim": 1024}
    # Only the paper setting augments beyond crop and flip (the paper's seven).
    assert bool(member.data.augmentations) == (setting == "paper")


def test_paper_setting_is_the_papers():
    model = get_config("melanoma_member:paper").task.model
    assert (model["backbone"], model["image_size"], model["weights"]) == (
        "efficientnet_b6", 384, "imagenet")
    assert melanoma.NUM_MEMBERS["paper"] == 5


def test_unknown_setting():
    with pytest.raises(ValueError, match=r"setting must be one of \('tiny', 'cpu', 'paper'\). "
                                         r"Received: 'gpu'"):
        get_config("melanoma_member:gpu")
