"""Backbones with pretrained weights converted from public checkpoints, read without torch."""

from tfmir.models.pretrained.efficientnet_lite import VARIANTS, efficientnet_lite
from tfmir.models.pretrained.torch_checkpoint import load_torch_checkpoint

__all__ = ["VARIANTS", "efficientnet_lite", "load_torch_checkpoint"]
