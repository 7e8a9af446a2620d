"""Turns a dataset description given on a command line into train/val/test `Examples`.

A spec is `[source=]location`, where location is one of:
  - `sample` or `sample:retina`, `sample:xray`: the demo sample shipped with tfmir;
  - `medmnist:NAME` or `medmnist:NAME@SIZE`: a MedMNIST set in the data folder (downloaded with
    `download=True`);
  - a `.npz` file in the MedMNIST layout (official splits);
  - a `.csv` manifest (`path,label[,source][,mask][,split]`; split 2:1:1 when it has no `split`);
    other header names follow a `#`: `labels.csv#path=image,label=diagnosis_name,mask=mask`
    reads those columns (`load_csv_manifest`'s `columns`);
  - a folder with one sub-folder per class (split 2:1:1).
"""

from __future__ import annotations

import os

from tfmir.data.datasets import (
    Examples,
    concatenate,
    load_csv_manifest,
    load_image_folder,
    load_medmnist,
    load_medmnist_npz,
    split_by_column,
    split_examples,
)

SPLITS = ("train", "val", "test")


def load_spec(spec: str, *, data_dir: str | None = None, download: bool = False,
              strict: bool = False, seed: int = 0, ratios=(2, 1, 1)) -> dict[str, Examples]:
    """Loads one dataset spec (see the module docstring) as {"train", "val", "test"}.

    Args:
        spec: the dataset description.
        data_dir: where MedMNIST files live (for `medmnist:` specs).
        download: fetch a missing MedMNIST file.
        strict: refuse (instead of skip) unreadable image files.
        seed: seed of the 2:1:1 split for folders and manifests without a split column.
        ratios: train:val:test ratios for those.

    Returns:
        The three splits.
    """
    source, separator, location = spec.partition("=")
    if not separator or os.sep in source or ":" in source:  # a path that merely contains "="
        source, location = None, spec
    if location == "sample" or location.startswith("sample:"):
        from tfmir.samples import load_sample

        if source is not None:
            raise ValueError(f"the shipped sample names its own sources (retina, xray); drop "
                             f"{source!r}= from the spec {spec!r}.")
        names = location.split(":", 1)[1].split("+") if ":" in location else None
        splits = load_sample(names)
    elif location.startswith("medmnist:"):
        name, _, size = location[len("medmnist:"):].partition("@")
        splits = load_medmnist(name, data_dir=data_dir, size=int(size or 28), download=download,
                               source=source)
    elif location.endswith(".npz"):
        splits = load_medmnist_npz(location, source=source)
    elif location.endswith(".csv") or ".csv#" in location:
        location, _, mapping = location.partition("#")
        examples = load_csv_manifest(location, strict=strict, source=source,
                                     columns=_csv_columns(mapping, spec) if mapping else None)
        splits = (split_by_column(examples) if examples.splits is not None
                  else split_examples(examples, ratios, seed=seed))
    elif os.path.isdir(location):
        splits = split_examples(load_image_folder(location, source=source, strict=strict), ratios,
                                seed=seed)
    else:
        raise ValueError(
            f"dataset spec {spec!r} is not a sample, medmnist:NAME, .npz, .csv or an existing "
            "folder. Expected [source=]location, e.g. retina=data/retinamnist.npz."
        )
    missing = [split for split in SPLITS if split not in splits or len(splits[split]) == 0]
    if missing:
        raise ValueError(f"dataset spec {spec!r} has empty or missing split(s): {missing}")
    return {split: splits[split] for split in SPLITS}


def _csv_columns(mapping: str, spec: str) -> dict[str, str]:
    """{tfmir name: header} from "path=image,label=dx" (the part of a spec after "#")."""
    columns = {}
    for pair in mapping.split(","):
        name, separator, header = pair.partition("=")
        if not separator or not name.strip() or not header.strip():
            raise ValueError(f"dataset spec {spec!r}: the part after '#' must be "
                             f"name=header pairs separated by commas, e.g. "
                             f"'#path=image,label=dx'. Received {pair!r}")
        columns[name.strip()] = header.strip()
    return columns


def load_specs(specs, **kwargs) -> dict[str, Examples]:
    """Loads several specs and joins them split by split (classes of different specs kept apart)."""
    specs = list(specs)
    if not specs:
        raise ValueError("at least one dataset spec is needed (e.g. --data=sample).")
    loaded = [load_spec(spec, **kwargs) for spec in specs]
    if len(loaded) == 1:
        return loaded[0]
    return {split: concatenate([part[split] for part in loaded]) for split in SPLITS}
