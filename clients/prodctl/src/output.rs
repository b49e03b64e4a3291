//! How prodctl answers: text for people (the default) or JSON for scripts
//! (`--output json`), and the exit codes both share.
//!
//! In JSON mode every answer is one JSON document on stdout; commands that
//! follow a production print JSON lines, one object per update. Messages keep
//! the proto field names; enums are their proto names
//! (`PRODUCTION_STATE_COMPLETED`). Errors are
//! `{"error": {"code", "message", "violations": [{"field", "description"}]}}`
//! on stdout, with the exit code text mode gives.

use std::process::ExitCode;
use std::sync::OnceLock;

use clap::ValueEnum;
use prodsys_proto as pb;
use serde_json::{Value, json};
use tonic_types::StatusExt;

/// The exit codes, as `prodctl --help` lists them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  usage error (bad arguments, unreadable request file) or any other failure
  2  invalid request: refused with field violations (validate, submit)
  3  not found (no such request, production or dead letter)
  4  unavailable: a service cannot be reached or is not SERVING (health)
  5  the watched production ended in a state other than COMPLETED, or not in time";

pub const OK: u8 = 0;
pub const FAILURE: u8 = 1;
pub const INVALID: u8 = 2;
pub const NOT_FOUND: u8 = 3;
pub const UNAVAILABLE: u8 = 4;
pub const NOT_COMPLETED: u8 = 5;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON document per answer; JSON lines when following a production.
    Json,
}

static MODE: OnceLock<Output> = OnceLock::new();

pub fn set(mode: Output) {
    let _ = MODE.set(mode);
}

/// Whether answers are printed as JSON.
pub fn json() -> bool {
    MODE.get() == Some(&Output::Json)
}

/// Prints one JSON document (one line).
pub fn print(value: &Value) {
    println!("{value}");
}

/// A failure with its exit code: a gRPC status (with its field violations) or
/// a plain message.
#[derive(Debug)]
pub struct Failure {
    pub exit: u8,
    pub code: String,
    pub message: String,
    pub violations: Vec<(String, String)>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.violations.is_empty() {
            write!(f, "{}: {}", self.code, self.message)
        } else {
            write!(f, "{}: the request was refused", self.code)?;
            for (field, description) in &self.violations {
                write!(f, "\n  {field}: {description}")?;
            }
            Ok(())
        }
    }
}

impl std::error::Error for Failure {}

impl Failure {
    pub fn new(exit: u8, code: &str, message: impl Into<String>) -> Self {
        Failure {
            exit,
            code: code.to_string(),
            message: message.into(),
            violations: Vec::new(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"error": {
            "code": self.code,
            "message": self.message,
            "violations": self.violations.iter()
                .map(|(field, description)| json!({"field": field, "description": description}))
                .collect::<Vec<_>>(),
        }})
    }
}

/// A gRPC error as a failure: its code's name, message and field violations.
pub fn status(status: tonic::Status) -> anyhow::Error {
    let violations: Vec<(String, String)> = status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default();
    let exit = match status.code() {
        _ if !violations.is_empty() => INVALID,
        tonic::Code::InvalidArgument => INVALID,
        tonic::Code::NotFound => NOT_FOUND,
        tonic::Code::Unavailable => UNAVAILABLE,
        _ => FAILURE,
    };
    Failure {
        exit,
        code: code_name(status.code()).to_string(),
        message: status.message().to_string(),
        violations,
    }
    .into()
}

/// Reports `error` as the mode asks and gives its exit code.
pub fn report(error: &anyhow::Error) -> ExitCode {
    let failure = error.downcast_ref::<Failure>();
    let exit = failure.map_or(FAILURE, |f| f.exit);
    if json() {
        let f = match failure {
            Some(f) => f.to_json(),
            None => Failure::new(FAILURE, "FAILED", format!("{error:#}")).to_json(),
        };
        print(&f);
    } else {
        eprintln!("prodctl: {error:#}");
    }
    ExitCode::from(exit)
}

/// The gRPC code as the gRPC specification spells it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn violations(vs: &[pb::FieldViolation]) -> Value {
    vs.iter()
        .map(|v| json!({"field": v.field, "description": v.description}))
        .collect()
}

pub fn submitted(r: &pb::SubmitRequestResponse) -> Value {
    json!({"request_id": r.request_id, "replayed": r.replayed})
}

pub fn request(r: &pb::Request) -> Value {
    json!({
        "request_id": r.request_id,
        "state": r.state().as_str_name(),
        "profile": r.profile,
        "vo": r.vo,
        "parameters_json": r.parameters_json,
        "backend": r.backend,
        "production_id": r.production_id,
        "violations": violations(&r.violations),
        "existing_production_id": r.existing_production_id,
        "created_unix_ms": r.created_unix_ms,
        "period": r.period,
        "productions": r.productions.iter().map(pointing_production).collect::<Vec<_>>(),
    })
}

pub fn pointing_production(p: &pb::PointingProduction) -> Value {
    json!({
        "pointing": p.pointing,
        "zenith_deg": p.zenith_deg,
        "azimuth_deg": p.azimuth_deg,
        "production_id": p.production_id,
        "fingerprint": p.fingerprint,
        "existing_production_id": p.existing_production_id,
        "violations": violations(&p.violations),
    })
}

