"""What the services answer, as plain dataclasses.

States are the plain names (``"ACCEPTED"``, ``"RUNNING"``, ``"COMPLETED"``),
times are timezone-aware ``datetime``s, and an ID that is not set yet is
``None``. ``dataclasses.asdict`` turns any of them into a dict, and pandas takes
a list of them as it is: ``pandas.DataFrame(client.files("CTA-000001"))``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from .errors import Violation
from .v1 import catalog_pb2, common_pb2, request_pb2, status_pb2

# Productions in these states never change again.
TERMINAL_STATES = frozenset(
    {"REJECTED", "COMPLETED", "PARTIALLY_COMPLETED", "FAILED", "CANCELLED"}
)


def _state(enum, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)


def production_state(value: int) -> str:
    return _state(common_pb2.ProductionState, value, "PRODUCTION_STATE_")


def _time(unix_ms: int) -> datetime | None:
    return datetime.fromtimestamp(unix_ms / 1000, tz=timezone.utc) if unix_ms else None


def _violations(message) -> list[Violation]:
    return [Violation(v.field, v.description) for v in message.violations]


@dataclass(frozen=True)
class Submission:
    """Intake's answer to a submission: the request is stored and being checked."""

    request_id: str
    # True when the idempotency key had been seen: this is the earlier request.
    replayed: bool


@dataclass(frozen=True)
class PointingProduction:
    """One pointing of a request that named an observation period, and what
    became of it: its own production, the existing one that has it, or why
    it was not produced."""

    # ``zenith 20 deg, azimuth 180 deg``.
    pointing: str
    zenith_deg: float
    azimuth_deg: float
    # The new production of this pointing.
    production_id: str | None
    fingerprint: str
    # The production that already has this pointing's simulation.
    existing_production_id: str | None
    violations: list[Violation]

    @classmethod
    def from_pb(cls, p: common_pb2.PointingProduction) -> PointingProduction:
        return cls(
            pointing=p.pointing,
            zenith_deg=p.zenith_deg,
            azimuth_deg=p.azimuth_deg,
            production_id=p.production_id or None,
            fingerprint=p.fingerprint,
            existing_production_id=p.existing_production_id or None,
            violations=_violations(p),
        )


@dataclass(frozen=True)
class Request:
    """Where a request stands: RECEIVED (being checked), ACCEPTED or REJECTED."""

    request_id: str
    state: str
    profile: str
    vo: str
    backend: str
    parameters: dict[str, Any]
    # Set once accepted.
    production_id: str | None
    # Set when rejected as a duplicate of this production (or, with
    # reuse_existing, accepted as it).
    existing_production_id: str | None
    # Why it was rejected.
    violations: list[Violation]
    created: datetime | None
    # The observation period it named, if any.
    period: str | None = None
    # For a period's request, once decided: one entry per pointing, each its
    # own production (``production_id`` is then the first new one).
    productions: list[PointingProduction] = field(default_factory=list)

    @property
    def production_ids(self) -> list[str]:
        """Every new production of the request (one per pointing of a period)."""
        if self.productions:
            return [p.production_id for p in self.productions if p.production_id]
        return [self.production_id] if self.production_id else []

    @property
    def decided(self) -> bool:
        return self.state in ("ACCEPTED", "REJECTED")

    @property
    def accepted(self) -> bool:
        return self.state == "ACCEPTED"

    @classmethod
    def from_pb(cls, r: request_pb2.Request) -> Request:
        return cls(
            request_id=r.request_id,
            state=_state(request_pb2.RequestState, r.state, "REQUEST_STATE_"),
            profile=r.profile,
            vo=r.vo,
            backend=r.backend,
            parameters=json.loads(r.parameters_json or "{}"),
            production_id=r.production_id or None,
            existing_production_id=r.existing_production_id or None,
            violations=_violations(r),
            created=_time(r.created_unix_ms),
            period=r.period or None,
            productions=[PointingProduction.from_pb(p) for p in r.productions],
        )


