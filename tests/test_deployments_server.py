"""Deployments, `hlwq serve` and `hlwq server` against a real Prefect server process.

The slow test is the operators' day: a real `prefect server start` on a free loopback port with
its own home, `hlwq serve` in a subprocess, a local Hub whose revision moves, watch-upstream
triggering requantize, and nightly-render rendering from the artifact requantize made.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hlwq.cli.commands.demo import DEMO_PROMPTS, DEMO_SIZE
from hlwq.cli.commands.serve import (
    PrefectServerError,
    api_healthy,
    read_server,
    start_server,
    stop_server,
)
from hlwq.deployments.definitions import NIGHTLY_CRON, DeploymentSettings, build_deployments
from hlwq.flows.watch_flow import artifact_output, state_variable_name
from hlwq.quant.errors import InvalidOptionError

REPO = Path(__file__).resolve().parents[1]
HLWQ = str(Path(sys.executable).parent / "hlwq")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def test_prefect_yaml_declares_the_deployments_hlwq_serve_serves():
    declared = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    served = {d.name: d for d in build_deployments(DeploymentSettings())}
    assert declared.keys() == served.keys() == {"requantize", "watch-upstream", "nightly-render"}
    for name, deployment in served.items():
        path, function = declared[name]["entrypoint"].split(":")
        assert deployment.entrypoint == "hlwq." + path.removesuffix(".py").replace("/", ".") + "." + function
        assert declared[name]["parameters"] == deployment.parameters
        assert declared[name]["work_pool"]["name"] == "hlwq-process"
    assert declared["nightly-render"]["schedules"] == [{"cron": NIGHTLY_CRON, "timezone": "UTC"}]
    assert declared["watch-upstream"]["schedules"] == [{"interval": 3600, "timezone": "UTC"}]
    assert declared["requantize"]["schedules"] == []


def test_nightly_render_takes_default_loras(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HLWQ_NIGHTLY_LORAS", "loras/style.safetensors:0.8, /abs/detail.safetensors")
    settings = DeploymentSettings.from_env().absolute_paths()
    nightly = {d.name: d for d in build_deployments(settings)}["nightly-render"]
    assert nightly.parameters["loras"] == [
        {"path": str(tmp_path / "loras" / "style.safetensors"), "scale": 0.8},
        {"path": "/abs/detail.safetensors", "scale": 1.0}]
    overridden = DeploymentSettings.from_env(nightly_loras=("x.safetensors:0.5",))
    assert overridden.lora_parameters() == [{"path": "x.safetensors", "scale": 0.5}]


def test_settings_come_from_options_then_environment(monkeypatch):
    monkeypatch.setenv("HLWQ_TIMEZONE", "Asia/Tokyo")
    monkeypatch.setenv("HLWQ_WATCH_INTERVAL_S", "600")
    settings = DeploymentSettings.from_env(nightly_output="renders/x", bits=None)
    assert (settings.timezone, settings.watch_interval_s, settings.nightly_output, settings.bits) == (
        "Asia/Tokyo", 600, "renders/x", 5)
    with pytest.raises(InvalidOptionError, match="not an IANA time zone"):
        DeploymentSettings.from_env(timezone="Mars/Olympus")
    monkeypatch.setenv("HLWQ_BITS", "five")
    with pytest.raises(InvalidOptionError, match="HLWQ_BITS must be a whole number"):
        DeploymentSettings.from_env()


def test_file_globs_reach_requantize_and_watch(monkeypatch):
    monkeypatch.setenv("HLWQ_FILES", "ltx-2.3-22b-dev.safetensors, ltx-2.3-spatial-*")
    settings = DeploymentSettings.from_env(exclude_files=(), files=())   # empty options: env wins
    assert settings.files == ("ltx-2.3-22b-dev.safetensors", "ltx-2.3-spatial-*")
    assert DeploymentSettings.from_env(files=("x.safetensors",)).files == ("x.safetensors",)
    served = {d.name: d for d in build_deployments(settings)}
    for name in ("requantize", "watch-upstream"):
        assert served[name].parameters["files"] == list(settings.files)
        assert "exclude_files" not in served[name].parameters


def test_render_placement_reaches_nightly_render(monkeypatch):
    monkeypatch.setenv("HLWQ_NIGHTLY_VAE_TILING", "yes")
    settings = DeploymentSettings.from_env(nightly_offload="group", nightly_dtype="float16")
    nightly = {d.name: d for d in build_deployments(settings)}["nightly-render"]
    assert {k: nightly.parameters[k] for k in ("offload", "vae_tiling", "dtype")} == {
        "offload": "group", "vae_tiling": True, "dtype": "float16"}
    with pytest.raises(InvalidOptionError, match="--offload 'disk'"):
        DeploymentSettings.from_env(nightly_offload="disk")
    monkeypatch.setenv("HLWQ_NIGHTLY_VAE_TILING", "maybe")
    with pytest.raises(InvalidOptionError, match="'maybe'"):
        DeploymentSettings.from_env()


def test_requantize_takes_the_budget_options_of_hlwq_quantize(monkeypatch):
    """requantize's parameters are the flow's, and the size-budget options of `hlwq quantize`
    reach it (from `hlwq serve` options or HLWQ_*) with the same defaults and choices."""
    import inspect

    from hlwq.cli.commands.quantize import quantize
    from hlwq.cli.commands.serve import serve
    from hlwq.flows.quantize_flow import quantize_checkpoint

    budget = ("target_size", "target_scope", "sensitivity")
    cli = {p.name: p for p in quantize.params}
    served_options = {p.name: p for p in serve.params}
    defaults = {d.name: d for d in build_deployments(DeploymentSettings())}["requantize"].parameters
    assert set(defaults) <= set(inspect.signature(quantize_checkpoint.fn).parameters)
    assert {k: defaults[k] for k in budget[1:]} == {k: cli[k].default for k in budget[1:]}
    assert "target_size" not in defaults and "target_size" in cli   # no default: no budget
    for name in budget[1:]:
        assert served_options[name].type.choices == cli[name].type.choices
    monkeypatch.setenv("HLWQ_SENSITIVITY", "params")
    settings = DeploymentSettings.from_env(target_size="15GB", target_scope="transformer")
    served = {d.name: d for d in build_deployments(settings)}["requantize"].parameters
    assert {k: served[k] for k in budget} == {"target_size": "15GB", "target_scope": "transformer",
                                              "sensitivity": "params"}
    with pytest.raises(InvalidOptionError, match="--sensitivity 'weights'"):
        DeploymentSettings.from_env(sensitivity="weights")
    with pytest.raises(InvalidOptionError):
        DeploymentSettings.from_env(target_size="big")


def test_watch_names_are_valid_prefect_names():
    assert state_variable_name("Lightricks/LTX-2.3") == "hlwq_watch_lightricks_ltx-2_3"
    assert artifact_output("art/", "Lightricks/LTX-2.3", "0123456789abcdef", 5) == "art/LTX-2.3-0123456789ab-q5"


# ---- the real server -------------------------------------------------------------------------


class Api:
    """Plain REST reads (this server answers 422 to the nulls some client helpers send)."""

    def __init__(self, client):
        self.client = client

    def post(self, path, body):
        return self.client.request("POST", path, json={"limit": 100, "offset": 0, **body}).json()

    def deployments(self):
        return {d["name"]: d for d in self.post("/deployments/filter", {})}

    def runs(self, deployment):
        return self.post("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}},
                                               "sort": "EXPECTED_START_TIME_ASC"})

    def run(self, flow_run_id):
        return self.client.request("GET", f"/flow_runs/{flow_run_id}").json()


def wait_for(condition, timeout_s, what, log=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    tail = "\n".join(Path(log).read_text().splitlines()[-40:]) if log else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")


def trigger(api, name, log, parameters=None, timeout_s=150):
    """Run a deployment through the API and wait for its final state."""
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=parameters, timeout=0)
    return finished(api, run.id, log, timeout_s)


def finished(api, flow_run_id, log, timeout_s=150):
    return wait_for(lambda: (run := api.run(flow_run_id))["state"]["type"] in FINAL and run,
                    timeout_s, f"flow run {flow_run_id}", log)


@pytest.mark.slow
def test_served_deployments_watch_requantize_and_render_nightly(tmp_path):
    from hub_server import LocalHub
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from hlwq.runtime.video import probe_mp4
    from hlwq.store.catalog import read_catalog
    from hlwq.testing.fixtures import make_tiny_ltx23

    source = make_tiny_ltx23(tmp_path / "tiny")
    prompts = tmp_path / "nightly.jsonl"
    size = {"width": 32, "height": 32, "frames": 9, "fps": 24, "steps": 2, "guidance": 1.0}
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p, **size}) + "\n"
                               for i, p in (("harbour", "boats in a harbour"), ("forest", "wind in a forest"))))
    # requantize's output gates on one prompt (the demo's first) instead of the suite: quicker.
    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({**DEMO_PROMPTS[0], **DEMO_SIZE}) + "\n")
    with LocalHub() as hub:
        first = hub.add_repo("acme/ltx-tiny", source)
        artifact = artifact_output(str(tmp_path / "artifacts"), "acme/ltx-tiny", first, 5)
        server = start_server(tmp_path / "prefect-home", port=0)
        assert read_server(tmp_path / "prefect-home") == server and api_healthy(server.api_url)
        with pytest.raises(PrefectServerError, match="already runs"):
            start_server(tmp_path / "prefect-home", port=0)
        log = tmp_path / "serve.log"
        env = {**os.environ, **hub.environ(tmp_path / "hf"), "PREFECT_API_URL": server.api_url,
               "PREFECT_HOME": str(tmp_path / "client-home"), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
               "PREFECT_LOGGING_LEVEL": "INFO"}
        with open(log, "wb") as out:
            serve = subprocess.Popen(
                [HLWQ, "serve", "--watch-source", "acme/ltx-tiny", "--timezone", "Europe/Paris",
                 "--artifacts-dir", str(tmp_path / "artifacts"), "--nightly-artifact", artifact,
                 "--nightly-prompts", str(prompts), "--nightly-output", str(tmp_path / "renders"),
                 "--policy", "ltx23", "--bits", "5", "--output-suite", str(suite)],
                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
                api = Api(client)
                deployments = wait_for(lambda: len(found := api.deployments()) == 3 and found, 120,
                                       "three deployments", log)

                # Schedules and parameters, as the server has them.
                nightly, watch, requantize = (deployments[n] for n in ("nightly-render", "watch-upstream", "requantize"))
                (cron,) = [s["schedule"] for s in nightly["schedules"]]
                assert (cron["cron"], cron["timezone"]) == ("0 2 * * *", "Europe/Paris")
                (interval,) = [s["schedule"] for s in watch["schedules"]]
                assert interval["interval"] == 3600
                assert requantize["schedules"] == []
                assert nightly["parameters"] == {"artifact": artifact, "prompt_file": str(prompts),
                                                 "output_dir": str(tmp_path / "renders"),
                                                 "offload": "auto", "vae_tiling": False,
                                                 "dtype": "auto"}
                assert watch["parameters"]["source"] == "acme/ltx-tiny"
                assert {"source", "revision", "bits", "policy", "out"} <= set(
                    requantize["parameter_openapi_schema"]["properties"])

                # A new upstream revision triggers requantize once.
                assert trigger(api, "watch-upstream/watch-upstream", log)["state"]["type"] == "COMPLETED"
                (first_run,) = api.runs(requantize)
                assert first_run["parameters"] == {"source": "acme/ltx-tiny", "revision": first, "bits": 5,
                                                   "policy": "ltx23", "out": artifact,
                                                   "output_suite": str(suite),
                                                   "target_scope": "package", "sensitivity": "auto"}
                assert finished(api, first_run["id"], log, 240)["state"]["type"] == "COMPLETED"
                assert (Path(artifact) / "manifest.json").is_file()
                assert trigger(api, "watch-upstream/watch-upstream", log)["state"]["type"] == "COMPLETED"
                assert len(api.runs(requantize)) == 1  # same revision: nothing new

                # Upstream moves to a broken revision: triggered, fails, and is tried again next time.
                (tmp_path / "broken").mkdir()
                (tmp_path / "broken" / "README.md").write_text("weights moved elsewhere\n")
                second = hub.commit("acme/ltx-tiny", tmp_path / "broken")
                trigger(api, "watch-upstream/watch-upstream", log)
                runs = api.runs(requantize)
                assert [r["parameters"]["revision"] for r in runs] == [first, second]
                assert finished(api, runs[1]["id"], log)["state"]["type"] == "FAILED"
                trigger(api, "watch-upstream/watch-upstream", log)
                assert [r["parameters"]["revision"] for r in api.runs(requantize)] == [first, second, second]
                finished(api, api.runs(requantize)[2]["id"], log)

                # Nightly render from the artifact requantize made, then again: nothing new.
                rendered = trigger(api, "render-batch/nightly-render", log, timeout_s=240)
                assert rendered["state"]["type"] == "COMPLETED", rendered["state"]["message"]
                rows = read_catalog(tmp_path / "renders").to_pylist()
                assert sorted(r["id"] for r in rows) == ["forest", "harbour"]
                for row in rows:
                    info = probe_mp4(row["output_path"])
                    assert (info.frames, info.width, info.height, info.audio_codec) == (9, 32, 32, "aac")
                    assert row["artifact"] == artifact
                again = trigger(api, "render-batch/nightly-render", log)
                assert again["state"]["message"] == "0 rendered, 2 skipped (already catalogued), 0 failed, 0 rows rejected"
                assert len(read_catalog(tmp_path / "renders")) == 2
        finally:
            serve.send_signal(signal.SIGINT)  # serve pauses its schedules and exits
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()
            stopped = stop_server(tmp_path / "prefect-home")
    assert stopped == server and not api_healthy(server.api_url)
    assert read_server(tmp_path / "prefect-home") is None


def test_server_cli_without_a_server(tmp_path):
    """The CLI paths that need no running server."""
    home = tmp_path / "home"
    status = subprocess.run([HLWQ, "server", "status", "--home", str(home)], capture_output=True, text=True, check=False)
    assert status.returncode == 1 and "no Prefect server runs" in status.stdout
    stop = subprocess.run([HLWQ, "server", "stop", "--home", str(home)], capture_output=True, text=True, check=False)
    assert stop.returncode == 0 and "no Prefect server runs" in stop.stdout
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "empty-profile-home")
    serve = subprocess.run([HLWQ, "serve", "--home", str(home)], capture_output=True, text=True, env=env, check=False)
    assert serve.returncode == 2 and "no Prefect server to serve against" in serve.stderr
