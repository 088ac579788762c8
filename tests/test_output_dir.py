"""Output folders: one writer each (an flock that dies with its process), and what may be replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hlwq.quant.errors import ArtifactError, OutputLockedError
from hlwq.store.output_dir import check_output_dir, folder_lock, folder_locks, lock_file

HOLDER = textwrap.dedent("""
    import sys, time
    from hlwq.store.output_dir import folder_lock
    with folder_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def start_holder(folder, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_fails_naming_the_holder_and_gets_the_lock_once_it_is_killed(tmp_path):
    out = tmp_path / "artifact"
    holder = start_holder(out, 60)
    try:
        with (pytest.raises(OutputLockedError, match=rf"--out {out}: another run \(pid {holder.pid}\)"),
              folder_lock(out, wait=False)):
            pass
        holder.send_signal(signal.SIGKILL)   # no cleanup runs: the kernel drops the lock
        holder.wait()
        with folder_lock(out, wait=False):
            assert lock_file(out).read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()


def test_a_second_writer_waits_for_the_first(tmp_path, capfd):
    out = tmp_path / "renders"
    holder = start_holder(out, 1.5)
    started = time.monotonic()
    with folder_lock(out):
        waited = time.monotonic() - started
    holder.wait()
    assert waited > 0.5
    assert f"waiting for pid {holder.pid}" in capfd.readouterr().err


def test_locks_are_reentrant_within_a_process_and_sit_beside_the_folder(tmp_path):
    out, staging = tmp_path / "a", tmp_path / "a.staging"
    with folder_locks({"--out": out, "--staging": staging}, wait=False):
        with folder_lock(out, wait=False), folder_lock(staging, wait=False):
            pass
        assert lock_file(out) == tmp_path / ".a.lock" and not out.exists()
    holder = start_holder(out, 0)   # released: another process takes it at once
    holder.wait()


def test_only_empty_folders_or_artifacts_are_replaced(tmp_path):
    check_output_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    check_output_dir(tmp_path / "art", replace_artifact=True)
    with pytest.raises(ArtifactError, match="not empty"):
        check_output_dir(tmp_path / "art")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        check_output_dir(tmp_path / "file")