pub fn period(p: &pb::PeriodInfo) -> Value {
    json!({
        "name": p.name,
        "profile": p.profile,
        "description": p.description,
        "site": p.site,
        "array_layout": p.array_layout,
        "nsb_levels": p.nsb_levels,
        "atmosphere": p.atmosphere,
        "valid_from": p.valid_from,
        "valid_until": p.valid_until,
        "pointings": p.pointings.iter()
            .map(|q| json!({"zenith_deg": q.zenith_deg, "azimuth_deg": q.azimuth_deg, "label": q.label}))
            .collect::<Vec<_>>(),
    })
}

pub fn validation(v: &pb::Validation) -> Value {
    json!({
        "acceptable": v.acceptable,
        "violations": violations(&v.violations),
        "fingerprint": v.fingerprint,
        "existing_production_id": v.existing_production_id,
        "overlaps": v.overlaps.iter()
            .map(|o| json!({"production_id": o.production_id, "description": o.description}))
            .collect::<Vec<_>>(),
        "plan": v.plan.map(|p| json!({
            "jobs": p.jobs,
            "units_per_job": p.units_per_job,
            "total_units": p.total_units,
            "first_run": p.first_run,
            "last_run": p.last_run,
        })),
        "estimate": v.estimate.map(|e| json!({
            "cpu_seconds_per_job": e.cpu_seconds_per_job,
            "cpu_hours_total": e.cpu_hours_total,
            "memory_mb": e.memory_mb,
            "disk_mb_per_job": e.disk_mb_per_job,
            "disk_gb_total": e.disk_gb_total,
        })),
        "explanations": v.explanations,
        "parameters_json": v.parameters_json,
        "period": v.period,
        "pointing": v.pointing,
        "pointings": v.pointings.iter().map(validation).collect::<Vec<_>>(),
    })
}

pub fn production(p: &pb::Production) -> Value {
    let c = p.counts.unwrap_or_default();
    json!({
        "production_id": p.production_id,
        "request_id": p.request_id,
        "profile": p.profile,
        "vo": p.vo,
        "state": p.state().as_str_name(),
        "job_total": p.job_total,
        "counts": {
            "created": c.created,
            "submitted": c.submitted,
            "queued": c.queued,
            "running": c.running,
            "done": c.done,
            "failed": c.failed,
            "cancelled": c.cancelled,
            "exhausted": c.exhausted,
        },
        "backend": p.backend,
        "installations": p.installations.iter().map(|i| {
            let c = i.counts.unwrap_or_default();
            json!({
                "installation": i.installation,
                "counts": {
                    "created": c.created,
                    "submitted": c.submitted,
                    "queued": c.queued,
                    "running": c.running,
                    "done": c.done,
                    "failed": c.failed,
                    "cancelled": c.cancelled,
                    "exhausted": c.exhausted,
                },
            })
        }).collect::<Vec<_>>(),
        "updated_unix_ms": p.updated_unix_ms,
        "held_reason": p.held_reason,
        "period": p.period,
        "pointing": p.pointing,
        "inputs_used": p.inputs_used,
        "inputs_note": p.inputs_note,
    })
}

pub fn file(f: &pb::OutputFile) -> Value {
    json!({
        "lfn": f.lfn,
        "size": f.size,
        "adler32": f.adler32,
        "url": f.url,
        "metadata": f.metadata,
        "production_id": f.production_id,
        "job_index": f.job_index,
    })
}

/// A replica's state in lowercase words (`verified`, `failed`, …).
pub fn replica_state(r: &pb::Replica) -> String {
    r.state()
        .as_str_name()
        .trim_start_matches("REPLICA_STATE_")
        .to_ascii_lowercase()
}

pub fn replica(r: &pb::Replica) -> Value {
    json!({
        "destination": r.destination,
        "state": replica_state(r),
        "url": r.url,
        "attempts": r.attempts,
        "reason": r.reason,
    })
}

pub fn profile(p: &pb::ProfileInfo) -> Value {
    json!({
        "name": p.name,
        "description": p.description,
        "vos": p.vos,
        "id_prefix": p.id_prefix,
        "parameters_schema_json": p.parameters_schema_json,
        "identity": p.identity,
    })
}

pub fn template(t: &pb::TemplateInfo) -> Value {
    json!({
        "name": t.name,
        "profile": t.profile,
        "description": t.description,
        "image": t.image,
        "digest": t.digest,
        "runtime": t.runtime,
        "entrypoint": t.entrypoint,
        "parameters_json": t.parameters_json,
        "overridable_json": t.overridable_json,
        "derived_from": t.derived_from,
        "version": t.version,
        "recorded_unix_ms": t.recorded_unix_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_becomes_exit_2_with_its_violations_as_json() {
        let refused = tonic::Status::with_error_details(
            tonic::Code::InvalidArgument,
            "refused",
            tonic_types::ErrorDetails::with_bad_request_violation("parameters.nsb", "must be > 0"),
        );
        let error = status(refused);
        let failure = error.downcast_ref::<Failure>().unwrap();
        assert_eq!(failure.exit, INVALID);
        assert_eq!(
            failure.to_json(),
            json!({"error": {"code": "INVALID_ARGUMENT", "message": "refused",
                "violations": [{"field": "parameters.nsb", "description": "must be > 0"}]}})
        );
        let missing = status(tonic::Status::not_found("no production P-1"));
        assert_eq!(missing.downcast_ref::<Failure>().unwrap().exit, NOT_FOUND);
    }
}
