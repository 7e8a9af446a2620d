"""What every experiment does with its runs: train once, resume, cache outputs, record wall time.

Imported by the experiment scripts beside it (`python experiments/<name>.py` puts this folder on
`sys.path`).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
from absl import logging

# The shared data folder sits beside the repository: <root>/main (this repository) and
# <root>/shared/data.
DEFAULT_DATA_ROOT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run_settings(smoke_defaults: dict) -> tuple:
    """(smoke, setting, seed, epochs, steps, num_resamples) from the flags every experiment
    defines (--smoke, --config, --seed, --epochs, --steps_per_epoch, --num_resamples): --smoke
    means the tiny config unless --config is given, and `smoke_defaults`' schedule and bootstrap
    size unless those flags are given."""
    from absl import flags

    values = flags.FLAGS
    smoke = values.smoke
    setting = "tiny" if smoke and not values["config"].present else values.config
    epochs = values.epochs or (smoke_defaults["epochs"] if smoke else None)
    steps = values.steps_per_epoch or (smoke_defaults["steps_per_epoch"] if smoke else None)
    num_resamples = (smoke_defaults["num_resamples"]
                     if smoke and not values["num_resamples"].present else values.num_resamples)
    return smoke, setting, values.seed, epochs, steps, num_resamples


def checkpoint(run_dir: pathlib.Path) -> pathlib.Path:
    """The model to evaluate: the best checkpoint when there is one, else the final model."""
    best = run_dir / "best.keras"
    return best if best.exists() else run_dir / "final.keras"


def run_once(run_dir: pathlib.Path, train_function, required=("final.keras",)) -> dict:
    """Calls `train_function()` unless every `required` file of `run_dir` exists; records the
    wall time in `run_dir/timing.json`."""
    record_path = run_dir / "timing.json"
    if all((run_dir / name).exists() for name in required):
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        logging.info("%s is finished; skipped.", run_dir)
        return {**record, "skipped": True}
    print(f"Running {run_dir.parent.name}/{run_dir.name} ...", flush=True)
    start = time.time()
    resumed_from_epoch = train_function()
    record = {"seconds": round(time.time() - start, 1), "resumed_from_epoch": resumed_from_epoch}
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"  {run_dir.parent.name}/{run_dir.name}: {record['seconds']:.0f} s", flush=True)
    return {**record, "skipped": False}


def best_task_checkpoint(path: pathlib.Path, config, log_path: pathlib.Path):
    """A callback saving the whole task (e.g. a classifier with its head, a Y-Net with both
    branches) whenever the run's monitor improves, beside the core's best.keras (its deployable
    model), so both come from the same epoch; a resumed run keeps the best value so far."""
    import keras

    from tfmir.training import read_log

    previous = [value for value in read_log(log_path).get(config.monitor, [])
                if np.isfinite(value)]
    best_so_far = (max if config.mode == "max" else min)(previous) if previous else None
    return keras.callbacks.ModelCheckpoint(str(path), monitor=config.monitor, mode=config.mode,
                                           save_best_only=True,
                                           initial_value_threshold=best_so_far)


def cached_outputs(cache: pathlib.Path, fingerprint: str, splits: dict, compute) -> dict:
    """{split: outputs}, read from `cache` when it was written for the same fingerprint and item
    ids, else `compute(split_examples)` per split and stored."""
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) == fingerprint and all(
                    f"{split}_ids" in stored and np.array_equal(stored[f"{split}_ids"],
                                                                splits[split].ids)
                    for split in splits):
                return {split: stored[split] for split in splits}
    outputs = {split: compute(examples) for split, examples in splits.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(".tmp.npz")
    np.savez(temporary, fingerprint=fingerprint, **outputs,
             **{f"{split}_ids": examples.ids for split, examples in splits.items()})
    os.replace(temporary, cache)
    return outputs


def file_fingerprint(path: pathlib.Path) -> str:
    """Name, size and modification time: changes whenever a checkpoint is rewritten."""
    status = path.stat()
    return f"{path.name}:{status.st_size}:{status.st_mtime_ns}"


def cap_per_class(examples, per_class: int, rng: np.random.Generator):
    """At most `per_class` random items of every class (smoke runs)."""
    keep = [rng.choice(np.flatnonzero(examples.labels == label),
                       min(per_class, int(np.sum(examples.labels == label))), replace=False)
            for label in np.unique(examples.labels)]
    return examples.subset(np.sort(np.concatenate(keep)))


def describe(splits: dict) -> dict:
    """Item and per-class counts of every split (for results.json)."""
    return {split: {"images": len(examples),
                    "per_class": {name: int(np.sum(examples.labels == label))
                                  for label, name in enumerate(examples.class_names)}}
            for split, examples in splits.items()}