@dataclass(frozen=True)
class Overlap:
    production_id: str
    description: str


@dataclass(frozen=True)
class JobPlan:
    jobs: int
    units_per_job: int
    total_units: int
    first_run: int
    last_run: int

    @classmethod
    def from_pb(cls, p: request_pb2.JobPlan) -> JobPlan:
        return cls(p.jobs, p.units_per_job, p.total_units, p.first_run, p.last_run)


@dataclass(frozen=True)
class ResourceEstimate:
    """What the jobs are expected to need, from the profile's resource model."""

    cpu_seconds_per_job: float
    cpu_hours_total: float
    memory_mb: int
    disk_mb_per_job: float
    disk_gb_total: float

    @classmethod
    def from_pb(cls, e: request_pb2.ResourceEstimate) -> ResourceEstimate:
        return cls(
            e.cpu_seconds_per_job,
            e.cpu_hours_total,
            e.memory_mb,
            e.disk_mb_per_job,
            e.disk_gb_total,
        )


@dataclass(frozen=True)
class Validation:
    """A dry run: what the checker would decide now. Nothing is stored."""

    acceptable: bool
    violations: list[Violation]
    # SHA-256 of the canonical identity parameters.
    fingerprint: str
    # The production this request duplicates exactly, if any.
    existing_production_id: str | None
    overlaps: list[Overlap]
    plan: JobPlan | None
    estimate: ResourceEstimate | None
    # The existence check in words, per identity of the request's files (one
    # per NSB level): what the catalog holds that matches, which productions
    # or files, which keys differ.
    explanations: list[str] = field(default_factory=list)
    # The parameters as they would be produced (profile and period applied).
    parameters: dict[str, Any] | None = None
    # The observation period the request names, and for one of its
    # pointings (in ``pointings``) which.
    period: str | None = None
    pointing: str | None = None
    # A period's request: the verdict on each pointing, each its own production.
    pointings: list[Validation] = field(default_factory=list)

    @classmethod
    def from_pb(cls, v: request_pb2.Validation) -> Validation:
        return cls(
            acceptable=v.acceptable,
            violations=_violations(v),
            fingerprint=v.fingerprint,
            existing_production_id=v.existing_production_id or None,
            overlaps=[Overlap(o.production_id, o.description) for o in v.overlaps],
            plan=JobPlan.from_pb(v.plan) if v.HasField("plan") else None,
            estimate=ResourceEstimate.from_pb(v.estimate) if v.HasField("estimate") else None,
            explanations=list(v.explanations),
            parameters=json.loads(v.parameters_json) if v.parameters_json else None,
            period=v.period or None,
            pointing=v.pointing or None,
            pointings=[Validation.from_pb(p) for p in v.pointings],
        )


@dataclass(frozen=True)
class JobCounts:
    """Jobs in each state; they always sum to the production's job total."""

    created: int = 0
    submitted: int = 0
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    exhausted: int = 0

    @classmethod
    def from_pb(cls, c: common_pb2.JobCounts) -> JobCounts:
        return cls(
            c.created, c.submitted, c.queued, c.running, c.done, c.failed, c.cancelled, c.exhausted
        )


@dataclass(frozen=True)
class Production:
    """A production as the status service sees it."""

    production_id: str
    request_id: str
    profile: str
    vo: str
    backend: str
    state: str
    job_total: int
    counts: JobCounts
    estimate: ResourceEstimate | None
    # Why its jobs are not moving, while its WMS installation is failing.
    held_reason: str | None
    updated: datetime | None
    # Files forwarded / registered per destination the production asked for.
    forwarding: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Ended, every output catalogued, and on every destination it asked for.
    outputs_in_place: bool = False
    # Its jobs per WMS installation they were placed on (several for a
    # production naming a group of installations or ``any``).
    installations: dict[str, JobCounts] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES and self.outputs_in_place

    @classmethod
    def from_pb(cls, p: status_pb2.Production) -> Production:
        return cls(
            production_id=p.production_id,
            request_id=p.request_id,
            profile=p.profile,
            vo=p.vo,
            backend=p.backend,
            state=production_state(p.state),
            job_total=p.job_total,
            counts=JobCounts.from_pb(p.counts),
            estimate=ResourceEstimate.from_pb(p.estimate) if p.HasField("estimate") else None,
            held_reason=p.held_reason or None,
            updated=_time(p.updated_unix_ms),
            forwarding={d.destination: (d.forwarded, d.total) for d in p.forwarding},
            outputs_in_place=p.finished,
            installations={i.installation: JobCounts.from_pb(i.counts) for i in p.installations},
        )


