"""`hlwq serve` (the three deployments) and `hlwq server start|stop|status` (a local Prefect server).

The local server is `prefect server start --host 127.0.0.1` with SQLite in a project-local
PREFECT_HOME (default `work-runs/prefect-server`, or `--home` / HLWQ_SERVER_HOME), running in
its own session in the background; `server.json` there records its pid, start time and port,
so `stop` ends exactly that process group and nothing else.

`hlwq serve` talks to PREFECT_API_URL when set, else to the local server when one runs, else
to the active Prefect profile's server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from hlwq.quant.choices import DTYPE_NAMES, OFFLOAD_MODES, SCOPES, SENSITIVITY_CHOICES
from hlwq.quant.errors import HLWQError
from hlwq.store.atomic import atomic_write_text

DEFAULT_HOME = "work-runs/prefect-server"
DEFAULT_PORT = 4200
STATE_FILE = "server.json"
START_TIMEOUT_S = 120  # a loaded 2-core machine can take well over the usual ~7 s
STOP_TIMEOUT_S = 20


class PrefectServerError(HLWQError):
    """The local Prefect server cannot be started, reached or stopped."""


@dataclass(frozen=True)
class LocalServer:
    pid: int
    port: int
    home: str
    started: float  # process create time: tells our server from a later process with the same pid
    log: str

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def server_home(home: str | os.PathLike | None = None) -> Path:
    return Path(home or os.environ.get("HLWQ_SERVER_HOME") or DEFAULT_HOME).expanduser().resolve()


def api_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def read_server(home: str | os.PathLike | None = None) -> LocalServer | None:
    """The server recorded in `home`, if its process still runs (a stale record is removed)."""
    state = server_home(home) / STATE_FILE
    if not state.is_file():
        return None
    server = LocalServer(**json.loads(state.read_text()))
    if not _is_our_process(server):
        state.unlink(missing_ok=True)
        return None
    return server


def _is_our_process(server: LocalServer) -> bool:
    import psutil

    try:
        process = psutil.Process(server.pid)
        return (abs(process.create_time() - server.started) < 1.0
                and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def server_environment(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    })
    return env


def start_server(home: str | os.PathLike | None = None, port: int = DEFAULT_PORT,
                 timeout_s: float = START_TIMEOUT_S) -> LocalServer:
    """Start the local server in the background and wait until its API answers."""
    import psutil

    home = server_home(home)
    running = read_server(home)
    if running:
        raise PrefectServerError(f"a Prefect server from {home} already runs at {running.ui_url} "
                                 f"(pid {running.pid}); `hlwq server stop` first")
    port = port or free_port()
    if _port_taken(port):
        raise PrefectServerError(f"port {port} on 127.0.0.1 is in use; choose another with --port")
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "server.log"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port), "--analytics-off"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=server_environment(home), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = LocalServer(pid=process.pid, port=port, home=str(home),
                         started=psutil.Process(process.pid).create_time(), log=str(log_path))
    atomic_write_text(home / STATE_FILE, json.dumps(asdict(server), indent=2))
    deadline = time.monotonic() + timeout_s
    while not api_healthy(server.api_url):
        if process.poll() is not None or time.monotonic() > deadline:
            reason = (f"exited with status {process.returncode}" if process.poll() is not None
                      else f"did not answer within {timeout_s:.0f} s")
            stop_server(home)
            raise PrefectServerError(f"Prefect server {reason}; last log lines of {log_path}:\n"
                                     + _log_tail(log_path))
        time.sleep(0.5)
    return server


def stop_server(home: str | os.PathLike | None = None, timeout_s: float = STOP_TIMEOUT_S) -> LocalServer | None:
    """Stop the recorded server: SIGTERM to its process group, SIGKILL after `timeout_s`."""
    server = read_server(home)
    if server is None:
        return None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)  # its own session: the group is the server and its children
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout_s
        while _is_our_process(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _is_our_process(server):
            break
    (server_home(home) / STATE_FILE).unlink(missing_ok=True)
    return server


def _log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def use_local_server(home: str | os.PathLike | None = None) -> str | None:
    """Without PREFECT_API_URL, point this process at the local server when one runs (call before
    Prefect is imported). Returns the API URL chosen, if any."""
    if not os.environ.get("PREFECT_API_URL"):
        local = read_server(home)
        if local:
            os.environ["PREFECT_API_URL"] = local.api_url
    return os.environ.get("PREFECT_API_URL")


def running_api_url(home: str | os.PathLike | None = None) -> str | None:
    """The API this process would use, if it answers: PREFECT_API_URL, else the local server."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        server = read_server(home)
        url = server.api_url if server else None
    return url if url and api_healthy(url) else None


@click.group()
def server() -> None:
    """Start, stop or check the local Prefect server (127.0.0.1, SQLite in a project-local home)."""


home_option = click.option("--home", default=None, help=f"Server home (PREFECT_HOME); default {DEFAULT_HOME} "
                           "or HLWQ_SERVER_HOME.")


@server.command("start")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="Port on 127.0.0.1 (0: any free one).")
@home_option
def server_start(port: int, home: str | None) -> None:
    """Start the server in the background and wait until it answers."""
    started = start_server(home, port)
    click.echo(f"Prefect server running: UI {started.ui_url}  (pid {started.pid}, home {started.home})")
    click.echo(f"Point clients at it:  export PREFECT_API_URL={started.api_url}")


