"""Builds the demo sample shipped in `tfmir/samples/` from the MedMNIST files (CC BY 4.0).

RetinaMNIST is shipped whole (the official 28×28 file, byte for byte). PneumoniaMNIST is cut to a
stratified, seeded subset so that the sample stays under 5 MB: each official split keeps its own
images, in the proportion of its classes.

    python tools/make_sample.py --retinamnist=PATH/retinamnist.npz \
        --pneumoniamnist=PATH/pneumoniamnist.npz --output_dir=tfmir/samples
"""

import hashlib
import os
import shutil

import numpy as np
from absl import app, flags

_RETINA = flags.DEFINE_string("retinamnist", None, "Official retinamnist.npz (28×28).", required=True)
_PNEUMONIA = flags.DEFINE_string("pneumoniamnist", None, "pneumoniamnist.npz (28×28).", required=True)
_OUTPUT = flags.DEFINE_string("output_dir", "tfmir/samples", "Where to write the sample.")
_SIZES = {"train": 1200, "val": 200, "test": 400}


def stratified_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts / counts.sum() * size).astype(int)
    quotas[: size - quotas.sum()] += 1
    keep = [rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quotas)]
    return np.sort(np.concatenate(keep))


def main(argv):
    del argv
    os.makedirs(_OUTPUT.value, exist_ok=True)
    shutil.copyfile(_RETINA.value, os.path.join(_OUTPUT.value, "retinamnist.npz"))
    source = np.load(_PNEUMONIA.value)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, size in _SIZES.items():
        labels = source[f"{split}_labels"].reshape(-1)
        keep = stratified_subset(labels, size, rng)
        arrays[f"{split}_images"] = source[f"{split}_images"][keep]
        arrays[f"{split}_labels"] = source[f"{split}_labels"][keep]
    output = os.path.join(_OUTPUT.value, "pneumoniamnist_sample.npz")
    np.savez_compressed(output, **arrays)
    for name in ("retinamnist.npz", "pneumoniamnist_sample.npz"):
        path = os.path.join(_OUTPUT.value, name)
        digest = hashlib.md5(open(path, "rb").read()).hexdigest()
        print(f"{path}: {os.path.getsize(path)} bytes, md5 {digest}")


if __name__ == "__main__":
    app.run(main)
