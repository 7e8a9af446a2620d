"""`tfmir index` across workers: independent processes embed shares of the shards, one merge.

The workers run as real local processes on real PH2 images, sharing one `<output>.shards/`
folder as machines share a network filesystem. Their merged index must equal the index of one
process run on the same data with the same --shard_size and --batch_size.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfmir.data import Examples
from tfmir.export import export_saved_model, model_fingerprint
from tfmir.files import exclusive_lock
from tfmir.index import Index
from tfmir.index.embedding import (MissingShardsError, ShardMismatchError, embed_in_shards,
                                   embed_worker_shards, read_shards, shard_path,
                                   worker_shard_numbers)
from tfmir.models import Embedder

NUM_IMAGES = 24
# 24 images in shards of 4: shards 0-5, worker 0 of 2 embeds 0, 2, 4 and worker 1 embeds 1, 3, 5.
SHARDING = ["--shard_size=4", "--batch_size=4"]


def command(*args):
    return [sys.executable, "-m", "tfmir.cli", *map(str, args)]


def environment(tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def tfmir(*args, tf_config=None):
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=600,
                          env=environment(tf_config))


def run_together(*commands, tf_configs=None):
    """Starts the commands at once, as workers on several machines, and waits for them all."""
    processes = [subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=environment(tf_config))
                 for args, tf_config in zip(commands, tf_configs or [None] * len(commands))]
    try:
        outputs = [process.communicate(timeout=600) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in outputs]


def refused(result, *expected):
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("tfmir ")]
    assert ": error: " in line, line
    for text in expected:
        assert text in line, line
    return line


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(1)
    model = Embedder.from_preset("tiny")
    export_saved_model(model, root / "export" / "1", resize_size=36)
    keras.utils.set_random_seed(2)
    other = Embedder.from_preset("tiny")
    other.save(root / "other.keras")
    (root / "config.json").write_text(json.dumps({"resize_size": 36}))
    return {"export": root / "export", "fingerprint": model_fingerprint(model),
            "other": root / "other.keras", "other_fingerprint": model_fingerprint(other)}


@pytest.fixture(scope="module")
def folder(shared_data_dir, tmp_path_factory):
    """24 real PH2 images in two class folders (the first 12 files and the next 12)."""
    images = sorted((shared_data_dir / "ph2" / "images").glob("*.jpg"))[:NUM_IMAGES]
    root = tmp_path_factory.mktemp("skin")
    for number, image in enumerate(images):
        class_folder = root / ("first" if number < NUM_IMAGES // 2 else "second")
        class_folder.mkdir(exist_ok=True)
        shutil.copy(image, class_folder / image.name)
    return root


@pytest.fixture(scope="module")
def reference(models, folder, tmp_path_factory):
    """The index of one process, embedding every shard itself."""
    output = tmp_path_factory.mktemp("reference") / "skin"
    result = tfmir("index", f"--model={models['export']}", f"--data=skin={folder}",
                   f"--output={output}", *SHARDING)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def assert_same_index(output, reference, fingerprint):
    index = Index.load(output, expected_model_fingerprint=fingerprint)
    expected = Index.load(reference, expected_model_fingerprint=fingerprint)
    assert len(index) == NUM_IMAGES
    assert np.array_equal(index.ids, expected.ids)
    for column in ("labels", "sources", "paths"):
        assert np.array_equal(getattr(index, column), getattr(expected, column))
    # The workers embed the same batches of the same rows as the single process, so the vectors
    # agree to float32 rounding (bit for bit on one machine; oneDNN may pick other kernels in
    # another process on other hardware).
    np.testing.assert_allclose(np.load(output / "vectors.npy"), np.load(reference / "vectors.npy"),
                               rtol=0, atol=1e-6)
    assert not os.path.exists(f"{output}.shards")  # removed once the index is saved


def printed_merge_command(stdout):
    lines = stdout.splitlines()
    (tfmir_line,) = [lines[number + 1] for number, line in enumerate(lines)
                     if line.startswith("Once all 2 workers have finished")]
    program, name, *arguments = shlex.split(tfmir_line)
    assert (program, name) == ("tfmir", "index")
    return arguments


def test_two_workers_resume_and_merge_into_the_single_process_index(models, folder, reference,
                                                                     tmp_path):
    output = tmp_path / "skin"
    shards = tmp_path / "skin.shards"
    flags = [f"--model={models['export']}", f"--data=skin={folder}", f"--output={output}",
             *SHARDING]
    first, second = run_together(["index", *flags, "--num_shards=2", "--shard_index=0"],
                                 ["index", *flags, "--num_shards=2", "--shard_index=1"])
    assert "Worker 0 of 2 finished its 3 shards" in first and "(3 embedded, 0 reused)" in first
    assert "Worker 1 of 2 finished its 3 shards" in second and "(3 embedded, 0 reused)" in second
    assert not output.exists()  # workers build no index
    assert sorted(path.name for path in shards.glob("shard-*")) == [
        f"shard-0000{number}.npz" for number in range(6)]

    # A worker of another model is refused before it embeds, and deletes nothing.
    finished = {path.name: path.stat().st_mtime_ns for path in shards.iterdir()}
    line = refused(tfmir("index", f"--model={models['other']}", f"--data=skin={folder}",
                         f"--output={output}", *SHARDING, "--num_shards=2", "--shard_index=1"),
                   f"{shards} holds the shards of another job",
                   f"model fingerprint '{models['fingerprint']}' there, "
                   f"'{models['other_fingerprint']}' here", "every worker needs the same --model")
    assert "--overwrite" not in line
    assert {path.name: path.stat().st_mtime_ns for path in shards.iterdir()} == finished

    # Worker 1 lost shard 3 (killed while writing it): the merge names it and its worker.
    os.remove(shard_path(shards, 3))
    refused(tfmir("index", *flags, "--merge", "--num_shards=2"),
            "1 of the 6 shards", "missing or unreadable: shard 3;",
            "with --num_shards=2 they belong to --shard_index=1")
    assert not output.exists() and (shards / "manifest.json").is_file()

    # Worker 1 again: embeds shard 3 only; its shards 1 and 5 are reused as they were.
    again = tfmir("index", *flags, "--num_shards=2", "--shard_index=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(1 embedded, 2 reused)" in again.stdout
    for name in ("shard-00001.npz", "shard-00005.npz", "shard-00000.npz"):
        assert (shards / name).stat().st_mtime_ns == finished[name]

    # The merge command the workers printed builds the single process's index.
    arguments = printed_merge_command(again.stdout)
    assert arguments[-2:] == ["--merge", "--num_shards=2"] and "--batch_size=4" not in arguments
    merged = tfmir("index", *arguments)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert f"Wrote an index of {NUM_IMAGES} items" in merged.stdout
    assert_same_index(output, reference, models["fingerprint"])


def test_workers_from_tf_config_then_the_plain_command_reuses_their_shards(models, folder,
                                                                            reference, tmp_path):
    output = tmp_path / "skin"
    flags = [f"--model={models['export']}", f"--data=skin={folder}", f"--output={output}",
             *SHARDING]
    cluster = {"chief": ["host1:2222"], "worker": ["host2:2222"]}
    chief, worker = run_together(
        ["index", *flags], ["index", *flags],
        tf_configs=[{"cluster": cluster, "task": {"type": "chief", "index": 0}},
                    {"cluster": cluster, "task": {"type": "worker", "index": 0}}])
    # The chief is index 0 and worker 0 follows it.
    assert "Worker 0 of 2: embedding 3 of the 6 shards" in chief
    assert "Worker 1 of 2: embedding 3 of the 6 shards" in worker
    assert printed_merge_command(worker)[-2:] == ["--merge", "--num_shards=2"]

    plain = tfmir("index", *flags)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "reused 6 of 6 finished shards" in plain.stderr
    assert_same_index(output, reference, models["fingerprint"])


@pytest.mark.parametrize("arguments, tf_config, expected", [
    (["--num_shards=0", "--shard_index=0"], None,
     "--num_shards must be at least 1. Received: --num_shards=0"),
    (["--num_shards=2", "--shard_index=2"], None,
     "--shard_index must lie in [0, 2) for --num_shards=2. Received: --shard_index=2"),
    (["--num_shards=2", "--shard_index=-1"], None, "Received: --shard_index=-1"),
    (["--shard_index=1"], None, "--shard_index=1 needs --num_shards"),
    (["--num_shards=2"], None, "--num_shards=2 needs --shard_index (this worker's index, 0 to 1)"),
    (["--merge", "--shard_index=0"], None, "--merge builds the index from every worker's shards; "
                                           "drop --shard_index=0"),
    (["--num_shards=2", "--shard_index=0"], {"cluster": {"worker": ["a:1", "b:1"]},
                                            "task": {"type": "worker", "index": 1}},
     "--shard_index=0 disagrees with TF_CONFIG, which makes this process (worker 1) shard "
     "index 1 of 2"),
])
def test_bad_worker_flags_are_refused_in_one_line(arguments, tf_config, expected, tmp_path):
    # Checked before any model or data is read: neither exists here.
    result = tfmir("index", f"--model={tmp_path / 'model'}", f"--data={tmp_path / 'data'}",
                   f"--output={tmp_path / 'index'}", *arguments, tf_config=tf_config)
    refused(result, expected)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("worker", [[], ["--num_shards=2", "--shard_index=1"]])
def test_index_refuses_an_output_under_a_file(worker, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for output in (blocker / "index", blocker / "deeper" / "index"):
        refused(tfmir("index", f"--model={tmp_path / 'model'}", f"--data={tmp_path / 'data'}",
                      f"--output={output}", *worker),
                f"--output={output} cannot be written: {blocker} is a file, not a folder.")
    assert blocker.read_text() == "not a folder"


def test_index_and_search_refuse_a_read_only_folder(reference, models, folder, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("this user can write into a read-only folder (root)")
        refused(tfmir("index", f"--model={models['export']}", f"--data=skin={folder}",
                      f"--output={read_only / 'index'}"),
                f"--output={read_only / 'index'} cannot be written: {read_only} is not writable.")
        query = sorted((folder / "first").iterdir())[0]
        refused(tfmir("search", f"--index={reference}", f"--model={models['export']}",
                      f"--output_json={read_only / 'results.json'}", query),
                f"--output_json={read_only / 'results.json'} cannot be written: {read_only} is "
                "not writable.")
    finally:
        read_only.chmod(0o755)


def test_search_refuses_outputs_it_cannot_write(reference, models, folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    query = sorted((folder / "first").iterdir())[0]
    search = ["search", f"--index={reference}", f"--model={models['export']}", query]
    refused(tfmir(*search, f"--output_json={blocker / 'results.json'}"),
            f"--output_json={blocker / 'results.json'} cannot be written: {blocker} is a file")
    refused(tfmir(*search, f"--gallery={tmp_path}"),
            f"--gallery={tmp_path} cannot be written: it is a folder.")


# The library underneath, with an embedding anyone can compute by hand: item "7" -> [7, -7].

def numbered_items(count, start=0):
    return Examples(labels=np.zeros(count, np.int64), sources="s",
                    ids=[str(number) for number in range(start, start + count)],
                    class_names=("",), images=np.zeros((count, 2, 2, 3), np.uint8))


def by_hand(part):
    values = part.ids.astype(float)
    return np.stack([values, -values], axis=1)


JOB = dict(fingerprint="model-a", preprocessing={"resize_size": 36}, shard_size=3)


def test_worker_shares_are_dealt_out_in_turn():
    shares = [list(worker_shard_numbers(7, 3, index)) for index in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(worker_shard_numbers(2, 3, 2)) == []  # more workers than shards


def test_workers_fill_one_folder_that_read_shards_gathers(tmp_path):
    shards = tmp_path / "index.shards"
    items = [numbered_items(4), numbered_items(6, start=4)]  # 10 rows: shards 0-3, the last of 1
    with pytest.raises(MissingShardsError, match=r"4 of the 4 shards .* shards 0-3$"):
        read_shards(items, shards, **JOB)
    assert embed_worker_shards(by_hand, items, shards, num_workers=2, worker_index=1,
                               progress=False, **JOB) == ([1, 3], [])
    with pytest.raises(MissingShardsError, match=r"missing or unreadable: shards 0, 2$") as error:
        read_shards(items, shards, **JOB)
    assert error.value.numbers == [0, 2] and error.value.num_shards == 4
    assert embed_worker_shards(by_hand, items, shards, num_workers=2, worker_index=0,
                               progress=False, **JOB) == ([0, 2], [])
    expected = np.stack([np.arange(10.0), -np.arange(10.0)], axis=1)
    np.testing.assert_array_equal(read_shards(items, shards, **JOB), expected)
    # Run again, a worker reuses its finished shards.
    assert embed_worker_shards(by_hand, items, shards, num_workers=2, worker_index=0,
                               progress=False, **JOB) == ([], [0, 2])


def test_a_second_process_for_the_same_worker_is_refused(tmp_path):
    shards = tmp_path / "index.shards"
    with exclusive_lock(shards / "worker-00001-of-00002", "test"):
        with pytest.raises(ValueError, match="worker 1 of 2 is already embedding into"):
            embed_worker_shards(by_hand, [numbered_items(9)], shards, num_workers=2,
                                worker_index=1, progress=False, **JOB)
    assert not list(shards.glob("shard-*"))


@pytest.mark.parametrize("change, named", [
    ({"fingerprint": "model-b"}, "model fingerprint 'model-a' there, 'model-b' here"),
    ({"preprocessing": {"resize_size": 72}},
     "preprocessing {'resize_size': 36} there, {'resize_size': 72} here"),
    ({"shard_size": 4}, "shard size 3 there, 4 here"),
    ({"items": 8}, "item count 9 there, 8 here"),
    ({"items_from": 1}, "item ids (sha256)"),
])
def test_another_job_is_refused_and_its_shards_kept(change, named, tmp_path):
    shards = tmp_path / "index.shards"
    embed_worker_shards(by_hand, [numbered_items(9)], shards, num_workers=2, worker_index=0,
                        progress=False, **JOB)
    before = {path.name: path.read_bytes() for path in shards.iterdir()}
    job = {**JOB, **{key: value for key, value in change.items() if not key.startswith("items")}}
    items = [numbered_items(change.get("items", 9), start=change.get("items_from", 0))]
    for embed_share in (
            lambda: embed_worker_shards(by_hand, items, shards, num_workers=2, worker_index=1,
                                        progress=False, **job),
            lambda: embed_in_shards(by_hand, items, shards, progress=False, **job),
            lambda: read_shards(items, shards, **job)):
        with pytest.raises(ShardMismatchError, match="holds the shards of another job") as error:
            embed_share()
        assert named in str(error.value)
        assert {path.name: path.read_bytes() for path in shards.iterdir()} == before


def test_overwrite_discards_another_job_unless_a_worker_writes_into_it(tmp_path):
    shards = tmp_path / "index.shards"
    embed_worker_shards(by_hand, [numbered_items(9)], shards, num_workers=2, worker_index=0,
                        progress=False, **JOB)
    other = {**JOB, "fingerprint": "model-b"}
    with exclusive_lock(shards / "worker-00001-of-00002", "test"):
        with pytest.raises(ShardMismatchError, match="worker-00001-of-00002 still writes into it"):
            embed_in_shards(by_hand, [numbered_items(9)], shards, overwrite=True,
                            progress=False, **other)
    assert shard_path(shards, 0) in map(str, shards.iterdir())
    embeddings = embed_in_shards(lambda part: by_hand(part) * 2, [numbered_items(9)], shards,
                                 overwrite=True, progress=False, **other)
    np.testing.assert_array_equal(embeddings[:, 0], 2 * np.arange(9.0))  # nothing reused
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["model_fingerprint"] == "model-b"