@server.command("stop")
@home_option
def server_stop(home: str | None) -> None:
    """Stop the server started by `hlwq server start`."""
    stopped = stop_server(home)
    click.echo(f"stopped the Prefect server at {stopped.ui_url} (pid {stopped.pid})" if stopped
               else f"no Prefect server runs from {server_home(home)}")


@server.command("status")
@home_option
def server_status(home: str | None) -> None:
    """Say whether the server runs and answers; exit 1 when it does not."""
    running = read_server(home)
    if running is None:
        click.echo(f"no Prefect server runs from {server_home(home)}")
        sys.exit(1)
    healthy = api_healthy(running.api_url)
    click.echo(f"Prefect server pid {running.pid} at {running.ui_url}: "
               f"{'healthy' if healthy else 'not answering'} (log {running.log})")
    sys.exit(0 if healthy else 1)


@click.command()
@click.option("--timezone", default=None, help="Time zone of the nightly cron (IANA name; HLWQ_TIMEZONE, default UTC).")
@click.option("--watch-source", default=None, help="Hub repo watched for new revisions (HLWQ_WATCH_SOURCE).")
@click.option("--watch-interval", "watch_interval_s", type=int, default=None,
              help="Seconds between upstream checks (HLWQ_WATCH_INTERVAL_S, default 3600).")
@click.option("--bits", type=int, default=None, help="Bits for requantize (HLWQ_BITS, default 5).")
@click.option("--policy", default=None, help="Bit policy for requantize (HLWQ_POLICY, default ltx23).")
@click.option("--files", multiple=True, metavar="GLOB",
              help="Source files requantize uses (repeatable; HLWQ_FILES, comma-separated).")
@click.option("--exclude-files", multiple=True, metavar="GLOB",
              help="Source files requantize leaves out (repeatable; HLWQ_EXCLUDE_FILES).")
@click.option("--target-size", default=None,
              help="Size budget of requantize, as hlwq quantize --target-size (HLWQ_TARGET_SIZE).")
@click.option("--target-scope", type=click.Choice(SCOPES), default=None,
              help="What --target-size counts (HLWQ_TARGET_SCOPE, default package).")
@click.option("--sensitivity", type=click.Choice(SENSITIVITY_CHOICES), default=None,
              help="How requantize's budget weighs each tensor's error, as hlwq quantize "
                   "--sensitivity (HLWQ_SENSITIVITY, default auto).")
@click.option("--artifacts-dir", default=None, help="Where requantize writes artifacts (HLWQ_ARTIFACTS_DIR).")
@click.option("--nightly-artifact", default=None,
              help="Artifact the nightly render uses: a folder or a Hub repo owner/name[@revision] "
                   "(HLWQ_NIGHTLY_ARTIFACT).")
@click.option("--nightly-prompts", default=None, help="Prompt file of the nightly render (HLWQ_NIGHTLY_PROMPTS).")
@click.option("--nightly-output", default=None, help="Output folder of the nightly render (HLWQ_NIGHTLY_OUTPUT).")
@click.option("--nightly-offload", type=click.Choice(OFFLOAD_MODES),
              default=None, help="Offload mode of the nightly render (HLWQ_NIGHTLY_OFFLOAD, "
                                 "default auto; see hlwq render --offload).")
@click.option("--nightly-vae-tiling/--no-nightly-vae-tiling", default=None,
              help="Tiled VAE decode in the nightly render (HLWQ_NIGHTLY_VAE_TILING).")
@click.option("--nightly-dtype", type=click.Choice(DTYPE_NAMES),
              default=None, help="Compute dtype of the nightly render (HLWQ_NIGHTLY_DTYPE).")
@click.option("--nightly-lora", "nightly_loras", multiple=True, metavar="PATH[:SCALE]",
              help="Default LoRA of the nightly render's rows without `loras` (repeatable; "
                   "HLWQ_NIGHTLY_LORAS, comma-separated).")
@click.option("--output-suite", default=None,
              help="Prompt suite for requantize's output gates (HLWQ_OUTPUT_SUITE; default: the repo's suite).")
@click.option("--publish-to", default=None,
              help="Hub repo (owner/name[@branch]) requantize publishes to and watch-upstream "
                   "keeps current (HLWQ_PUBLISH_TO).")
@click.option("--limit", type=int, default=None, help="Most flow runs at once (default: no limit).")
@home_option
def serve(limit: int | None, home: str | None, **options) -> None:
    """Serve requantize, watch-upstream and nightly-render until interrupted."""
    # The deployments are declared one layer up; the CLI is the one place that joins them.
    from hlwq.cli.prefect_env import configure_prefect
    from hlwq.deployments.definitions import DeploymentSettings, build_deployments

    settings = DeploymentSettings.from_env(**options).absolute_paths()
    use_local_server(home)
    configure_prefect()
    from prefect import serve as prefect_serve
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    if not api_url:
        raise PrefectServerError("no Prefect server to serve against: run `hlwq server start`, "
                                 "or set PREFECT_API_URL")
    if not api_healthy(api_url):
        raise PrefectServerError(f"the Prefect API at {api_url} does not answer")
    click.echo(f"serving requantize, watch-upstream, nightly-render against {api_url} "
               f"(nightly cron in {settings.timezone})")
    prefect_serve(*build_deployments(settings), limit=limit)
