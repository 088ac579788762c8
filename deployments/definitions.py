"""The three deployments and their schedules: requantize, watch-upstream, nightly-render.

Declarations only. Settings come from `hlwq serve` options or HLWQ_* environment variables;
prefect.yaml at the repository root declares the same deployments for `prefect deploy` onto a
work pool (docs/OPERATIONS.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hlwq.quant.choices import SCOPES, SENSITIVITY_CHOICES
from hlwq.quant.errors import InvalidOptionError
from hlwq.quant.sizes import parse_size
from hlwq.runtime.hub import is_hub_reference
from hlwq.runtime.offload import check_offload
from hlwq.store.prompts import lora_option

REQUANTIZE, WATCH_UPSTREAM, NIGHTLY_RENDER = "requantize", "watch-upstream", "nightly-render"
NIGHTLY_CRON = "0 2 * * *"
TAGS = ["hlwq"]
BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
PATH_FIELDS = ("artifacts_dir", "nightly_artifact", "nightly_prompts", "nightly_output", "output_suite")


@dataclass(frozen=True)
class DeploymentSettings:
    """What the deployments need to know; every field has an HLWQ_<FIELD> environment variable."""

    timezone: str = "UTC"
    watch_source: str = "Lightricks/LTX-2.3"
    watch_interval_s: int = 3600
    bits: int = 5
    policy: str = "ltx23"
    artifacts_dir: str = "artifacts"
    nightly_artifact: str = "artifacts/current"
    nightly_prompts: str = "prompts/nightly.jsonl"
    nightly_output: str = "renders/nightly"
    nightly_offload: str = "auto"    # placement: as hlwq render's --offload, --vae-tiling, --dtype
    nightly_vae_tiling: bool = False
    nightly_dtype: str = "auto"
    nightly_loras: tuple[str, ...] = ()  # default LoRAs of the nightly render: PATH or PATH:SCALE
    output_suite: str | None = None  # prompt suite of requantize's output gates (None: the default suite)
    publish_to: str | None = None    # Hub repo (owner/name[@branch]) requantize publishes to
    files: tuple[str, ...] = ()      # globs choosing the source's files (env: comma-separated)
    target_size: str | None = None   # requantize's size budget: as hlwq quantize --target-size, ...
    target_scope: str = "package"    # ... --target-scope and --sensitivity
    sensitivity: str = "auto"
    exclude_files: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, **overrides) -> DeploymentSettings:
        values = {}
        for field in fields(cls):
            raw = os.environ.get(f"HLWQ_{field.name.upper()}")
            if raw and field.type == "int" and not raw.isdigit():
                raise InvalidOptionError(f"HLWQ_{field.name.upper()} must be a whole number, got {raw!r}")
            if raw:
                values[field.name] = _parsed(raw, field.type)
        values.update({name: value for name, value in overrides.items()
                       if value is not None and value != ()})
        return cls(**values).checked()

    def checked(self) -> DeploymentSettings:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidOptionError(f"timezone {self.timezone!r} is not an IANA time zone (e.g. Europe/Paris)") from None
        check_offload(self.nightly_offload, self.nightly_dtype)
        for name, value, choices in (("target-scope", self.target_scope, SCOPES),
                                     ("sensitivity", self.sensitivity, SENSITIVITY_CHOICES)):
            if value not in choices:
                raise InvalidOptionError(f"--{name} {value!r}: must be one of {', '.join(choices)}")
        if self.target_size is not None:
            parse_size(self.target_size)
        if self.watch_interval_s < 60:
            raise InvalidOptionError(f"watch interval must be at least 60 s, got {self.watch_interval_s}")
        self.lora_parameters()
        return self

    def lora_parameters(self) -> list[dict]:
        """The nightly LoRAs as render_batch takes them: ``[{"path": ..., "scale": ...}]``."""
        return [lora_option(text) for text in self.nightly_loras]

    def source_files(self) -> dict:
        """The file-choosing parameters of a quantize run (none when no globs are set)."""
        return {name: list(value) for name in ("files", "exclude_files")
                if (value := getattr(self, name))}

    def absolute_paths(self) -> DeploymentSettings:
        """Paths as seen from here, so runs started elsewhere read the same files."""
        paths = {name: str(Path(value).expanduser().resolve())
                 for name in PATH_FIELDS
                 if (value := getattr(self, name)) and not is_hub_reference(value)}
        loras = tuple(_joined(str(Path(lora["path"]).expanduser().resolve()), lora["scale"])
                      for lora in self.lora_parameters())
        return replace(self, **paths, nightly_loras=loras)

    def budget(self) -> dict:
        """The size-budget parameters of requantize (target_size only when one is set)."""
        return {**({"target_size": self.target_size} if self.target_size else {}),
                "target_scope": self.target_scope, "sensitivity": self.sensitivity}

    def publishing(self) -> dict:
        """The publish parameter of requantize and watch-upstream (none when not publishing)."""
        return {"publish_to": self.publish_to} if self.publish_to else {}


def _joined(path: str, scale: float) -> str:
    return f"{path}:{scale!r}"


def _parsed(raw: str, annotation: str):
    """An HLWQ_* value as its field's type: whole numbers, comma-separated globs, or text."""
    if annotation == "int":
        return int(raw)
    if annotation == "bool":
        if raw.lower() not in BOOL_WORDS:
            raise InvalidOptionError(f"{raw!r}: must be one of {', '.join(BOOL_WORDS)}")
        return BOOL_WORDS[raw.lower()]
    if annotation.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def build_deployments(settings: DeploymentSettings) -> list:
    """Runner deployments for `prefect.serve`."""
    from prefect.schedules import Cron, Interval
    from prefect.types.entrypoint import EntrypointType

    from hlwq.flows.quantize_flow import quantize_checkpoint
    from hlwq.flows.render_flow import render_batch
    from hlwq.flows.watch_flow import watch_upstream

    module = EntrypointType.MODULE_PATH  # runs import the installed package, whatever the directory
    requantize = quantize_checkpoint.to_deployment(
        REQUANTIZE,
        description="Quantize a checkpoint (Hub id@revision, folder or file) into a packed HLWQ artifact; "
                    "with publish_to, publish it to that Hub repo. On demand.",
        parameters={"source": settings.watch_source, "bits": settings.bits, "policy": settings.policy,
                    **settings.source_files(), **settings.budget(), **settings.publishing(),
                    **({"output_suite": settings.output_suite} if settings.output_suite else {})},
        tags=TAGS,
        entrypoint_type=module,
    )
    watch = watch_upstream.to_deployment(
        WATCH_UPSTREAM,
        description="Check the source repo's latest Hub revision; trigger requantize when it changes "
                    "(and, with publish_to, when the published artifact is not of it).",
        schedule=Interval(timedelta(seconds=settings.watch_interval_s), timezone=settings.timezone),
        parameters={"source": settings.watch_source, "output_root": settings.artifacts_dir,
                    "bits": settings.bits, "policy": settings.policy, **settings.source_files(),
                    **settings.publishing(),
                    "requantize_deployment": f"{quantize_checkpoint.name}/{REQUANTIZE}"},
        tags=TAGS,
        entrypoint_type=module,
    )
    nightly = render_batch.to_deployment(
        NIGHTLY_RENDER,
        description="Render the nightly prompt file with the packed runtime into MP4s and the catalog "
                    "(the artifact: a folder or a Hub repo owner/name[@revision]).",
        schedule=Cron(NIGHTLY_CRON, timezone=settings.timezone),
        parameters={"artifact": settings.nightly_artifact, "prompt_file": settings.nightly_prompts,
                    "output_dir": settings.nightly_output, "offload": settings.nightly_offload,
                    "vae_tiling": settings.nightly_vae_tiling,
                    "dtype": settings.nightly_dtype,
                    **({"loras": settings.lora_parameters()} if settings.nightly_loras else {})},
        tags=TAGS,
        entrypoint_type=module,
    )
    return [requantize, watch, nightly]
