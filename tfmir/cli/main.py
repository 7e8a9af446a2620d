"""The `tfmir` console command: `tfmir <command> --flag=value ...`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("tfmir.cli.demo", "train the cpu preset on the shipped sample and show what it retrieves"),
    "train": ("tfmir.cli.train", "train a task of a named config (--config=NAME), resumable"),
    "export": ("tfmir.cli.export", "write a trained embedder as a SavedModel for TF Serving"),
    "index": ("tfmir.cli.index", "embed an image archive and write a search index, resumable"),
    "search": ("tfmir.cli.search", "top-k similar indexed images for query images, as JSON"),
    "serve": ("tfmir.cli.serve", "an HTTP JSON search service: POST /search, GET /healthz"),
}


def usage() -> str:
    lines = ["usage: tfmir <command> [--flag=value ...]", "", "commands:"]
    lines += [f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`tfmir <command> --help` lists a command's flags."]
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
    app.run(module.main, argv=[program] + arguments)


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