@dataclass(frozen=True)
class OutputFile:
    """An output file as catalogued."""

    lfn: str
    size: int
    # adler32 as 8 lowercase hex digits, as DIRAC and Rucio write it.
    adler32: str
    url: str
    production_id: str
    job_index: int
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, f: common_pb2.OutputFile, shared: Mapping[str, str] | None = None) -> OutputFile:
        """``shared``: what the file's class shares, when the answer was asked
        by class (the file then carries only its own keys)."""
        metadata = dict(shared or {})
        metadata.update(f.metadata)
        return cls(f.lfn, f.size, f.adler32, f.url, f.production_id, f.job_index, metadata)


@dataclass(frozen=True)
class ProductionRecord:
    """The catalog's record of a finished production, once all its files are
    registered: who asked for it and with what, how its jobs and attempts
    went, CPU time against the estimate, its timeline and what it wrote.
    Fields the catalog does not know (a production older than records) are
    empty, zero or ``None``."""

    production_id: str
    state: str
    # Output files and bytes (the record's own file not counted).
    file_count: int
    total_bytes: int
    completed: datetime | None
    request_id: str = ""
    submitter: str = ""
    vo: str = ""
    profile: str = ""
    profile_sha256: str = ""
    fingerprint: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    # Software and versions named in the parameters.
    software: dict[str, str] = field(default_factory=dict)
    installation: str = ""
    first_run: int = 0
    last_run: int = 0
    job_total: int = 0
    counts: JobCounts = field(default_factory=JobCounts)
    attempts: int = 0
    retries: int = 0
    # CPU seconds the WMS reported, over `cpu_measured_attempts` attempts
    # (all attempts: known; none: unknown, as on DIRAC for now).
    cpu_seconds_used: float = 0.0
    cpu_measured_attempts: int = 0
    estimate: ResourceEstimate | None = None
    submitted: datetime | None = None
    accepted: datetime | None = None
    first_job_started: datetime | None = None
    last_job_ended: datetime | None = None
    # (name, file count, bytes) per dataset.
    datasets: list[tuple[str, int, int]] = field(default_factory=list)
    # Copies on each forwarding destination as they stand: destination ->
    # (files forwarded, files failing, files in all).
    replicas: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    parent_production_ids: list[str] = field(default_factory=list)
    child_production_ids: list[str] = field(default_factory=list)
    # The record's own file in the catalog (its RO-Crate), once written.
    record_lfn: str | None = None

    @classmethod
    def from_pb(cls, r: catalog_pb2.ProductionRecord) -> ProductionRecord:
        return cls(
            production_id=r.production_id,
            state=production_state(r.state),
            file_count=r.file_count,
            total_bytes=r.total_bytes,
            completed=_time(r.completed_unix_ms),
            request_id=r.request_id,
            submitter=r.submitter,
            vo=r.vo,
            profile=r.profile,
            profile_sha256=r.profile_sha256,
            fingerprint=r.fingerprint,
            parameters=json.loads(r.parameters_json) if r.parameters_json else {},
            software=dict(sorted(r.software.items())),
            installation=r.installation,
            first_run=r.first_run,
            last_run=r.last_run,
            job_total=r.job_total,
            counts=JobCounts.from_pb(r.counts),
            attempts=r.attempts,
            retries=r.retries,
            cpu_seconds_used=r.cpu_seconds_used,
            cpu_measured_attempts=r.cpu_measured_attempts,
            estimate=ResourceEstimate.from_pb(r.estimate) if r.HasField("estimate") else None,
            submitted=_time(r.submitted_unix_ms),
            accepted=_time(r.accepted_unix_ms),
            first_job_started=_time(r.first_job_started_unix_ms),
            last_job_ended=_time(r.last_job_ended_unix_ms),
            datasets=[(d.name, d.file_count, d.total_bytes) for d in r.datasets],
            replicas={d.destination: (d.forwarded, d.failing, d.total) for d in r.replicas},
            parent_production_ids=list(r.parent_production_ids),
            child_production_ids=list(r.child_production_ids),
            record_lfn=r.record_lfn or None,
        )


