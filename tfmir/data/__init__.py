"""Data: MedMNIST / image-folder / CSV readers, splits, samplers and the tf.data pipeline."""

from tfmir.data.datasets import (
    IMAGE_EXTENSIONS,
    MEDMNIST_CLASS_NAMES,
    MEDMNIST_MD5,
    MEDMNIST_URL,
    Examples,
    concatenate,
    default_data_dir,
    downsample_top_classes,
    find_unreadable,
    keep_single_label,
    load_csv_manifest,
    load_image_folder,
    load_medmnist,
    load_medmnist_npz,
    medmnist_file_name,
    split_by_column,
    split_examples,
)
from tfmir.data.pipeline import decode_image, make_dataset, preprocess_image, read_image_file
from tfmir.data.samplers import ClassBalancedSampler, SourceAwareSampler

__all__ = [
    "IMAGE_EXTENSIONS",
    "MEDMNIST_CLASS_NAMES",
    "MEDMNIST_MD5",
    "MEDMNIST_URL",
    "ClassBalancedSampler",
    "Examples",
    "SourceAwareSampler",
    "concatenate",
    "decode_image",
    "default_data_dir",
    "downsample_top_classes",
    "find_unreadable",
    "keep_single_label",
    "load_csv_manifest",
    "load_image_folder",
    "load_medmnist",
    "load_medmnist_npz",
    "make_dataset",
    "medmnist_file_name",
    "preprocess_image",
    "read_image_file",
    "split_by_column",
    "split_examples",
]
