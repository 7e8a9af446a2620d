"""Retrieval models."""

from tfmir.models.backbones import BACKBONES, build_backbone, feature_extractor
from tfmir.models.concatenation import ConcatenationEmbedder, pca_projection
from tfmir.models.embedder import Embedder
from tfmir.models.ensemble_member import EnsembleMember
from tfmir.models.outputs import (CODE, EMBEDDING, FLOAT, HASH, MASK, OUTPUT_KINDS, PROBABILITY,
                                  gram_output_name, gram_outputs, has_mask, output_names,
                                  output_shape, retrieval_output, select_output)
from tfmir.models.pretrained import efficientnet_lite, load_torch_checkpoint
from tfmir.models.r2unet import R2UNet
from tfmir.models.style_ensemble import StyleEnsemble
from tfmir.models.tiling import segment_tiled
from tfmir.models.ynet import YNet

__all__ = ["BACKBONES", "CODE", "EMBEDDING", "FLOAT", "HASH", "MASK", "OUTPUT_KINDS",
           "PROBABILITY", "R2UNet", "ConcatenationEmbedder", "Embedder", "EnsembleMember",
           "StyleEnsemble",
           "build_backbone", "efficientnet_lite", "feature_extractor", "gram_output_name",
           "gram_outputs", "has_mask", "load_torch_checkpoint", "output_names",
           "output_shape", "pca_projection", "retrieval_output", "segment_tiled",
           "select_output", "YNet"]
