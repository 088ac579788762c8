"""`hlwq demo` end to end, as a newcomer runs it (here with a local Prefect server running)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hlwq.cli.commands.serve import start_server, stop_server
from hlwq.runtime.video import probe_mp4

HLWQ = str(Path(sys.executable).parent / "hlwq")


@pytest.mark.slow
def test_demo_quantizes_renders_and_says_where_everything_is(tmp_path):
    server = start_server(tmp_path / "prefect-home", port=0)
    try:
        env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
        started = time.monotonic()
        result = subprocess.run([HLWQ, "demo", "--out", str(tmp_path / "demo"), "--server-home",
                                 str(tmp_path / "prefect-home")],
                                capture_output=True, text=True, env=env, timeout=600, check=False)
        seconds = time.monotonic() - started
    finally:
        stop_server(tmp_path / "prefect-home")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    listed = dict(re.findall(r"^  (source model|artifact|model card|metrics|render catalog)\s+(\S+)", out, re.MULTILINE))
    artifact = Path(listed["artifact"])
    assert (artifact / "manifest.json").is_file()
    assert Path(listed["model card"]) == artifact / "README.md" and Path(listed["model card"]).is_file()
    assert pq.read_table(listed["metrics"]).num_rows > 0
    videos = re.findall(r"^  video\s+(\S+)", out, re.MULTILINE)
    sheets = re.findall(r"^  contact sheet\s+(\S+)", out, re.MULTILINE)
    assert len(videos) == len(sheets) == 2 and all(Path(sheet).is_file() for sheet in sheets)
    for video in videos:
        info = probe_mp4(video)
        assert (info.frames, info.width, info.height, info.audio_codec) == (9, 64, 64, "aac")
    assert f"Prefect UI     {server.ui_url}" in out
    assert "2 rendered, 0 skipped" in out
    print(f"hlwq demo took {seconds:.0f} s")
