"""`tfmir.files`: atomic file and directory writes, checked on disk (contents and listings)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfmir import files
from tfmir.files import LockedError, exclusive_lock


def test_write_atomic_takes_text_bytes_or_a_writer(tmp_path):
    files.write_atomic(tmp_path / "new" / "text.md", "héllo\n")  # the folder is created
    files.write_atomic(tmp_path / "bytes.bin", b"\x00\x01")
    files.write_atomic(tmp_path / "array.npy", lambda stream: np.save(stream, np.arange(3)))
    assert (tmp_path / "new" / "text.md").read_bytes() == "héllo\n".encode("utf-8")
    assert (tmp_path / "bytes.bin").read_bytes() == b"\x00\x01"
    np.testing.assert_array_equal(np.load(tmp_path / "array.npy"), [0, 1, 2])
    assert sorted(os.listdir(tmp_path)) == ["array.npy", "bytes.bin", "new"]


def test_write_atomic_replaces_a_file_and_a_failure_leaves_it_untouched(tmp_path):
    path = tmp_path / "results.json"
    files.write_json(path, {"b": 1, "a": [2]})
    assert path.read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    files.write_atomic(path, "second")

    def half_then_crash(stream):
        stream.write(b"third, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, half_then_crash)
    assert path.read_text() == "second"
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left


def test_atomic_directory_appears_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "export"
    with files.atomic_directory(target) as temporary:
        assert files.TEMPORARY_MARKER in temporary.name and temporary.parent == tmp_path
        (temporary / "sub").mkdir()
        (temporary / "sub" / "a.txt").write_text("old")
        assert not target.exists()  # nothing at the target until the block ends
    assert (target / "sub" / "a.txt").read_text() == "old"
    with files.atomic_directory(target) as temporary:
        (temporary / "b.txt").write_text("new")
    assert os.listdir(target) == ["b.txt"]
    assert os.listdir(tmp_path) == ["export"]  # neither the temporary nor the old one left


def test_atomic_directory_failures_leave_the_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "export"
    with files.atomic_directory(target) as temporary:
        (temporary / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half written"):
        with files.atomic_directory(target) as temporary:
            (temporary / "a.txt").write_text("new")
            raise RuntimeError("half written")
    assert (target / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["export"]

    real_rename, calls = os.rename, []

    def rename(old, new):
        calls.append(os.path.basename(new))
        if len(calls) == 2:  # the new directory into place, after the old one went aside
            raise OSError("interrupted")
        real_rename(old, new)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        with files.atomic_directory(target) as temporary:
            (temporary / "a.txt").write_text("new")
    monkeypatch.undo()
    assert files.ASIDE_MARKER in calls[0] and calls[1:] == ["export", "export"]  # and back
    assert (target / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["export"]


def test_report_keeps_its_names(tmp_path):
    from tfmir.cli import report

    report.write_json(tmp_path / "r.json", {"recall@1": 0.5})
    report.write_atomic(tmp_path / "t.md", "| a |\n")
    assert json.loads((tmp_path / "r.json").read_text()) == {"recall@1": 0.5}
    assert (tmp_path / "t.md").read_text() == "| a |\n"


_HOLD_LOCK = """
import sys, time
from tfmir.files import exclusive_lock
with exclusive_lock(sys.argv[1], "test holder"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _holder(path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_exclusive_lock_refuses_a_second_writer_until_the_first_exits(tmp_path):
    output = tmp_path / "index"
    holder = _holder(output)
    try:
        with pytest.raises(LockedError, match=rf"{output} is being written by another tfmir "
                                              rf"index \(it holds {output}.lock\)"):
            with exclusive_lock(output, "tfmir index"):
                pass
    finally:
        holder.kill()  # a crashed holder: the system drops its lock
        holder.wait()
    with exclusive_lock(output, "tfmir index"):
        assert (tmp_path / "index.lock").exists()


def test_tfmir_index_refuses_an_output_another_run_is_writing(tmp_path):
    output = tmp_path / "index"
    holder = _holder(output)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "tfmir.cli", "index", f"--model={tmp_path / 'model.keras'}",
             f"--data={tmp_path}", f"--output={output}"], capture_output=True, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    finally:
        holder.communicate("\n")
    assert result.returncode != 0
    assert f"tfmir index: error: {output} is being written by another tfmir index" in result.stderr
    assert "Traceback" not in result.stderr and not output.exists()


def test_outputs_get_the_modes_of_plain_open_and_mkdir(tmp_path):
    # Issue 11, finding 9: files were created 0600 and index / export folders 0700 (the modes of
    # mkstemp / mkdtemp), so another user or a serving container could not read them.
    umask = os.umask(0o022)
    os.umask(umask)
    plain_file = tmp_path / "plain.txt"
    plain_file.write_text("x")
    plain_folder = tmp_path / "plain"
    plain_folder.mkdir()
    files.write_atomic(tmp_path / "atomic.txt", "x")
    with files.atomic_directory(tmp_path / "folder") as temporary:
        (temporary / "a.txt").write_text("x")
    mode = lambda path: os.stat(path).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(plain_file) == 0o666 & ~umask
    assert mode(tmp_path / "folder") == mode(plain_folder) == 0o777 & ~umask
