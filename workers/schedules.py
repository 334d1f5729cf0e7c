"""Scheduled jobs: definition files (YAML or JSON) that Celery beat fires on a cron line or an interval.

    name: nightly-extraction
    input: incoming/*.jsonl          # glob; relative paths are relative to the definition file
    output: results                  # each job writes to <output>/<job id>
    model: default
    cron: "0 2 * * *"                # or every_seconds: 3600
    schema: schema.json              # optional: job-level JSON schema (like `submit --schema`)
    job:                             # any other JobSpec fields: sampling, template, system_prompt, ...
      template: "Extract the fields from: {text}"
      sampling: {max_tokens: 128, temperature: 0}

Each firing submits one job per input file not seen before; "seen" is a Redis set per definition name
(`JobStore.claim_input`) keyed by path, size and mtime, so a file that changes is processed again.
"""
import glob
import json
import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from celery.schedules import crontab
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from batchgen.jobs.errors import JobInputError, JobOutputError, one_line
from batchgen.jobs.spec import JobSpec, new_job_id
from batchgen.jobs.store import JobStore
from batchgen.workers.app import FIRE_SCHEDULE_TASK, queue_name

log = logging.getLogger("batchgen.workers")

DEFINITION_SUFFIXES = (".yaml", ".yml", ".json")
# Set per firing; a definition must not pin them.
_FIRING_FIELDS = frozenset({"job_id", "input", "output", "model", "input_summary", "created_at"})


class ScheduleDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    input: str                                   # glob of local files
    output: str                                  # jobs write to <output>/<job id>
    model: str = "default"
    cron: str | None = None                      # five fields: minute hour day-of-month month day-of-week
    every_seconds: float | None = Field(None, gt=0)
    min_file_age_s: float = Field(30.0, ge=0)    # skip files still being written
    job: dict[str, Any] = {}                     # JobSpec fields

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            cron_schedule(value)
        return value

    @field_validator("job")
    @classmethod
    def _valid_job(cls, value: dict[str, Any]) -> dict[str, Any]:
        pinned = sorted(_FIRING_FIELDS & value.keys())
        if pinned:
            raise ValueError(f"job must not set {pinned}: each firing sets them")
        JobSpec(input="-", output="-", **value)     # the same validation a submit does
        return value

    @model_validator(mode="after")
    def _one_schedule(self):
        if (self.cron is None) == (self.every_seconds is None):
            raise ValueError("give exactly one of cron and every_seconds")
        return self

    def schedule(self) -> crontab | timedelta:
        return cron_schedule(self.cron) if self.cron else timedelta(seconds=self.every_seconds)


def cron_schedule(line: str) -> crontab:
    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"cron {line!r} must have five fields: minute hour day-of-month month day-of-week")
    minute, hour, day_of_month, month, day_of_week = fields
    try:
        return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month,
                       day_of_week=day_of_week)
    except ValueError as exc:
        raise ValueError(f"cron {line!r}: {exc}") from None


def load_definition(path: str | Path) -> ScheduleDefinition:
    """One definition file; relative input, output and schema paths are taken from the file's directory.
    Raises ValueError naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("must be a mapping of settings")
        base = path.parent.resolve()
        for name in ("input", "output", "schema"):
            if isinstance(raw.get(name), str) and "://" not in raw[name]:
                raw[name] = os.path.normpath(base / os.path.expanduser(raw[name]))
        schema_file = raw.pop("schema", None)
        if schema_file is not None:
            schema = json.loads(Path(schema_file).read_text())
            raw["job"] = {**(raw.get("job") or {}), "structured": {"json_schema": schema}}
        return ScheduleDefinition.model_validate(raw)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: {one_line(exc)}") from None


def load_definitions(directory: str | Path) -> list[ScheduleDefinition]:
    """Every definition file in a directory, by file name; two with the same name are an error."""
    definitions = [load_definition(p) for p in sorted(Path(directory).iterdir())
                   if p.suffix in DEFINITION_SUFFIXES and p.is_file()]
    names = [d.name for d in definitions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{directory}: more than one definition named {duplicates}")
    return definitions


def beat_schedule(definitions: list[ScheduleDefinition]) -> dict[str, dict]:
    """Celery beat entries: each firing runs `fire_schedule` on a worker of the definition's model."""
    return {f"batchgen:{d.name}": {"task": FIRE_SCHEDULE_TASK, "schedule": d.schedule(),
                                   "args": (d.model_dump(mode="json"),), "options": {"queue": queue_name(d.model)}}
            for d in definitions}


def fire(definition: ScheduleDefinition, store: JobStore) -> list[str]:
    """Submit a job for each input file this definition hasn't seen; returns the new job ids. A file that is
    refused (unreadable, no valid rows) is logged and not tried again until it changes."""
    from batchgen.workers.submit import submit_job

    job_ids = []
    for path in sorted(glob.glob(definition.input)):
        try:
            stat = os.stat(path)
        except OSError:
            continue            # vanished since the glob
        if not os.path.isfile(path) or time.time() - stat.st_mtime < definition.min_file_age_s:
            continue
        if not store.claim_input(definition.name, f"{path}|{stat.st_size}|{stat.st_mtime_ns}"):
            continue
        job_id = new_job_id()
        try:
            spec = JobSpec(job_id=job_id, input=path, output=os.path.join(definition.output, job_id),
                           model=definition.model, **definition.job)
            submit_job(spec, store)
        except (JobInputError, JobOutputError, ValueError) as exc:
            log.error("schedule %s: %s refused: %s", definition.name, path, one_line(exc))
            continue
        log.info("schedule %s: job %s for %s", definition.name, job_id, path)
        job_ids.append(job_id)
    return job_ids
