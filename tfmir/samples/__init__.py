"""The small real sample shipped with tfmir (MedMNIST v2, CC BY 4.0): retina and chest X-ray.

See README.md, LICENSE and CITATION.md in this folder.
"""

from __future__ import annotations

import pathlib

SAMPLE_DIR = pathlib.Path(__file__).resolve().parent

# source name -> (file, class names)
SAMPLES = {
    "retina": ("retinamnist.npz", ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4")),
    "xray": ("pneumoniamnist_sample.npz", ("normal", "pneumonia")),
}


def sample_path(source: str) -> pathlib.Path:
    """Path of the shipped `.npz` for `source` ("retina" or "xray")."""
    if source not in SAMPLES:
        raise ValueError(f"sample source must be one of {tuple(SAMPLES)}. Received: {source!r}")
    return SAMPLE_DIR / SAMPLES[source][0]


def load_sample(sources=None) -> dict:
    """Loads the shipped sample as {"train", "val", "test"} -> `tfmir.data.Examples`.

    Args:
        sources: the sources to load (default: all of `SAMPLES`); several are concatenated with
            their classes kept apart ("retina/grade 0", "xray/normal", ...).

    Returns:
        The official MedMNIST splits of the chosen sources.
    """
    from tfmir.data import concatenate, load_medmnist_npz

    sources = tuple(sources or SAMPLES)
    parts = [load_medmnist_npz(sample_path(source), source=source, class_names=SAMPLES[source][1])
             for source in sources]
    if len(parts) == 1:
        return parts[0]
    return {split: concatenate([part[split] for part in parts]) for split in ("train", "val", "test")}
