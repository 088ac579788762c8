"""The file-hash cache: reused only while a file is untouched, harmless when broken."""

import hashlib
import os
import time

import pytest

from hlwq.store import hash_cache
from hlwq.store.hash_cache import size_and_sha256


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(hash_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(hash_cache, "FRESH_NS", 0)     # the test files are seconds old at most
    return tmp_path / "cache"


@pytest.fixture
def hashings(monkeypatch):
    """Counts the files actually read and hashed."""
    calls = []
    real = hashlib.file_digest

    def counting(handle, digest):
        calls.append(handle.name)
        return real(handle, digest)

    monkeypatch.setattr(hash_cache.hashlib, "file_digest", counting)
    return calls


def test_second_hash_comes_from_the_cache(tmp_path, cache_dir, hashings):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x" * 1000)
    expected = (1000, hashlib.sha256(b"x" * 1000).hexdigest())
    assert size_and_sha256(path) == expected
    assert size_and_sha256(path) == expected
    assert len(hashings) == 1 and (cache_dir / hash_cache.CACHE_FILE).is_file()


def test_rewritten_bytes_are_hashed_again_even_with_the_old_mtime(tmp_path, cache_dir, hashings):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"a" * 1000)
    size_and_sha256(path)
    before = os.stat(path)
    time.sleep(0.05)                                    # past coarse timestamp granularity
    path.write_bytes(b"b" * 1000)                       # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))   # mtime put back; ctime moves
    assert size_and_sha256(path) == (1000, hashlib.sha256(b"b" * 1000).hexdigest())
    assert len(hashings) == 2


def test_a_broken_cache_only_costs_the_hashing(tmp_path, cache_dir, hashings):
    cache_dir.mkdir()
    (cache_dir / hash_cache.CACHE_FILE).write_bytes(b"not a database" * 100)
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x" * 10)
    assert size_and_sha256(path) == (10, hashlib.sha256(b"x" * 10).hexdigest())
    assert size_and_sha256(path)[1] == hashlib.sha256(b"x" * 10).hexdigest()
    assert len(hashings) == 2


def test_files_written_just_now_are_not_remembered(tmp_path, cache_dir, hashings, monkeypatch):
    monkeypatch.setattr(hash_cache, "FRESH_NS", 60 * 10**9)
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x" * 10)
    size_and_sha256(path)
    size_and_sha256(path)
    assert len(hashings) == 2
