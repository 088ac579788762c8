"""The package step as a Prefect task (the logic: store/package.py)."""

from prefect import task

from hlwq.store.package import package_artifact

# Results are not persisted: the artifact is the result; the summary is small.
package_artifact_task = task(name="package", persist_result=False)(package_artifact)
