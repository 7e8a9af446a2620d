"""Two worker processes (MultiWorkerMirroredStrategy on loopback) train like one process.

The reference is one process with the same global batches on two replicas (MirroredStrategy over
two logical CPU devices): each replica computes the loss of its half of every class-balanced
batch, so the two-worker run must reproduce it step for step. With synchronized batch
normalisation both runs also see the same batch statistics.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfmir.training import read_log

TRAIN_ARGS = ["--config=specialist:tiny", "--config.epochs=2", "--config.steps_per_epoch=3",
              "--config.sampler.name=class_balanced"]
REFERENCE = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfmir.cli.main import run
run(["tfmir", "train"] + sys.argv[1:])
"""


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for handle in sockets:
        handle.bind(("127.0.0.1", 0))
    ports = [handle.getsockname()[1] for handle in sockets]
    for handle in sockets:
        handle.close()
    return ports


def finish(processes, timeout=420):
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]


@pytest.fixture(scope="module")
def runs(shared_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_worker")
    data = f"--data=retina={shared_data_dir / 'retinamnist' / 'retinamnist.npz'}"
    base_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        env = dict(base_env, TF_CONFIG=json.dumps({"cluster": cluster,
                                                   "task": {"type": "worker", "index": index}}))
        # Each worker gets its own folder, as on machines with their own disks.
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "tfmir.cli", "train", data, *TRAIN_ARGS,
             "--config.strategy=multi_worker", f"--workdir={root / f'worker{index}'}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    processes.append(subprocess.Popen(
        [sys.executable, "-c", REFERENCE, data, *TRAIN_ARGS, "--config.strategy=mirrored",
         f"--workdir={root / 'reference'}"],
        env=base_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    finish(processes)
    return root


def test_two_workers_match_one_process_with_two_replicas(runs):
    chief, reference = runs / "worker0", runs / "reference"
    chief_log, reference_log = read_log(chief / "log.csv"), read_log(reference / "log.csv")
    assert chief_log["epoch"] == reference_log["epoch"] == [0.0, 1.0]
    # The loss of each epoch is the mean over both replicas' batches (float32 sums in another
    # order across processes: agreement to ~1e-6 relative).
    np.testing.assert_allclose(chief_log["loss"], reference_log["loss"], rtol=1e-5)
    np.testing.assert_allclose(chief_log["val_recall@1"], reference_log["val_recall@1"],
                               atol=1e-9)
    trained = keras.saving.load_model(chief / "final.keras")
    expected = keras.saving.load_model(reference / "final.keras")
    for weights, expected_weights in zip(trained.get_weights(), expected.get_weights()):
        np.testing.assert_allclose(weights, expected_weights, rtol=1e-4, atol=1e-5)
    # Only the chief writes checkpoints and logs; the other worker kept its backup until the end.
    assert not (runs / "worker1" / "final.keras").exists()
    assert not (runs / "worker1" / "log.csv").exists()
    # Every replica trained on its own half of each batch: the run used two replicas.
    assert json.loads((chief / "run.json").read_text())["num_replicas"] == 2
