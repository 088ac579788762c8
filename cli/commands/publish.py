"""`hlwq publish ARTIFACT REPO_ID`: verify an artifact and upload it to a Hub model repo."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--revision", help="Branch to commit to (created from main if new) [default: main, "
                                 "or the @BRANCH of REPO_ID].")
@click.option("--private", is_flag=True, help="Create the repo private (applies when it is "
                                              "created; an existing public repo is refused).")
@click.option("--commit-message", help="Commit summary [default: names source, commit and bits].")
@click.option("--allow-unvalidated", is_flag=True,
              help="Publish an artifact whose gates failed or were skipped.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def publish(artifact, repo_id, revision, private, commit_message, allow_unvalidated, as_json):
    """Verify ARTIFACT (every hash, every tensor entry; it must be validated) and publish it to
    the Hub model repo REPO_ID (owner/name[@branch]) as one commit: the repo is created if
    needed, unchanged files are not sent again, files the artifact no longer has are deleted,
    and publishing the same bytes again makes no commit. The token comes from HF_TOKEN or
    `hf auth login`."""
    from hlwq.tasks.publish import publish_artifact

    result = publish_artifact(artifact, repo_id, revision=revision, private=private,
                              commit_message=commit_message, allow_unvalidated=allow_unvalidated)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    where = f"{result['repo']}@{result['revision']}"
    if not result["committed"]:
        click.echo(f"{where}: already holds these bytes (commit {result['commit']}); no new commit")
        return
    created = " (repo created)" if result["created_repo"] else ""
    click.echo(f"{where}: commit {result['commit']}{created}: {len(result['uploaded'])} files "
               f"added or changed, {len(result['deleted'])} deleted, {result['unchanged']} "
               f"unchanged; {result['url']}")
