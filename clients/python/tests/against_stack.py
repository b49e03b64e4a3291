#!/usr/bin/env python3
"""A notebook's session with prodsys, through the prodsys_client package only.

Run by tests/python_client.rs against a fresh stack (with the test profiles),
it submits the CTA example and follows it to its files, submits it again (a
duplicate), submits bad parameters, and cancels a running production; it
checks what the client returns on the way, and prints what it saw as one JSON
object for the Rust side to check against the services.

usage: against_stack.py INTAKE STATUS CATALOG REQUEST_FILE
"""

import dataclasses
import json
import re
import sys

from prodsys_client import (
    Client,
    Conflict,
    InvalidRequest,
    NotFound,
    OutputFile,
    Production,
    Violation,
)


def expect(condition, what):
    if not condition:
        raise AssertionError(what)


def main():
    intake, status, catalog, request_file = sys.argv[1:5]
    seen = {}
    with open(request_file) as f:
        example = json.load(f)
    with Client(intake, status, catalog) as client:
        names = [p.name for p in client.profiles()]
        expect("cta-irf-mc" in names, f"profiles {names}")
        templates = client.templates(profile="km3net-container-sim")
        seen["templates"] = [[t.name, t.image, t.version] for t in templates]
        expect(all(not t.derived for t in templates), f"templates {templates}")
        periods = {p.name: p for p in client.periods(profile="cta-irf-mc")}
        winter = periods.get("lapalma-2026-winter")
        expect(winter is not None and len(winter.pointings) == 6, f"periods {periods}")
        # A period's dry run: one verdict per pointing, each with its parameters.
        period_request = dict(example, parameters={
            k: v for k, v in example["parameters"].items()
            if k not in ("site", "array_layout", "zenith_deg", "pointing", "nsb_levels")
        })
        period_request["parameters"]["observation_period"] = "lapalma-2026-winter"
        dry = client.validate(period_request)
        expect(dry.period == "lapalma-2026-winter" and len(dry.pointings) == 6, f"period dry run {dry}")
        expect(all(p.parameters["site"] == "LaPalma" for p in dry.pointings), f"pointings {dry.pointings}")

        # Dry run first: acceptable, 4 jobs of 1000 showers, nothing stored.
        dry = client.validate(request_file)
        expect(dry.acceptable and not dry.violations, f"dry run {dry}")
        expect(dry.plan.jobs == 4 and dry.plan.units_per_job == 1000, f"plan {dry.plan}")
        expect(re.fullmatch(r"[0-9a-f]{64}", dry.fingerprint), dry.fingerprint)

        # The example, from its file: accepted with a production ID.
        submission = client.submit(request_file)
        expect(not submission.replayed, submission)
        request = client.wait_for_decision(submission.request_id)
        expect(request.accepted and request.production_id, f"first request {request}")
        expect(request.parameters == example["parameters"], request.parameters)
        production_id = request.production_id
        seen["production_id"] = production_id

        # The same simulation again, as a dict: refused as a duplicate, naming it.
        again = client.submit(example)
        duplicate = client.wait_for_decision(again.request_id)
        expect(duplicate.state == "REJECTED", f"duplicate {duplicate}")
        expect(duplicate.existing_production_id == production_id, duplicate)
        expect(any(production_id in v.reason for v in duplicate.violations), duplicate)
        seen["duplicate"] = {
            "request_id": again.request_id,
            "state": duplicate.state,
            "existing_production_id": duplicate.existing_production_id,
            "violations": duplicate.violations,
        }
        dry = client.validate(example)
        expect(not dry.acceptable and dry.existing_production_id == production_id, dry)

        # An idempotency key answers with the same request, and refuses another one.
        keyed = client.submit(example, idempotency_key="notebook-1")
        replay = client.submit(example, idempotency_key="notebook-1")
        expect(replay.request_id == keyed.request_id and replay.replayed, replay)
        more = dict(example["parameters"], n_showers=8000)
        try:
            client.submit(dict(example, parameters=more), idempotency_key="notebook-1")
            raise AssertionError("a key reused for another request was accepted")
        except Conflict:
            pass

        # Bad parameters: refused at once, field by field.
        bad = dict(example["parameters"], zenith_deg="twenty", energy_min_tev=400)
        del bad["site"]
        try:
            client.submit(dict(example, parameters=bad))
            raise AssertionError("bad parameters were accepted")
        except InvalidRequest as refusal:
            expect(all(isinstance(v, Violation) for v in refusal.violations), refusal.violations)
            seen["violations"] = refusal.violations
            seen["refusal"] = str(refusal)
        try:
            client.cancel("not an id")
            raise AssertionError("a malformed production ID was accepted")
        except InvalidRequest as refusal:
            seen["cancel_violations"] = refusal.violations

        # Follow the production to its end.
        snapshots = list(client.watch(production_id, timeout=300))
        expect(all(isinstance(s, Production) for s in snapshots), snapshots)
        last = snapshots[-1]
        expect(last.state == "COMPLETED", last)
        for s in snapshots:
            if s.job_total:
                total = sum(dataclasses.asdict(s.counts).values())
                expect(total == s.job_total, f"counts of {s}")
        seen["states"] = [s.state for s in snapshots]
        seen["last"] = {
            "state": last.state,
            "job_total": last.job_total,
            "done": last.counts.done,
            "request_id": last.request_id,
        }
        now = client.production(production_id)
        expect(now.state == last.state, now)
        listed = [p.production_id for p in client.productions(vo=example["vo"])]
        expect(production_id in listed, f"listed {listed}")
        completed = [p.production_id for p in client.productions(state="COMPLETED")]
        expect(production_id in completed, f"listed as completed {completed}")
        try:
            client.production("CTA-999999")
            raise AssertionError("an unknown production was found")
        except NotFound:
            pass

        # What it wrote, from the catalog.
        record = client.production_record(production_id, wait=30)
        files = client.files(production_id)
        expect(all(isinstance(f, OutputFile) for f in files), files)
        expect(record.file_count == len(files), f"{record} for {len(files)} files")
        expect(record.total_bytes == sum(f.size for f in files), record)
        # The record tells the story: who, what, how the jobs went.
        expect(record.submitter == example["submitter"], record)
        expect(record.profile == example["profile"] and len(record.profile_sha256) == 64, record)
        expect(record.software == example["parameters"]["software"], record.software)
        expect(record.counts.done == record.job_total > 0, record)
        expect(record.attempts >= record.job_total, record)
        expect(sum(n for _, n, _ in record.datasets) == len(files), record.datasets)
        markdown = client.production_record_text(production_id)
        expect(markdown.startswith(f"# Production {production_id}"), markdown)
        runs = sorted({f.metadata["run_number"] for f in files})
        one_run = client.files(production_id, metadata={"run_number": runs[0]})
        expect(0 < len(one_run) < len(files), f"run {runs[0]}: {one_run}")
        # Typed conditions: numbers compare as numbers; pages and the stream agree.
        nsb5 = client.files(production_id, where=["nsb=5", "thetaP>=20"], page_size=3)
        expect(0 < len(nsb5) < len(files), f"nsb 5: {nsb5}")
        expect(all(f.metadata["nsb"] == "5" for f in nsb5), nsb5)
        streamed = list(client.iter_files(where=[("nsb", "in", [5]), "thetaP<20.5"], page_size=2))
        expect([f.lfn for f in streamed] == [f.lfn for f in nsb5], f"{streamed} != {nsb5}")
        expect(client.files(where=["thetaP>20"]) == [], "nothing beyond 20 degrees")
        try:
            client.files(where=["nsb=five"])
            raise AssertionError("a wrong-typed value was accepted")
        except InvalidRequest as refused:
            fields = [v.field for v in refused.violations]
            expect(fields == ["conditions[0].values"], fields)
        try:
            list(client.iter_files(where=["colour=blue"]))
            raise AssertionError("an unknown key was accepted")
        except InvalidRequest as refused:
            fields = [v.field for v in refused.violations]
            expect(fields == ["conditions[0].key"], fields)
        seen["record"] = {
            "state": record.state,
            "file_count": record.file_count,
            "total_bytes": record.total_bytes,
        }
        seen["files"] = [
            {"lfn": f.lfn, "size": f.size, "adler32": f.adler32, "url": f.url} for f in files
        ]

        # A running production cancelled while it is watched.
        sleeper = {
            "profile": "test-sleep",
            "vo": "test",
            "parameters": {
                "jobs": 2,
                "per_job": 1,
                "seconds": 47.913,
                "fail_job": -1,
                "tag": "python-cancel",
            },
        }
        request = client.wait_for_decision(client.submit(sleeper).request_id)
        expect(request.accepted, request)
        states, cancelled = [], False
        for snapshot in client.watch(request.production_id, timeout=120):
            states.append(snapshot.state)
            if snapshot.counts.running and not cancelled:
                expect(client.cancel(request.production_id, "wrong tag"), "cancel refused")
                cancelled = True
        expect(cancelled, f"no job ran: {states}")
        seen["cancelled"] = {
            "production_id": request.production_id,
            "states": states,
            "counts": dataclasses.asdict(snapshot.counts),
        }
    print(json.dumps(seen, default=str))


if __name__ == "__main__":
    main()
