"""`tfmir train`: train any task of a named config, resumable, on one machine or several.

    tfmir train --data=sample --config=specialist:cpu --workdir=runs/sample
    tfmir train --data=skin=path/to/folder --data=xray=path/to/manifest.csv --workdir=runs/two \
        --config=specialist:cpu --config.epochs=20 --config.optimizer.learning_rate=1e-4
    tfmir train --data=... --config=universal:cpu --workdir=runs/universal \
        --config.task.args.specialists="{'skin': 'runs/skin/best.keras', 'xray': 'runs/xray/best.keras'}"

`--config=NAME[:SETTING]` names a config of `tfmir.configs.CONFIGS` ("specialist", "universal")
and its setting ("tiny", "cpu", "paper"); every `--config.KEY=VALUE` overrides one key of it
(`--config.sampler.num_per_class=10`, `--config.task.model.backbone=resnet50`,
`--config.strategy=multi_worker`). Writes into --workdir: best.keras (the best deployable model by
the config's monitor), final.keras, log.csv, tensorboard/, run.json, config.json, flags.txt and
results.json / table.md with the best model's test Recall@K per source. Run the same command
again after an interruption: it resumes from workdir/backup.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

# Filled by `tfmir.cli.main` with the `--config.KEY=VALUE` arguments, which absl cannot parse.
CONFIG_OVERRIDES: dict = {}

_DATA = flags.DEFINE_multi_string(
    "data", None, "Dataset spec(s) `[source=]location`: sample, sample:retina, medmnist:NAME[@SIZE], "
    "a MedMNIST .npz, a CSV manifest (path,label[,source][,mask][,split]) or a class-per-folder "
    "directory. Repeat the flag for several sources.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (resumes when it holds a backup).",
                               required=True)
_CONFIG = flags.DEFINE_string(
    "config", "specialist:cpu", "The experiment config NAME[:SETTING] (specialist, universal; "
    "settings tiny, cpu, paper). Override its keys with --config.KEY=VALUE, e.g. "
    "--config.epochs=20 --config.optimizer.learning_rate=1e-4.")
_STRICT = flags.DEFINE_bool("strict", False, "Refuse unreadable image files instead of skipping.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder of MedMNIST .npz files.")
_DOWNLOAD = flags.DEFINE_bool("download", False, "Download missing MedMNIST files.")


def load_config():
    """The config named by --config with every --config.KEY=VALUE applied."""
    from tfmir.configs import get_config, override

    return override(get_config(_CONFIG.value), CONFIG_OVERRIDES)


def flags_text() -> str:
    """The command's own flags and any other flag given on the command line, one per line.

    Not `FLAGS.flags_into_string()`: that also lists every flag of every imported library
    (absl's, absl testing's, TensorFlow's), set or not, which hides the run's own settings.
    """
    own = flags.FLAGS.get_flags_for_module(__name__)
    given = {flag.name: flag for module_flags in flags.FLAGS.flags_by_module_dict().values()
             for flag in module_flags if flag.present and flag not in own}
    lines = [flag.serialize() for flag in sorted(own, key=lambda flag: flag.name)
             if flag.value is not None]
    lines += [flag.serialize() for _, flag in sorted(given.items())]
    lines += [f"--config.{key}={value}" for key, value in CONFIG_OVERRIDES.items()]
    return "\n".join(lines) + "\n"


def test_ks(test) -> list:
    """The K of the test table's Recall@K (1, 2, 4, 8) that every test source can score.

    Raises:
        ValueError: a test source with fewer than two images (before training starts).
    """
    smallest = min(int((test.sources == source).sum()) for source in test.source_names)
    ks = [k for k in (1, 2, 4, 8) if k < smallest]
    if not ks:
        raise ValueError(f"the test split has a source with {smallest} image(s); Recall@K needs "
                         "at least 2 per source (each query is excluded from its own gallery)")
    return ks


def main(argv) -> None:
    del argv
    import keras

    from tfmir.cli.report import recall_table
    from tfmir.data.specs import load_specs
    from tfmir.files import write_atomic, write_json
    from tfmir.training import evaluate_retrieval, fit

    try:
        config = load_config()
        splits = load_specs(_DATA.value, data_dir=_DATA_DIR.value, download=_DOWNLOAD.value,
                            strict=_STRICT.value, seed=config.seed)
        for split, examples in splits.items():
            logging.info("%s: %d images, sources %s", split, len(examples), examples.source_names)
        ks = test_ks(splits["test"])
        result = fit(config, splits, _WORKDIR.value)
    except (ValueError, OSError) as error:  # bad input, unwritable output: one line
        sys.exit(f"tfmir train: {error}")
    if not result.final_path.exists():
        return  # a non-chief worker: the chief writes the results
    write_atomic(os.path.join(_WORKDIR.value, "flags.txt"), flags_text())
    best_path = result.best_path if result.best_path and result.best_path.exists() else None
    best = keras.saving.load_model(best_path) if best_path else result.model
    test = evaluate_retrieval(best, splits["test"], resize_size=result.resize_size, ks=ks)
    table = recall_table({"best": test}, ks=ks)
    write_json(os.path.join(_WORKDIR.value, "results.json"),
               {"test": test, "epochs_run": len(result.history.get("epoch", [])),
                "resumed_from_epoch": result.initial_epoch})
    write_atomic(os.path.join(_WORKDIR.value, "table.md"), table + "\n")
    print(f"\nTest Recall@K of {best_path or result.final_path}:\n{table}")
