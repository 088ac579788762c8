"""`validate_artifact`: the output gates on their own, for an artifact that already exists.

Renders the prompt suite with the source and the artifact, writes the report into
``ARTIFACT/validation/`` (or ``report_dir``), records the verdict in the manifest when the
report lives in the artifact, and attaches the report to the run. The run ends Failed, its
message naming the failing prompts and blocks, when a gate fails; the results travel as the
state's data either way.
"""

from __future__ import annotations

from prefect import flow
from prefect.states import Completed, Failed, State

from hlwq.tasks.validate_output import CANDIDATE_FACTORY, failure_message, output_gates_task


@flow(name="validate_artifact", flow_run_name="validate {artifact}", persist_result=False)
def validate_artifact(artifact: str, against: str, suite: str | None = None,
                      gates_file: str | None = None, report_dir: str | None = None,
                      work_dir: str | None = None, device: str = "auto",
                      long_side: int | None = None, frames: int | None = None,
                      steps: int | None = None,
                      candidate_factory: str = CANDIDATE_FACTORY) -> State:
    """Apply the output gates of ``gates_file`` (default tasks/gates.toml) to ``artifact``."""
    results = output_gates_task(against, artifact, suite, gates_file=gates_file, enforce=False,
                                report_dir=report_dir, work_dir=work_dir, device=device,
                                long_side=long_side, frames=frames, steps=steps,
                                candidate_factory=candidate_factory)
    if results["passed"]:
        return Completed(message=f"output gates passed on {len(results['prompts'])} prompts",
                         data=results)
    return Failed(message=failure_message(results, "the artifact is not marked validated"),
                  data=results)
