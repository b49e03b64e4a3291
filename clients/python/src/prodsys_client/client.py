"""A connection to a prodsys deployment: intake, status and catalog over gRPC."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import grpc

from .errors import NotFound, Timeout, from_rpc_error
from .models import (
    OutputFile,
    Period,
    Production,
    ProductionRecord,
    Profile,
    Request,
    Submission,
    Template,
    Validation,
)
from .v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    request_pb2,
    request_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)

# The local stack's ports (deploy/prodsys.toml); PRODSYS_*_URL override them, as for prodctl.
DEFAULT_INTAKE = "127.0.0.1:50051"
DEFAULT_STATUS = "127.0.0.1:50052"
DEFAULT_CATALOG = "127.0.0.1:50053"

# The keys of a request file, as prodctl reads it.
REQUEST_KEYS = frozenset(
    {
        "profile",
        "vo",
        "backend",
        "submitter",
        "idempotency_key",
        "extend",
        "reuse_existing",
        "priority",
        "forward",
        "forward_replace",
        "parameters",
    }
)

RequestLike = Union[Mapping[str, Any], str, os.PathLike]

# Between two looks while waiting for something that has not happened yet.
POLL_SECONDS = 0.2


# A metadata condition: ``"thetaP>=20"``, ``"particle in gamma,proton"`` or
# ``("thetaP", ">=", 20)``.
ConditionLike = Union[str, tuple]

_OPERATORS = {
    "=": catalog_pb2.CONDITION_OPERATOR_EQ,
    "==": catalog_pb2.CONDITION_OPERATOR_EQ,
    "!=": catalog_pb2.CONDITION_OPERATOR_NE,
    "in": catalog_pb2.CONDITION_OPERATOR_IN,
    "<": catalog_pb2.CONDITION_OPERATOR_LT,
    "<=": catalog_pb2.CONDITION_OPERATOR_LE,
    ">": catalog_pb2.CONDITION_OPERATOR_GT,
    ">=": catalog_pb2.CONDITION_OPERATOR_GE,
}
_CONDITION = re.compile(r"^\s*([^=!<>\s]+)\s*(!=|<=|>=|==|=|<|>)\s*(.*?)\s*$")
_IN = re.compile(r"^\s*([^=!<>\s]+)\s+in\s+(.+?)\s*$")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def condition(spec: ConditionLike) -> catalog_pb2.MetadataCondition:
    """A metadata condition for ``Client.files``, as prodctl's ``--where``
    takes it: ``key=value``, ``key!=value``, ``key<value``, ``key<=value``,
    ``key>value``, ``key>=value``, ``key in v1,v2``; or a ``(key, operator,
    value)`` tuple, the value a list for ``in``."""
    if isinstance(spec, tuple):
        if len(spec) != 3 or spec[1] not in _OPERATORS:
            raise ValueError(f"{spec!r}: give (key, operator, value) with one of {sorted(_OPERATORS)}")
        key, op, value = spec
        values = list(value) if op == "in" and not isinstance(value, str) else [value]
        return catalog_pb2.MetadataCondition(
            key=key, operator=_OPERATORS[op], values=[_text(v) for v in values]
        )
    found = _IN.match(spec)
    if found:
        values = [v.strip() for v in found.group(2).split(",") if v.strip()]
        return catalog_pb2.MetadataCondition(
            key=found.group(1), operator=catalog_pb2.CONDITION_OPERATOR_IN, values=values
        )
    found = _CONDITION.match(spec)
    if not found:
        raise ValueError(
            f"{spec!r} is not a condition: write key=value, key!=value, key<value, "
            "key<=value, key>value, key>=value or 'key in v1,v2'"
        )
    key, op, value = found.groups()
    return catalog_pb2.MetadataCondition(key=key, operator=_OPERATORS[op], values=[value])


def request_message(request: RequestLike, **overrides: Any) -> request_pb2.SubmitRequestRequest:
    """A SubmitRequestRequest from a request dict or JSON file (prodctl's format:
    profile, vo, parameters, and optionally backend, submitter, idempotency_key,
    extend, reuse_existing, priority); `overrides` replace top-level keys."""
    if isinstance(request, (str, os.PathLike)):
        path = Path(request)
        try:
            request = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a request file: {error}") from None
    if not isinstance(request, Mapping):
        raise TypeError(f"a request is a dict or a JSON file, not {type(request).__name__}")
    fields = {**request, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(fields.keys() - REQUEST_KEYS)
    if unknown:
        raise ValueError(f"unknown request key(s) {unknown}; expected {sorted(REQUEST_KEYS)}")
    missing = sorted({"profile", "vo", "parameters"} - fields.keys())
    if missing:
        raise ValueError(f"the request lacks {missing}")
    parameters = fields.pop("parameters")
    return request_pb2.SubmitRequestRequest(parameters_json=json.dumps(parameters), **fields)


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (over plain
    channels too: a development stack on loopback takes no token anyway,
    and a deployment with tokens serves TLS)."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [self._metadata]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)



def _token(token: str | None, token_file: str | os.PathLike | None) -> str | None:
    """The bearer token: given, read from `token_file`, or from the
    environment, as prodctl finds it: ``$PRODSYS_TOKEN``,
    ``$PRODSYS_TOKEN_FILE``, then WLCG bearer token discovery's
    ``$BEARER_TOKEN`` and ``$BEARER_TOKEN_FILE``."""
    if token:
        return token.strip()
    if token_file:
        return Path(token_file).read_text().strip()
    for value, path in (
        (os.environ.get("PRODSYS_TOKEN"), os.environ.get("PRODSYS_TOKEN_FILE")),
        (os.environ.get("BEARER_TOKEN"), os.environ.get("BEARER_TOKEN_FILE")),
    ):
        if value and value.strip():
            return value.strip()
        if path:
            return Path(path).read_text().strip()
    return None


def _channel(
    address: str,
    token: str | None = None,
    ca_file: str | os.PathLike | None = None,
    cert_file: str | os.PathLike | None = None,
    key_file: str | os.PathLike | None = None,
) -> grpc.Channel:
    """A channel to `host:port`, `http://host:port` or (TLS) `https://host:port`,
    verified against `ca_file` (else the system's CAs), presenting the client
    certificate `cert_file` with its key `key_file` when given, its calls
    carrying `token`."""
    if address.startswith("https://"):
        target = address.removeprefix("https://").rstrip("/")
        roots = Path(ca_file).read_bytes() if ca_file else None
        chain = Path(cert_file).read_bytes() if cert_file else None
        key = Path(key_file).read_bytes() if key_file else None
        channel = grpc.secure_channel(
            target,
            grpc.ssl_channel_credentials(
                root_certificates=roots, private_key=key, certificate_chain=chain
            ),
        )
    else:
        channel = grpc.insecure_channel(address.removeprefix("http://").rstrip("/"))
    if token:
        channel = grpc.intercept_channel(channel, _Bearer(token))
    return channel


class Client:
    """The intake (RequestService), status (StatusService) and catalog
    (CatalogService) of one deployment.

    Addresses are ``host:port`` (or ``http://``/``https://`` URLs); each
    defaults to ``$PRODSYS_INTAKE_URL``, ``$PRODSYS_STATUS_URL``,
    ``$PRODSYS_CATALOG_URL``, else the local stack's ports. `timeout` bounds
    each call, in seconds. With tokens on, `token` (a bearer JWT; else
    `token_file`, ``$PRODSYS_TOKEN``, ``$PRODSYS_TOKEN_FILE``, ``$BEARER_TOKEN``,
    ``$BEARER_TOKEN_FILE``) rides on every call; ``https://`` addresses are
    verified against `ca_file` (else ``$PRODSYS_CA_FILE``, else the system's
    CAs) and, where the services require client certificates, present
    `cert_file` with its key `key_file` (else ``$PRODSYS_CERT_FILE`` and
    ``$PRODSYS_KEY_FILE``). Failed calls raise ``ProdsysError`` or a subclass:
    ``InvalidRequest`` (with ``.violations``), ``NotFound``, ``Conflict``,
    ``Timeout``.
    """

    def __init__(
        self,
        intake: str | None = None,
        status: str | None = None,
        catalog: str | None = None,
        *,
        timeout: float = 30.0,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        ca_file: str | os.PathLike | None = None,
        cert_file: str | os.PathLike | None = None,
        key_file: str | os.PathLike | None = None,
    ):
        self.intake_address = intake or os.environ.get("PRODSYS_INTAKE_URL") or DEFAULT_INTAKE
        self.status_address = status or os.environ.get("PRODSYS_STATUS_URL") or DEFAULT_STATUS
        self.catalog_address = catalog or os.environ.get("PRODSYS_CATALOG_URL") or DEFAULT_CATALOG
        self.timeout = timeout
        bearer = _token(token, token_file)
        ca_file = ca_file or os.environ.get("PRODSYS_CA_FILE") or None
        cert_file = cert_file or os.environ.get("PRODSYS_CERT_FILE") or None
        key_file = key_file or os.environ.get("PRODSYS_KEY_FILE") or None
        if bool(cert_file) != bool(key_file):
            raise ValueError("cert_file and key_file: give both or neither")
        self._channels = [
            _channel(a, bearer, ca_file, cert_file, key_file)
            for a in (self.intake_address, self.status_address, self.catalog_address)
        ]
        self._intake = request_pb2_grpc.RequestServiceStub(self._channels[0])
        self._status = status_pb2_grpc.StatusServiceStub(self._channels[1])
        self._catalog = catalog_pb2_grpc.CatalogServiceStub(self._channels[2])

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Client(intake={self.intake_address!r}, status={self.status_address!r}, "
            f"catalog={self.catalog_address!r})"
        )

    def _call(self, method, message, timeout: float | None = None):
        try:
            return method(message, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # Requests (intake)

    def submit(self, request: RequestLike, **overrides: Any) -> Submission:
        """Submits a request (a dict or a JSON file in prodctl's format); keyword
        arguments replace its top-level keys (``idempotency_key="nb-1"``,
        ``extend=True``, ``priority=10``, …). The checker decides it
        asynchronously: follow it with ``wait_for_decision``. A request with bad
        fields raises ``InvalidRequest`` at once."""
        answer = self._call(self._intake.SubmitRequest, request_message(request, **overrides))
        return Submission(answer.request_id, answer.replayed)

    def validate(self, request: RequestLike, **overrides: Any) -> Validation:
        """Dry run: violations, fingerprint, duplicate, overlaps, job plan and
        resource estimate. Nothing is stored."""
        return Validation.from_pb(
            self._call(self._intake.ValidateRequest, request_message(request, **overrides))
        )

    def request(self, request_id: str) -> Request:
        """Where a request stands now: RECEIVED, ACCEPTED or REJECTED."""
        message = request_pb2.GetRequestRequest(request_id=request_id)
        return Request.from_pb(self._call(self._intake.GetRequest, message))

    def wait_for_decision(self, request_id: str, timeout: float = 60.0) -> Request:
        """Waits until the checker has accepted or rejected the request."""
        deadline = time.monotonic() + timeout
        while True:
            request = self.request(request_id)
            if request.decided:
                return request
            if time.monotonic() > deadline:
                raise Timeout(f"request {request_id} was not decided within {timeout} s")
            time.sleep(POLL_SECONDS)

    def cancel(self, production_id: str, reason: str = "") -> bool:
        """Stops a production: its jobs are killed and it ends CANCELLED (follow it
        with ``watch``). True when the cancellation is on its way."""
        message = request_pb2.CancelProductionRequest(production_id=production_id, reason=reason)
        return self._call(self._intake.CancelProduction, message).accepted

    def profiles(self) -> list[Profile]:
        """The kinds of production this deployment accepts."""
        answer = self._call(self._intake.ListProfiles, request_pb2.ListProfilesRequest())
        return [Profile.from_pb(p) for p in answer.profiles]

    def templates(self, profile: str = "", name: str = "") -> list[Template]:
        """The container templates requests may name: those the deployment
        ships and those derived by earlier requests (``profile`` and ``name``
        narrow the list)."""
        message = request_pb2.ListTemplatesRequest(profile=profile, name=name)
        answer = self._call(self._intake.ListTemplates, message)
        return [Template.from_pb(t) for t in answer.templates]

    def periods(self, profile: str = "", name: str = "") -> list[Period]:
        """The observation periods requests may name (``profile`` and
        ``name`` narrow the list)."""
        message = request_pb2.ListPeriodsRequest(profile=profile, name=name)
        answer = self._call(self._intake.ListPeriods, message)
        return [Period.from_pb(p) for p in answer.periods]

    # Productions (status)

    def production(self, production_id: str) -> Production:
        """A production's state and job counts now."""
        message = status_pb2.GetProductionRequest(production_id=production_id)
        return Production.from_pb(self._call(self._status.GetProduction, message))

    def productions(
        self,
        vo: str | None = None,
        state: str | None = None,
        profile: str | None = None,
        page_size: int = 500,
    ) -> list[Production]:
        """Every production matching the filters (all pages); `state` is a name
        such as ``"RUNNING"``."""
        state_value = 0
        if state:
            try:
                state_value = common_pb2.ProductionState.Value(f"PRODUCTION_STATE_{state.upper()}")
            except ValueError:
                raise ValueError(f"no production state {state!r}") from None
        productions, token = [], ""
        while True:
            message = status_pb2.ListProductionsRequest(
                vo=vo or "",
                state=state_value,
                profile=profile or "",
                page_size=page_size,
                page_token=token,
            )
            page = self._call(self._status.ListProductions, message)
            productions += [Production.from_pb(p) for p in page.productions]
            if not page.next_page_token:
                return productions
            token = page.next_page_token

    def watch(self, production_id: str, timeout: float = 3600.0) -> Iterator[Production]:
        """Snapshots of a production, now and after every change, ending after a
        terminal state (COMPLETED, PARTIALLY_COMPLETED, FAILED, CANCELLED).
        A production just accepted that the status service does not know yet
        is waited for. Raises ``Timeout`` when it has not finished in `timeout`
        seconds."""
        deadline = time.monotonic() + timeout
        message = status_pb2.GetProductionRequest(production_id=production_id)
        while True:
            stream = self._status.WatchProduction(
                message, timeout=max(deadline - time.monotonic(), 0.001)
            )
            seen = False
            try:
                for snapshot in stream:
                    seen = True
                    yield Production.from_pb(snapshot)
                return
            except grpc.RpcError as error:
                unknown_yet = error.code() == grpc.StatusCode.NOT_FOUND and not seen
                if not unknown_yet or time.monotonic() > deadline:
                    raise from_rpc_error(error) from None
            finally:
                # Also when the caller stops iterating early.
                stream.cancel()
            time.sleep(POLL_SECONDS)

    # Outputs (catalog)

    def files(
        self,
        production_id: str = "",
        metadata: Mapping[str, Any] | None = None,
        page_size: int = 1000,
        where: Iterable[ConditionLike] = (),
        prefix: str = "",
        dataset: str = "",
    ) -> list[OutputFile]:
        """Every catalogued file (all pages) of a production, a dataset, under an
        LFN prefix, and/or matching metadata: ``metadata`` pairs must be equal
        (``{"run_number": 2}``) and every ``where`` condition hold
        (``["nsb=5", "thetaP>=20", "particle in gamma,proton"]``, or
        ``("thetaP", ">=", 20)`` tuples). Values compare as the type the
        profiles declare for the key, numbers as numbers; an unknown key or a
        value of the wrong type raises ``InvalidRequest``."""
        files, token = [], ""
        while True:
            message = self._find_files(production_id, metadata, page_size, where, prefix, dataset)
            message.page_token = token
            page = self._call(self._catalog.FindFiles, message)
            files += [OutputFile.from_pb(f) for f in page.files]
            if not page.next_page_token:
                return files
            token = page.next_page_token

    def iter_files(
        self,
        production_id: str = "",
        metadata: Mapping[str, Any] | None = None,
        where: Iterable[ConditionLike] = (),
        prefix: str = "",
        dataset: str = "",
        page_size: int = 5000,
    ) -> Iterator[OutputFile]:
        """``files`` as a generator over the catalog's stream (StreamFiles), for
        answers of millions of files: memory stays at one message's files."""
        message = self._find_files(production_id, metadata, page_size, where, prefix, dataset)
        # What the files of a class share comes once; each file is made whole here.
        message.metadata_by_class = True
        classes: dict[int, dict[str, str]] = {}
        try:
            for page in self._catalog.StreamFiles(message, timeout=None):
                for c in page.classes:
                    classes[c.class_id] = dict(c.metadata)
                for f in page.files:
                    yield OutputFile.from_pb(f, classes.get(f.class_id))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def download(
        self,
        production_id: str,
        to: str | os.PathLike = ".",
        metadata: Mapping[str, Any] | None = None,
        where: Iterable[ConditionLike] = (),
        xrdcp: str = "xrdcp",
        progress: Any = None,
    ) -> list[tuple[Path, str]]:
        """Downloads a production's outputs (those matching ``metadata`` and
        ``where``, as for ``files``) under ``to``, each at its LFN, from the best
        replica: the file where the job wrote it or a verified posix copy, then a
        verified ``root://`` copy (with ``xrdcp``). Each download's size and
        adler32 are checked against the catalog before it is renamed into place;
        a file already present and correct is skipped, so calling it again
        resumes. Returns ``(path, outcome)`` per file, outcome ``"present"``,
        ``"downloaded"`` or ``"failed: <reasons>"``; ``progress(i, n, path,
        outcome)`` is called after each file when given."""
        message = self._find_files(production_id, metadata, 1000, where, "", "")
        found = []
        while True:
            page = self._call(self._catalog.FindFiles, message)
            found += list(zip(page.files, page.replicas))
            if not page.next_page_token:
                break
            message.page_token = page.next_page_token
        results = []
        for i, (f, replicas) in enumerate(found, start=1):
            target = Path(to) / f.lfn.lstrip("/")
            outcome = _fetch(f, replicas.replicas, target, xrdcp)
            results.append((target, outcome))
            if progress is not None:
                progress(i, len(found), target, outcome)
        return results

    @staticmethod
    def _find_files(production_id, metadata, page_size, where, prefix, dataset):
        return catalog_pb2.FindFilesRequest(
            production_id=production_id,
            metadata={k: _text(v) for k, v in (metadata or {}).items()},
            page_size=page_size,
            conditions=[condition(c) for c in ([where] if isinstance(where, str) else where)],
            lfn_prefix=prefix,
            dataset=dataset,
        )

    def production_record(self, production_id: str, wait: float = 0.0) -> ProductionRecord:
        """The catalog's record of a finished production, written once every file
        it reported is registered. Raises ``NotFound`` before that; `wait` seconds
        waits for it (the catalog may be a moment behind the status service)."""
        deadline = time.monotonic() + wait
        message = catalog_pb2.GetProductionRecordRequest(production_id=production_id)
        while True:
            try:
                return ProductionRecord.from_pb(
                    self._call(self._catalog.GetProductionRecord, message)
                )
            except NotFound:
                if time.monotonic() > deadline:
                    raise
            time.sleep(POLL_SECONDS)

    def production_record_text(
        self, production_id: str, format: str = "markdown", wait: float = 0.0
    ) -> str:
        """A finished production's record rendered by the catalog: ``"markdown"``
        for people, ``"json"``, or ``"ro-crate"`` (its Workflow Run RO-Crate,
        ``ro-crate-metadata.json``, as the catalog keeps it beside the outputs).
        Raises ``NotFound`` as ``production_record`` does; `wait` likewise."""
        formats = {
            "json": catalog_pb2.RECORD_FORMAT_JSON,
            "markdown": catalog_pb2.RECORD_FORMAT_MARKDOWN,
            "ro-crate": catalog_pb2.RECORD_FORMAT_RO_CRATE,
        }
        if format not in formats:
            raise ValueError(f"format {format!r}: choose json, markdown or ro-crate")
        deadline = time.monotonic() + wait
        message = catalog_pb2.GetProductionRecordRequest(
            production_id=production_id, format=formats[format]
        )
        while True:
            try:
                return self._call(self._catalog.GetProductionRecord, message).rendered
            except NotFound:
                if time.monotonic() > deadline:
                    raise
            time.sleep(POLL_SECONDS)



def _size_and_adler32(path: Path) -> tuple[int, str] | None:
    try:
        with path.open("rb") as handle:
            value, size = 1, 0
            while chunk := handle.read(1 << 20):
                value = zlib.adler32(chunk, value)
                size += len(chunk)
        return size, f"{value:08x}"
    except FileNotFoundError:
        return None


def _fetch(f: common_pb2.OutputFile, replicas, target: Path, xrdcp: str) -> str:
    """One file of ``download``: skipped, fetched and checked, or why not."""
    wanted = (f.size, f.adler32)
    if _size_and_adler32(target) == wanted:
        return "present"
    # A replica registered on a Rucio destination is verified on its storage too.
    readable = (common_pb2.REPLICA_STATE_VERIFIED, common_pb2.REPLICA_STATE_REGISTERED)
    verified = [r.url for r in replicas if r.state in readable and r.url]
    local = [u for u in [f.url, *verified] if u.startswith("file://") or u.startswith("/")]
    remote = [u for u in verified if u.startswith(("root://", "xroot://"))]
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    reasons = []
    for source in local + remote:
        part.unlink(missing_ok=True)
        try:
            if source in local:
                shutil.copyfile(source.removeprefix("file://"), part)
            else:
                done = subprocess.run(
                    [xrdcp, "--force", "--nopbar", source, str(part)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    lines = [line for line in done.stderr.splitlines() if line.strip()]
                    reasons.append(f"{source}: {lines[-1] if lines else 'xrdcp failed'}")
                    continue
        except OSError as error:
            reasons.append(f"{source}: {error}")
            continue
        got = _size_and_adler32(part)
        if got == wanted:
            part.replace(target)
            return "downloaded"
        reasons.append(f"{source}: got {got}, the catalog has {wanted}")
    part.unlink(missing_ok=True)
    return "failed: " + "; ".join(reasons or ["no replica that can be read from here"])
