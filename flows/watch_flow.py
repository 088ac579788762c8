"""`watch_upstream`: requantize when the source repo on the Hub moves to a new revision.

The last revision handed to `requantize` is remembered in a Prefect Variable (it lives with the
orchestrator, so it holds wherever the watch runs: served process or work-pool worker). A
revision is triggered once; it is triggered again only when its requantize run ended in a
failed, crashed or cancelled state.

With ``publish_to`` the published artifact is the record that counts: when its manifest names
the source's current commit (at the same bits and policy) nothing is triggered, whatever the
Variable says; otherwise requantize runs with ``publish_to`` and publishes the new artifact.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.variables import Variable

from hlwq.runtime.hub import published_manifest
from hlwq.tasks.sources import latest_revision

REQUANTIZE_DEPLOYMENT = "quantize_checkpoint/requantize"
RETRIGGER_STATES = {"FAILED", "CRASHED", "CANCELLED"}


def state_variable_name(source: str) -> str:
    """Variable names allow letters, digits, dashes and underscores."""
    return "hlwq_watch_" + re.sub(r"[^a-z0-9_-]+", "_", source.lower()).strip("_")


def artifact_output(output_root: str, source: str, revision: str, bits: int) -> str:
    """One artifact directory per source revision and bit width, so earlier artifacts stay."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.split("/")[-1])
    return f"{output_root.rstrip('/')}/{name}-{revision[:12]}-q{bits}"


@task(name="latest-revision", retries=3, retry_delay_seconds=[5, 30, 120], persist_result=False)
def check_latest_revision(source: str) -> str:
    return latest_revision(source)


@task(name="published-lineage", persist_result=False)
def published_lineage(publish_to: str) -> dict | None:
    """Source commit, bits and policy of the artifact published at ``publish_to`` (None: none)."""
    manifest = published_manifest(publish_to)
    if manifest is None:
        return None
    policy = manifest["quantization"].get("policy")
    return {"commit_sha": manifest["source"].get("commit_sha"),
            "bits": manifest["quantization"].get("bits"),
            "policy": policy.get("name") if isinstance(policy, dict) else policy}


@task(name="read-watch-state", persist_result=False)
def read_watch_state(source: str) -> dict[str, Any] | None:
    return Variable.get(state_variable_name(source), default=None)


@task(name="previous-run-state", persist_result=False)
def previous_run_state(flow_run_id: str) -> str | None:
    """Type of the earlier requantize run's state (None when that run is gone)."""
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(flow_run_id)
        except ObjectNotFound:  # a deleted run: as if it never ran
            return None
    return run.state.type.value if run.state else None


@task(name="trigger-requantize", persist_result=False)
def trigger_requantize(deployment: str, parameters: dict[str, Any]) -> str:
    run = run_deployment(deployment, parameters=parameters, timeout=0,
                         flow_run_name=f"requantize {parameters['revision'][:12]}")
    return str(run.id)


@flow(name="watch-upstream", persist_result=False)
def watch_upstream(
    source: str,
    output_root: str,
    bits: int = 5,
    policy: str = "ltx23",
    requantize_deployment: str = REQUANTIZE_DEPLOYMENT,
    files: list[str] | None = None,
    exclude_files: list[str] | None = None,
    publish_to: str | None = None,
) -> dict[str, Any]:
    """Check `source`'s latest revision on the Hub; trigger `requantize` when it is new (with
    `publish_to`: when the artifact published there is not of it)."""
    logger = get_run_logger()
    revision = check_latest_revision(source)
    if publish_to:
        published = published_lineage(publish_to)
        if published == {"commit_sha": revision, "bits": bits, "policy": policy}:
            logger.info("%s holds the quantization of %s at %s; nothing to do", publish_to,
                        source, revision)
            return {"triggered": False, "revision": revision, "published": True}
    state = read_watch_state(source)
    if state and state.get("revision") == revision:
        previous = previous_run_state(state["flow_run_id"])
        if previous is not None and previous not in RETRIGGER_STATES:
            logger.info("%s is still at %s (requantize run %s: %s); nothing to do",
                        source, revision, state["flow_run_id"], previous)
            return {"triggered": False, "revision": revision, "flow_run_id": state["flow_run_id"]}
        logger.info("%s at %s: the earlier requantize run %s; triggering again", source, revision,
                    f"ended {previous}" if previous else "is gone")
    parameters = {"source": source, "revision": revision, "bits": bits, "policy": policy,
                  "out": artifact_output(output_root, source, revision, bits),
                  **({"files": files} if files else {}),
                  **({"exclude_files": exclude_files} if exclude_files else {}),
                  **({"publish_to": publish_to} if publish_to else {})}
    flow_run_id = trigger_requantize(requantize_deployment, parameters)
    Variable.set(state_variable_name(source), {"source": source, "revision": revision,
                                               "flow_run_id": flow_run_id}, overwrite=True)
    logger.info("%s moved to %s: requantize run %s triggered (output %s)", source, revision,
                flow_run_id, parameters["out"])
    return {"triggered": True, "revision": revision, "flow_run_id": flow_run_id}
