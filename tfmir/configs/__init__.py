"""Experiment configs: one shape (`Config`) and one named setting per paper configuration.

`get_config("specialist:cpu")` returns paper 000's specialist on the `cpu` setting, and
`get_config("deep_knn:cpu")` paper 001's deep kNN; the part after the colon picks "tiny", "cpu" or
"paper" (the default).
"""

from __future__ import annotations

from tfmir.configs import deep_knn, melanoma, segmenter, universal, ynet
from tfmir.configs.config import (
    Config,
    DataConfig,
    OptimizerConfig,
    SamplerConfig,
    TaskConfig,
    override,
    parse_value,
)

# config name -> function(setting) -> Config
CONFIGS = {
    "specialist": universal.specialist,
    "universal": universal.universal,
    # Paper 001 (deep kNN, Table 2): the deep-kNN loss, its triplet baseline, the weighted-CE CNN.
    "deep_knn": deep_knn.deep_knn,
    "deep_knn_triplet": deep_knn.triplet,
    "deep_knn_classifier": deep_knn.classifier,
    # Paper 002 (Y-Net): the coupled circle + pixel cross-entropy loss, hash codes.
    "ynet": ynet.ynet,
    # Paper 003 (melanoma CBIR): focal-loss ensemble members, then the ensemble head.
    "melanoma_member": melanoma.member,
    "melanoma_ensemble": melanoma.ensemble,
    # Paper 003's segmentation module: R2U-Net + focal Tversky, on PH2 lesions and DRIVE patches.
    "segmenter": segmenter.segmenter,
    "segmenter_drive": segmenter.segmenter_drive,
}


def get_config(name: str) -> Config:
    """The config `NAME[:SETTING]`, e.g. "specialist:cpu" or "universal:tiny".

    Raises:
        ValueError: an unknown name or setting; the message lists the known ones.
    """
    base, _, setting = str(name).partition(":")
    if base not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)} (with an optional "
                         f":tiny, :cpu or :paper). Received: config={name!r}")
    return CONFIGS[base](setting or "paper")


__all__ = ["CONFIGS", "Config", "DataConfig", "OptimizerConfig", "SamplerConfig", "TaskConfig",
           "get_config", "override", "parse_value"]
