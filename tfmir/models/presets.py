"""Named settings for the embedder: the paper's, one that finishes on a CPU, and a tiny one for tests.

Each preset holds the `Embedder` arguments (`"model"`), the input pipeline sizes (`"data"`) and the
training schedule (`"training"`). Batches are c classes × k images (k = 5 in the paper).
"""

from __future__ import annotations

import copy

PRESETS = {
    # Builds and trains a step in about a second on a CPU; for tests only.
    "tiny": {
        "model": {"backbone": "small_resnet", "backbone_widths": (8, 16), "embedding_dim": 128,
                  "image_size": 32, "weights": None},
        "data": {"resize_size": 36},
        "training": {"num_classes_per_batch": 4, "num_per_class": 5, "learning_rate": 1e-3,
                     "epochs": 2, "steps_per_epoch": 5},
    },
    # Trains from scratch on a 2-core CPU in minutes (MedMNIST-size images upsampled to 64).
    "cpu": {
        "model": {"backbone": "small_resnet", "backbone_widths": (16, 32, 64, 128),
                  "embedding_dim": 128, "image_size": 64, "weights": None},
        "data": {"resize_size": 72},
        # From scratch, larger learning rates drive Multi-Similarity into the collapsed state
        # (all embeddings equal) on classes that overlap, such as RetinaMNIST's grades.
        "training": {"num_classes_per_batch": 12, "num_per_class": 5, "learning_rate": 3e-4,
                     "epochs": 8, "steps_per_epoch": 100},
    },
    # Paper 000, Sec. IV-B: ImageNet ResNet50 -> Dense(128) -> L2; 256 -> random crop 224 + flip;
    # batch 130 (26 classes × 5); Adam, learning rate 1e-5.
    "paper": {
        "model": {"backbone": "resnet50", "backbone_widths": None, "embedding_dim": 128,
                  "image_size": 224, "weights": "imagenet"},
        "data": {"resize_size": 256},
        "training": {"num_classes_per_batch": 26, "num_per_class": 5, "learning_rate": 1e-5,
                     "epochs": 50, "steps_per_epoch": 200},
    },
}


def get_preset(name: str) -> dict:
    """Returns a deep copy of preset `name` (`"tiny"`, `"cpu"` or `"paper"`)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}. Received: preset={name!r}")
    return copy.deepcopy(PRESETS[name])
