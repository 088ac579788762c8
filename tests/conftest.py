"""Test-wide settings: no telemetry, a private Prefect home, small thread counts."""

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="hlwq-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("HLWQ_CACHE_DIR", os.path.join(_PREFECT_HOME, "hlwq-cache"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Imported after PREFECT_HOME is set, so Prefect reads the private home.
from hlwq.cli.prefect_env import configure_prefect

configure_prefect()
