"""How the CLI picks its Prefect API, decided before Prefect is imported.

- ``PREFECT_API_URL`` set (environment or active profile): that server is used.
- Otherwise Prefect's embedded default: a temporary local API server (SQLite
  under ``PREFECT_HOME``) that lives as long as the command.

Either way telemetry is off and task results are not persisted: tasks return
small JSON-able values, and the real outputs are files.
"""

from __future__ import annotations

import logging
import os

DEBUG_ENV = "HLWQ_DEBUG"   # set by `hlwq --debug`: tracebacks on the console

QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",   # the server's usage telemetry
    "DO_NOT_TRACK": "1",                           # the client's
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    # A loaded 2-core machine can take longer than Prefect's 20 s default to boot the
    # temporary server.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Dask's per-connection INFO lines would drown the run's own log.
    "DASK_LOGGING__DISTRIBUTED": "warning",
}


def configure_prefect() -> None:
    """Set the environment Prefect (and Dask) read at import; explicit user settings win."""
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if not os.environ.get("PREFECT_API_URL"):
        # Used only when no profile names a server either.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")


class TypedErrorTracebacks(logging.Filter):
    """Keeps Prefect's console from printing a traceback for a typed error: the CLI prints
    that error as one line. The run's log in the Prefect API still holds the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from hlwq.quant.errors import HLWQError

        return not (record.exc_info and isinstance(record.exc_info[1], HLWQError))


def quiet_typed_errors() -> None:
    """Install the filter on Prefect's console handlers (call after Prefect is imported)."""
    if os.environ.get(DEBUG_ENV):
        return
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                    isinstance(f, TypedErrorTracebacks) for f in handler.filters):
                handler.addFilter(TypedErrorTracebacks())
