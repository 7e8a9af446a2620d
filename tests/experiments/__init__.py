"""Smoke runs of the experiment scripts, each in a subprocess as a user would start it."""

import os
import pathlib
import subprocess
import sys

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"


def run_smoke(script: str, workdir, data_root, *extra):
    """Runs `experiments/<script> --smoke` and returns the completed process (it must succeed)."""
    command = [sys.executable, str(EXPERIMENTS / script), "--smoke", f"--workdir={workdir}",
               f"--data_root={data_root}", *extra]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment,
                               timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed
