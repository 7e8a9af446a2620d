"""The `tfmir` console command: `tfmir <command> --flag=value ...`."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

COMMANDS = {
    "demo": ("tfmir.cli.demo", "train the cpu preset on the shipped sample and show what it retrieves"),
    "train": ("tfmir.cli.train", "train a task of a named config (--config=NAME), resumable"),
    "export": ("tfmir.cli.export", "write a trained embedder as a SavedModel for TF Serving"),
    "index": ("tfmir.cli.index", "embed an image archive and write a search index, resumable"),
    "search": ("tfmir.cli.search", "top-k similar indexed images for query images, as JSON"),
    "serve": ("tfmir.cli.serve", "an HTTP JSON search service: POST /search, GET /healthz"),
    "evaluate": ("tfmir.cli.evaluate",
                 "Recall@K, mAP@k and kNN Acc/MCR/RS of a model on labelled data"),
}

# TensorFlow's C++ runtime logs on every run: CUDA probing ("failed call to cuInit", at error
# level, on a machine without a GPU), CPU-feature and oneDNN notices, tf.data's end of sequence
# ("Local rendezvous is aborting with status: OUT_OF_RANGE"). Users read them as failures, so
# they stay hidden unless asked for: --verbosity, or TensorFlow's own variable.
TF_LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
_FATAL_ONLY = "3"


def usage() -> str:
    lines = ["usage: tfmir <command> [--flag=value ...]", "", "commands:"]
    lines += [f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`tfmir <command> --help` lists a command's flags. TensorFlow's own log lines",
              f"are hidden; --verbosity=0 shows them ({TF_LOG_LEVEL_VARIABLE}, if set, is "
              "respected)."]
    return "\n".join(lines)


def run(argv=None) -> None:
    """Entry point of the `tfmir` console script."""
    from absl import app, flags

    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        print(f"tfmir: unknown command {command!r}.\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    # Before anything imports TensorFlow, which reads the variable once.
    tensorflow_quieted = TF_LOG_LEVEL_VARIABLE not in os.environ
    if tensorflow_quieted:
        os.environ[TF_LOG_LEVEL_VARIABLE] = _FATAL_ONLY
    module = importlib.import_module(COMMANDS[command][0])
    arguments = argv[2:]
    if hasattr(module, "CONFIG_OVERRIDES"):
        arguments = _take_config_overrides(arguments, module.CONFIG_OVERRIDES)
    program = f"tfmir {command}"
    # absl's --help lists the key flags of the module named by sys.argv[0]: make the command's
    # flags those, or `tfmir <command> --help` would only say "Try --helpfull".
    sys.argv[0] = program
    for flag in flags.FLAGS.flags_by_module_dict().get(module.__name__, []):
        flags.FLAGS.register_key_flag_for_module(program, flag)

    def run_command(argv):
        _follow_verbosity(tensorflow_quieted)
        module.main(argv)

    app.run(run_command, argv=[program] + arguments)


def _follow_verbosity(tensorflow_quieted: bool) -> None:
    """Once flags are parsed: an explicit --verbosity shows TensorFlow's logs at that level too.

    Without it, TensorFlow's Python INFO lines (the SavedModel writer's 1 KB notes on renamed
    inputs, its sharding timings) are dropped while tfmir's own INFO lines still show. A
    TF_CPP_MIN_LOG_LEVEL set by the user is left alone.
    """
    from absl import flags
    from absl import logging as absl_logging

    verbosity = flags.FLAGS["verbosity"]
    if verbosity.present:
        # absl verbosity 0 = INFO, -1 = WARNING, -2 = ERROR; TensorFlow's C++ levels count up.
        if tensorflow_quieted and "tensorflow" not in sys.modules:
            os.environ[TF_LOG_LEVEL_VARIABLE] = str(min(max(-verbosity.value, 0), 3))
    else:
        absl_logging.get_absl_handler().addFilter(_TensorFlowInfoFilter())


class _TensorFlowInfoFilter(logging.Filter):
    """Drops INFO and DEBUG records logged by TensorFlow's own Python code.

    By file, not by logger: TensorFlow logs through absl's logger as well as its own, and tfmir's
    INFO lines go through absl's logger too.
    """

    def __init__(self):
        super().__init__()
        spec = importlib.util.find_spec("tensorflow")  # finds it without importing it
        locations = spec.submodule_search_locations if spec else None
        self.directories = tuple(os.path.join(directory, "") for directory in locations or ())

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.directories)


def _take_config_overrides(arguments: list, overrides: dict) -> list:
    """Moves `--config.KEY=VALUE` arguments into `overrides` (absl has no flag for each key)."""
    from tfmir.configs import parse_value

    rest = []
    for argument in arguments:
        if argument.startswith("--config."):
            key, separator, value = argument[len("--config."):].partition("=")
            if not separator or not key:
                print(f"tfmir: {argument!r} must be --config.KEY=VALUE", file=sys.stderr)
                sys.exit(2)
            overrides[key] = parse_value(value)
        else:
            rest.append(argument)
    return rest


if __name__ == "__main__":
    run()