@dataclass(frozen=True)
class Template:
    """A container template requests may name: shipped, or derived by an
    earlier request (then ``derived_from`` names the shipped one)."""

    name: str
    profile: str
    description: str
    # The image, pinned by digest, and that digest ("sha256:...").
    image: str
    digest: str
    # podman, docker or apptainer.
    runtime: str
    entrypoint: list[str]
    # Default parameters, and the JSON Schema of each one a request may override.
    parameters: dict[str, Any]
    overridable: dict[str, Any]
    derived_from: str
    # "<shipped template>+<image digest>+<parameters hash>".
    version: str
    # When a derived template was recorded; None for a shipped one.
    recorded: datetime | None

    @property
    def derived(self) -> bool:
        return self.derived_from != self.name

    @classmethod
    def from_pb(cls, t: request_pb2.TemplateInfo) -> Template:
        return cls(
            name=t.name,
            profile=t.profile,
            description=t.description,
            image=t.image,
            digest=t.digest,
            runtime=t.runtime,
            entrypoint=list(t.entrypoint),
            parameters=json.loads(t.parameters_json or "{}"),
            overridable=json.loads(t.overridable_json or "{}"),
            derived_from=t.derived_from,
            version=t.version,
            recorded=_time(t.recorded_unix_ms),
        )


@dataclass(frozen=True)
class Profile:
    """A kind of production the deployment accepts."""

    name: str
    description: str
    # Virtual organisations allowed to use it; empty means any.
    vos: list[str]
    id_prefix: str
    # The parameters that define "the same simulation".
    identity: list[str]
    # The JSON Schema of the parameters.
    parameters_schema: dict[str, Any]

    @classmethod
    def from_pb(cls, p: request_pb2.ProfileInfo) -> Profile:
        return cls(
            name=p.name,
            description=p.description,
            vos=list(p.vos),
            id_prefix=p.id_prefix,
            identity=list(p.identity),
            parameters_schema=json.loads(p.parameters_schema_json or "{}"),
        )


@dataclass(frozen=True)
class Period:
    """An observation period: the conditions an IRF production simulates.
    A request naming it (``observation_period``) takes its site, layout, NSB
    levels and atmosphere, and becomes one production per pointing."""

    name: str
    profile: str
    description: str
    site: str
    array_layout: str
    nsb_levels: list[int]
    atmosphere: str
    # ``YYYY-MM-DD``.
    valid_from: str
    valid_until: str
    # (zenith_deg, azimuth_deg) pairs.
    pointings: list[tuple[float, float]]

    @classmethod
    def from_pb(cls, p: request_pb2.PeriodInfo) -> Period:
        return cls(
            name=p.name,
            profile=p.profile,
            description=p.description,
            site=p.site,
            array_layout=p.array_layout,
            nsb_levels=list(p.nsb_levels),
            atmosphere=p.atmosphere,
            valid_from=p.valid_from,
            valid_until=p.valid_until,
            pointings=[(q.zenith_deg, q.azimuth_deg) for q in p.pointings],
        )
