//! A finished production's record, and its three renderings: JSON for
//! programs, Markdown for people, and `ro-crate-metadata.json` of a Process
//! Run Crate (the Workflow Run RO-Crate profile for one tool run many
//! times), the file the catalog registers beside the outputs. Pure: the
//! facts come in as a [`Record`], text comes out; the same record always
//! renders the same bytes.

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::{DateTime, SecondsFormat, Utc};
use prodsys_core::JobCounts;
use serde::Serialize;
use serde_json::{Value, json};

/// The RO-Crate specification the crate conforms to.
pub const RO_CRATE_SPEC: &str = "https://w3id.org/ro/crate/1.1";
/// The Workflow Run RO-Crate profile for the runs of one tool.
pub const PROCESS_RUN_CRATE: &str = "https://w3id.org/ro/wfrun/process/0.5";
/// The file name of an RO-Crate's metadata.
pub const RO_CRATE_FILE: &str = "ro-crate-metadata.json";

/// What the profile's resource model expected of the production.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Estimate {
    pub cpu_seconds_per_job: f64,
    pub cpu_hours_total: f64,
    pub memory_mb: u64,
    pub disk_mb_per_job: f64,
    pub disk_gb_total: f64,
}

/// The files of one dataset of the production.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Dataset {
    pub name: String,
    pub file_count: u64,
    pub total_bytes: u64,
}

/// The production's copies on one forwarding destination, as they stand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Replicas {
    pub destination: String,
    pub forwarded: u64,
    pub failing: u64,
    pub total: u64,
}

/// A finished production's jobs on one WMS installation (where their last
/// attempt was placed), by final state, and which jobs they were.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub installation: String,
    pub counts: JobCounts,
    /// The jobs (indexes) that ran here, as ranges in job order.
    pub jobs: Vec<JobRange>,
    /// More ranges than kept: the rest are left out (`ListJobs` has them).
    pub jobs_truncated: bool,
}

/// Jobs `first` to `last` of a production (indexes, both included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct JobRange {
    pub first: u64,
    pub last: u64,
}

/// Ranges of jobs as people write them: `0–2, 5, 9–12` (`, …` when some
/// were left out).
pub fn job_ranges_text(ranges: &[JobRange], truncated: bool) -> String {
    let mut parts: Vec<String> = ranges
        .iter()
        .map(|r| {
            if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}–{}", r.first, r.last)
            }
        })
        .collect();
    if truncated {
        parts.push("…".to_string());
    }
    parts.join(", ")
}

/// Everything the catalog knows of a finished production. Times are Unix
/// milliseconds, 0 where unknown; text is empty where unknown (a production
/// that ended before the catalog kept records has only its state, files,
/// bytes and completion).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Record {
    pub production_id: String,
    pub state: String,
    pub request_id: String,
    pub submitter: String,
    pub vo: String,
    pub profile: String,
    pub profile_sha256: String,
    pub fingerprint: String,
    pub parameters: Value,
    pub software: BTreeMap<String, String>,
    /// The installation (or group of them, or `any`) the request named.
    pub installation: String,
    /// Where its jobs ran: per installation, its jobs by final state (a
    /// production naming a group or `any` has several), in name order.
    pub installations: Vec<Placement>,
    pub first_run: u64,
    pub last_run: u64,
    pub job_total: u64,
    pub counts: JobCounts,
    pub attempts: u64,
    pub retries: u64,
    pub cpu_seconds_used: f64,
    pub cpu_measured_attempts: u64,
    pub estimate: Option<Estimate>,
    pub submitted_unix_ms: i64,
    pub accepted_unix_ms: i64,
    pub first_job_started_unix_ms: i64,
    pub last_job_ended_unix_ms: i64,
    pub completed_unix_ms: i64,
    pub file_count: u64,
    pub total_bytes: u64,
    pub datasets: Vec<Dataset>,
    /// Where the production's outputs are forwarded (as asked).
    pub destinations: Vec<String>,
    /// Copies on those destinations as they stand (live: not in the crate).
    pub replicas: Vec<Replicas>,
    pub parent_production_ids: Vec<String>,
    pub child_production_ids: Vec<String>,
    pub record_lfn: String,
}

/// How much of a production's CPU time the WMS reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuKnown {
    /// For every attempt.
    Known,
    /// For some attempts.
    Partly,
    /// For none (DIRAC, for now).
    Unknown,
}

impl Record {
    pub fn cpu_known(&self) -> CpuKnown {
        match self.cpu_measured_attempts {
            0 => CpuKnown::Unknown,
            n if n >= self.attempts => CpuKnown::Known,
            _ => CpuKnown::Partly,
        }
    }

    /// CPU seconds the profile expected of all the production's jobs.
    pub fn cpu_seconds_estimated(&self) -> Option<f64> {
        self.estimate
            .map(|e| e.cpu_seconds_per_job * self.job_total as f64)
    }

    /// Whether the catalog knows who asked for the production.
    fn has_request(&self) -> bool {
        !self.request_id.is_empty()
    }
}

/// The software and versions a production's parameters name: each member of
/// a `software` object, the resolved container `template` (its version, and
/// its image pinned by digest), and any `*_version` parameter.
pub fn software_versions(parameters: &Value) -> BTreeMap<String, String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut software = BTreeMap::new();
    let Some(object) = parameters.as_object() else {
        return software;
    };
    if let Some(Value::Object(members)) = object.get("software") {
        for (name, version) in members {
            software.insert(name.clone(), text(version));
        }
    }
    if let Some(Value::Object(template)) = object.get("template") {
        let name = template.get("name").map(text).unwrap_or_default();
        if let Some(version) = template.get("version") {
            let key = if name.is_empty() {
                "template".to_string()
            } else {
                format!("template {name}")
            };
            software.insert(key, text(version));
        }
        if let Some(image) = template.get("image").map(text) {
            let digest = template.get("digest").map(text).unwrap_or_default();
            let pinned = if digest.is_empty() || image.contains('@') {
                image
            } else {
                format!("{image}@{digest}")
            };
            software.insert("container image".to_string(), pinned);
        }
    }
    for (key, value) in object {
        if key.ends_with("_version") && !value.is_object() && !value.is_array() {
            software.insert(key.clone(), text(value));
        }
    }
    software
}

/// The Unix milliseconds a UUIDv7 (every prodsys event and request ID)
/// was made at; `None` for another kind of UUID.
pub fn uuid_v7_unix_ms(id: &uuid::Uuid) -> Option<i64> {
    if id.get_version_num() != 7 {
        return None;
    }
    let (seconds, nanos) = id.get_timestamp()?.to_unix();
    Some(seconds as i64 * 1000 + i64::from(nanos / 1_000_000))
}

/// Where a production's record is catalogued: `record/ro-crate-metadata.json`
/// under the production's own directory of LFNs (the path up to its ID, as
/// the profiles name outputs `/<vo>/…/<production>/…`), else under the
/// directory its first output is in, else `/<vo>/prodsys/<production>/`.
pub fn record_lfn(production_id: &str, vo: &str, first_output_lfn: Option<&str>) -> String {
    let directory = match first_output_lfn {
        Some(lfn) => {
            let segments: Vec<&str> = lfn.split('/').collect();
            match segments.iter().position(|s| *s == production_id) {
                Some(at) => segments[..=at].join("/"),
                None => lfn
                    .rsplit_once('/')
                    .map_or_else(String::new, |(dir, _)| dir.to_string()),
            }
        }
        None => String::new(),
    };
    let directory = if directory.is_empty() {
        let vo = if vo.is_empty() { "prodsys" } else { vo };
        format!("/{vo}/prodsys/{production_id}")
    } else {
        directory
    };
    format!("{directory}/record/{RO_CRATE_FILE}")
}

/// The metadata of a production's record file: what all its outputs share
/// (so it lands beside them, in their dataset), its production, and, where
/// the outputs name a data level, `record` (a query for their data level
/// does not find it).
pub fn record_metadata(
    mut common: serde_json::Map<String, Value>,
    production_id: &str,
) -> serde_json::Map<String, Value> {
    common.insert("production_id".into(), Value::String(production_id.into()));
    if common.contains_key("data_level") {
        common.insert("data_level".into(), Value::String("record".into()));
    }
    common
}

/// An instant as ISO 8601 (UTC as `+00:00`, milliseconds, as the Process
/// Run Crate profile writes times), or `None` for 0.
fn iso(unix_ms: i64) -> Option<String> {
    if unix_ms <= 0 {
        return None;
    }
    DateTime::<Utc>::from_timestamp_millis(unix_ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, false))
}

/// Bytes for people: `1.5 GB` (decimal units), exact below a kilobyte.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1000.0 {
            break;
        }
        value /= 1000.0;
        unit = u;
    }
    format!("{value:.1} {unit}")
}

/// Seconds for people: `1 h 2 min 3.0 s`.
pub fn human_seconds(seconds: f64) -> String {
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    let whole = seconds.round() as u64;
    let (h, m, s) = (whole / 3600, whole / 60 % 60, whole % 60);
    if h > 0 {
        format!("{h} h {m} min {s} s")
    } else {
        format!("{m} min {s} s")
    }
}

/// The record as pretty JSON (the struct's fields, in its order).
pub fn to_json(record: &Record) -> String {
    serde_json::to_string_pretty(record).unwrap_or_else(|_| "{}".into())
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The record as a Markdown page for people.
pub fn to_markdown(record: &Record) -> String {
    let mut md = String::new();
    let or_unknown = |text: &str| {
        if text.is_empty() {
            "unknown".to_string()
        } else {
            format!("`{}`", text.replace('`', "'"))
        }
    };
    let _ = writeln!(md, "# Production {}\n", record.production_id);
    let _ = writeln!(md, "**State:** {}\n", record.state);
    let _ = writeln!(md, "## Request\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let rows = [
        ("Request", or_unknown(&record.request_id)),
        ("Submitter", or_unknown(&record.submitter)),
        ("VO", or_unknown(&record.vo)),
        ("Profile", or_unknown(&record.profile)),
        ("Profile SHA-256", or_unknown(&record.profile_sha256)),
        ("Fingerprint", or_unknown(&record.fingerprint)),
        ("Installation", or_unknown(&record.installation)),
    ];
    for (name, value) in rows {
        let _ = writeln!(md, "| {name} | {} |", cell(&value));
    }
    let runs = if record.last_run == 0 {
        "none".to_string()
    } else {
        format!("{} – {}", record.first_run, record.last_run)
    };
    let _ = writeln!(md, "| Runs | {runs} |");
    if !record.software.is_empty() {
        let _ = writeln!(md, "\n### Software\n");
        let _ = writeln!(md, "| Software | Version |\n|---|---|");
        for (name, version) in &record.software {
            let _ = writeln!(md, "| {} | {} |", cell(name), cell(version));
        }
    }
    if let Some(parameters) = record.parameters.as_object().filter(|p| !p.is_empty()) {
        let _ = writeln!(md, "\n### Parameters\n");
        let _ = writeln!(md, "| Parameter | Value |\n|---|---|");
        for (name, value) in parameters {
            let _ = writeln!(md, "| {} | `{}` |", cell(name), cell(&value.to_string()));
        }
    }
    let _ = writeln!(md, "\n## Jobs\n");
    let c = &record.counts;
    let _ = writeln!(
        md,
        "{} jobs: {} done, {} exhausted, {} cancelled, {} failed. {} attempts ({} retries).",
        record.job_total,
        c.done,
        c.exhausted,
        c.cancelled,
        c.failed,
        record.attempts,
        record.retries
    );
    if !record.installations.is_empty() {
        let _ = writeln!(md, "\n### Where the jobs ran\n");
        let _ = writeln!(
            md,
            "| Installation | Jobs | Done | Exhausted | Cancelled | Failed | Which jobs |\n|---|---:|---:|---:|---:|---:|---|"
        );
        for p in &record.installations {
            let c = &p.counts;
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                cell(&p.installation),
                c.total(),
                c.done,
                c.exhausted,
                c.cancelled,
                c.failed,
                cell(&job_ranges_text(&p.jobs, p.jobs_truncated))
            );
        }
    }
    let _ = writeln!(md, "\n### CPU time\n");
    let used = match record.cpu_known() {
        CpuKnown::Known => human_seconds(record.cpu_seconds_used),
        CpuKnown::Partly => format!(
            "{} (reported for {} of {} attempts)",
            human_seconds(record.cpu_seconds_used),
            record.cpu_measured_attempts,
            record.attempts
        ),
        CpuKnown::Unknown => "unknown (the WMS does not report it)".to_string(),
    };
    let estimated = record
        .cpu_seconds_estimated()
        .map_or_else(|| "unknown".to_string(), human_seconds);
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| Used | {used} |");
    let _ = writeln!(md, "| Estimated | {estimated} |");
    if let (Some(estimate), CpuKnown::Known) = (record.cpu_seconds_estimated(), record.cpu_known())
        && estimate > 0.0
    {
        let _ = writeln!(
            md,
            "| Used / estimated | {:.1} % |",
            100.0 * record.cpu_seconds_used / estimate
        );
    }
    let _ = writeln!(md, "\n## Timeline (UTC)\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let times = [
        ("Submitted", record.submitted_unix_ms),
        ("Accepted", record.accepted_unix_ms),
        ("First job started", record.first_job_started_unix_ms),
        ("Last job ended", record.last_job_ended_unix_ms),
        ("Completed", record.completed_unix_ms),
    ];
    for (name, at) in times {
        let _ = writeln!(md, "| {name} | {} |", iso(at).unwrap_or("unknown".into()));
    }
    let _ = writeln!(md, "\n## Outputs\n");
    let _ = writeln!(
        md,
        "{} files, {} ({} bytes).",
        record.file_count,
        human_bytes(record.total_bytes),
        record.total_bytes
    );
    if !record.datasets.is_empty() {
        let _ = writeln!(md, "\n| Dataset | Files | Bytes |\n|---|---:|---:|");
        for d in &record.datasets {
            let name = if d.name.is_empty() { "(none)" } else { &d.name };
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                cell(name),
                d.file_count,
                d.total_bytes
            );
        }
    }
    if !record.destinations.is_empty() {
        let _ = writeln!(
            md,
            "\n### Replicas\n\n| Destination | Forwarded | Failing | Files |\n|---|---:|---:|---:|"
        );
        for destination in &record.destinations {
            let r = record
                .replicas
                .iter()
                .find(|r| &r.destination == destination)
                .cloned()
                .unwrap_or_default();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                cell(destination),
                r.forwarded,
                r.failing,
                r.total
            );
        }
    }
    let list = |ids: &[String]| {
        if ids.is_empty() {
            "none".to_string()
        } else {
            ids.join(", ")
        }
    };
    let _ = writeln!(md, "\n## Related productions\n");
    let _ = writeln!(md, "- Parents: {}", list(&record.parent_production_ids));
    let _ = writeln!(md, "- Children: {}", list(&record.child_production_ids));
    if !record.record_lfn.is_empty() {
        let _ = writeln!(
            md,
            "\nThis record is catalogued as `{}` (a Workflow Run RO-Crate).",
            record.record_lfn
        );
    }
    md
}

/// The record's licence: the VO's data policy, which the catalog cannot name.
const LICENSE_ID: &str = "#license";

/// One value as itself, several as an array (RO-Crate 1.1's JSON-LD form).
fn one_or_many(mut values: Vec<Value>) -> Value {
    if values.len() == 1 {
        values.pop().unwrap_or(Value::Null)
    } else {
        Value::Array(values)
    }
}

/// A URN naming something of the production that has no URL of its own.
fn urn(kind: &str, name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._~:@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("urn:prodsys:{kind}:{safe}")
}

/// The record as `ro-crate-metadata.json` of a Process Run Crate: the
/// production is a `CreateAction` whose instrument is its profile (a
/// `SoftwareApplication` pinned by the profile file's SHA-256), whose agent
/// is the submitter, whose object is its parameters (`PropertyValue`s) and
/// whose result is its datasets. Live facts (replica states) are left out,
/// so the crate of a production is always the same bytes.
pub fn to_ro_crate(record: &Record) -> String {
    let id = &record.production_id;
    let run_id = format!("#run-{id}");
    let profile_id = if record.profile_sha256.is_empty() {
        urn("profile", &record.profile)
    } else {
        urn(
            "profile",
            &format!("{}:sha256:{}", record.profile, record.profile_sha256),
        )
    };
    let mut graph: Vec<Value> = Vec::new();
    let ended = iso(record.completed_unix_ms);
    let mut root = json!({
        "@id": "./",
        "@type": "Dataset",
        "name": format!("Record of production {id}"),
        "description": format!(
            "The production record of {id} ({} profile, {}): who asked for it and with what, \
             how its jobs ran, and what it wrote.",
            if record.profile.is_empty() { "unknown" } else { &record.profile },
            record.state
        ),
        "identifier": id,
        "conformsTo": { "@id": PROCESS_RUN_CRATE },
        "mentions": { "@id": run_id },
        "license": { "@id": LICENSE_ID },
    });
    if let Some(ended) = &ended {
        root["datePublished"] = json!(ended);
    }
    if !record.submitter.is_empty() {
        root["author"] = json!({ "@id": urn("person", &record.submitter) });
    }
    if !record.vo.is_empty() {
        root["publisher"] = json!({ "@id": urn("vo", &record.vo) });
    }
    graph.push(json!({
        "@id": RO_CRATE_FILE,
        "@type": "CreativeWork",
        "conformsTo": { "@id": RO_CRATE_SPEC },
        "about": { "@id": "./" },
    }));
    graph.push(root);
    graph.push(json!({
        "@id": PROCESS_RUN_CRATE,
        "@type": "CreativeWork",
        "name": "Process Run Crate",
        "version": "0.5",
    }));
    let software: Vec<Value> = record
        .software
        .iter()
        .map(|(name, version)| {
            json!({
                "@id": urn("software", &format!("{name}:{version}")),
                "@type": "SoftwareApplication",
                "name": name,
                "softwareVersion": version,
            })
        })
        .collect();
    let mut profile = json!({
        "@id": profile_id,
        "@type": "SoftwareApplication",
        "name": if record.profile.is_empty() { "unknown profile".to_string() } else { format!("prodsys profile {}", record.profile) },
        "softwareVersion": if record.profile_sha256.is_empty() { "unknown".to_string() } else { format!("sha256:{}", record.profile_sha256) },
    });
    if !software.is_empty() {
        profile["softwareRequirements"] = json!(
            software
                .iter()
                .map(|s| json!({ "@id": s["@id"] }))
                .collect::<Vec<_>>()
        );
    }
    let parameters: Vec<(String, Value)> = record
        .parameters
        .as_object()
        .map(|p| {
            p.iter()
                .map(|(name, value)| {
                    let value = match value {
                        Value::String(_) | Value::Number(_) | Value::Bool(_) => value.clone(),
                        other => Value::String(other.to_string()),
                    };
                    (name.clone(), value)
                })
                .collect()
        })
        .unwrap_or_default();
    let parameter_ids: Vec<Value> = parameters
        .iter()
        .map(|(name, _)| json!({ "@id": format!("#parameter-{name}") }))
        .collect();
    let dataset_ids: Vec<Value> = record
        .datasets
        .iter()
        .map(|d| json!({ "@id": format!("#dataset-{}", d.name) }))
        .collect();
    let status = if record.state == "COMPLETED" {
        "http://schema.org/CompletedActionStatus"
    } else {
        "http://schema.org/FailedActionStatus"
    };
    let cpu = match record.cpu_known() {
        CpuKnown::Known => format!("{:.3} CPU seconds used", record.cpu_seconds_used),
        CpuKnown::Partly => format!(
            "{:.3} CPU seconds used by the {} of {} attempts the WMS reported",
            record.cpu_seconds_used, record.cpu_measured_attempts, record.attempts
        ),
        CpuKnown::Unknown => "CPU time used unknown".to_string(),
    };
    let estimated = record
        .cpu_seconds_estimated()
        .map_or_else(|| "unknown".into(), |s| format!("{s:.3}"));
    let c = &record.counts;
    let mut action = json!({
        "@id": run_id,
        "@type": "CreateAction",
        "name": format!("Production {id}"),
        "description": format!(
            "{} jobs on installation {} (runs {}–{}): {} done, {} exhausted, {} cancelled; \
             {} attempts, {} retries; {cpu}, {estimated} estimated; {} files, {} bytes.",
            record.job_total,
            if record.installation.is_empty() { "unknown" } else { &record.installation },
            record.first_run,
            record.last_run,
            c.done,
            c.exhausted,
            c.cancelled,
            record.attempts,
            record.retries,
            record.file_count,
            record.total_bytes
        ),
        "instrument": { "@id": profile_id },
        "actionStatus": status,
        "object": one_or_many(parameter_ids),
        "result": one_or_many(dataset_ids),
    });
    if let Some(start) = iso(record.first_job_started_unix_ms) {
        action["startTime"] = json!(start);
    }
    if let Some(end) = &ended {
        action["endTime"] = json!(end);
    }
    if !record.submitter.is_empty() {
        action["agent"] = json!({ "@id": urn("person", &record.submitter) });
    }
    if !record.request_id.is_empty() {
        action["identifier"] = json!(record.request_id);
    }
    // Where the jobs ran: each WMS installation a place of the run.
    let places: Vec<Value> = record
        .installations
        .iter()
        .map(|p| {
            let c = &p.counts;
            json!({
                "@id": urn("installation", &p.installation),
                "@type": "Place",
                "name": p.installation,
                "description": format!(
                    "WMS installation {}: {} jobs ran here ({} done, {} exhausted, {} cancelled, {} failed){}",
                    p.installation,
                    c.total(),
                    c.done,
                    c.exhausted,
                    c.cancelled,
                    c.failed,
                    if p.jobs.is_empty() {
                        String::new()
                    } else {
                        format!("; jobs {}", job_ranges_text(&p.jobs, p.jobs_truncated))
                    }
                ),
            })
        })
        .collect();
    if !places.is_empty() {
        action["location"] =
            one_or_many(places.iter().map(|p| json!({ "@id": p["@id"] })).collect());
    }
    graph.push(action);
    graph.extend(places);
    graph.push(json!({
        "@id": LICENSE_ID,
        "@type": "CreativeWork",
        "name": "The data policy of the production's virtual organisation",
        "description": format!(
            "The outputs of {id} and this record are governed by the data policy of {}.",
            if record.vo.is_empty() { "the virtual organisation that asked for it" } else { &record.vo }
        ),
    }));
    if !record.vo.is_empty() {
        graph.push(json!({
            "@id": urn("vo", &record.vo),
            "@type": "Organization",
            "name": record.vo,
            "description": "The virtual organisation the production ran for",
        }));
    }
    graph.push(profile);
    graph.extend(software);
    if !record.submitter.is_empty() {
        let mut person = json!({
            "@id": urn("person", &record.submitter),
            "@type": "Person",
            "name": record.submitter,
        });
        if !record.vo.is_empty() {
            person["affiliation"] = json!({ "@id": urn("vo", &record.vo) });
        }
        graph.push(person);
    }
    for (name, value) in parameters {
        graph.push(json!({
            "@id": format!("#parameter-{name}"),
            "@type": "PropertyValue",
            "name": name,
            "value": value,
        }));
    }
    for d in &record.datasets {
        graph.push(json!({
            "@id": format!("#dataset-{}", d.name),
            "@type": "CreativeWork",
            "name": if d.name.is_empty() { format!("outputs of {id}") } else { d.name.clone() },
            "description": format!("{} files, {} bytes, catalogued by prodsys", d.file_count, d.total_bytes),
        }));
    }
    let crate_json = json!({
        "@context": format!("{RO_CRATE_SPEC}/context"),
        "@graph": graph,
    });
    let mut text = serde_json::to_string_pretty(&crate_json).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    text
}

/// Whether the record knows the request it came from: one of a production
/// that predates records, or whose `request.accepted` the catalog has not
/// taken yet, does not (and is not written as a file).
pub fn knows_request(record: &Record) -> bool {
    record.has_request()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Record {
        let parameters = json!({
            "site": "LaPalma",
            "particle": "gamma",
            "nsb_levels": [1, 5],
            "n_showers": 4000,
            "software": { "corsika": "7.7550", "sim_telarray": "2024-02-05" },
        });
        Record {
            production_id: "CTA-000001".into(),
            state: "COMPLETED".into(),
            request_id: "0190a4e2-0000-7000-8000-000000000001".into(),
            submitter: "example".into(),
            vo: "vo.cta.in2p3.fr".into(),
            profile: "cta-irf-mc".into(),
            profile_sha256: "ab".repeat(32),
            fingerprint: "cd".repeat(32),
            software: software_versions(&parameters),
            parameters,
            installation: "local".into(),
            installations: vec![Placement {
                installation: "local".into(),
                counts: JobCounts {
                    done: 4,
                    ..Default::default()
                },
                jobs: vec![JobRange { first: 0, last: 3 }],
                jobs_truncated: false,
            }],
            first_run: 1,
            last_run: 4,
            job_total: 4,
            counts: JobCounts {
                done: 4,
                ..Default::default()
            },
            attempts: 5,
            retries: 1,
            cpu_seconds_used: 2.5,
            cpu_measured_attempts: 5,
            estimate: Some(Estimate {
                cpu_seconds_per_job: 110.0,
                cpu_hours_total: 440.0 / 3600.0,
                memory_mb: 2000,
                disk_mb_per_job: 12.0,
                disk_gb_total: 0.048,
            }),
            submitted_unix_ms: 1_700_000_000_000,
            accepted_unix_ms: 1_700_000_000_500,
            first_job_started_unix_ms: 1_700_000_001_000,
            last_job_ended_unix_ms: 1_700_000_009_000,
            completed_unix_ms: 1_700_000_009_100,
            file_count: 8,
            total_bytes: 1_234_567,
            datasets: vec![Dataset {
                name: "PROD6_LaPalma_gamma_CTA-000001".into(),
                file_count: 8,
                total_bytes: 1_234_567,
            }],
            destinations: vec!["disk".into()],
            replicas: vec![Replicas {
                destination: "disk".into(),
                forwarded: 3,
                failing: 1,
                total: 9,
            }],
            parent_production_ids: Vec::new(),
            child_production_ids: Vec::new(),
            record_lfn: "/vo.cta.in2p3.fr/MC/PROD6/CTA-000001/record/ro-crate-metadata.json".into(),
        }
    }

    #[test]
    fn software_versions_come_from_the_parameters() {
        let cta = json!({ "software": { "corsika": "7.7550", "sim_telarray": "2024-02-05" }, "site": "LaPalma" });
        let versions = software_versions(&cta);
        assert_eq!(versions.len(), 2);
        assert_eq!(versions["corsika"], "7.7550");
        let km3net = json!({
            "template": { "name": "gseagen-7.4.1", "version": "3", "image": "localhost/km3net/toysim",
                          "digest": format!("sha256:{}", "ab".repeat(32)) },
            "root_version": 6.3,
            "detector": "ORCA10",
        });
        let versions = software_versions(&km3net);
        assert_eq!(versions["template gseagen-7.4.1"], "3");
        assert_eq!(
            versions["container image"],
            format!("localhost/km3net/toysim@sha256:{}", "ab".repeat(32))
        );
        assert_eq!(versions["root_version"], "6.3");
        assert_eq!(versions.len(), 3);
        assert!(software_versions(&json!("not an object")).is_empty());
    }

    #[test]
    fn the_record_lfn_lies_under_the_production_s_directory() {
        assert_eq!(
            record_lfn(
                "CTA-000001",
                "vo.cta.in2p3.fr",
                Some(
                    "/vo.cta.in2p3.fr/MC/PROD6/LaPalma/gamma/sim_telarray/CTA-000001/Data/000xxx/run1.simtel.zst"
                )
            ),
            "/vo.cta.in2p3.fr/MC/PROD6/LaPalma/gamma/sim_telarray/CTA-000001/record/ro-crate-metadata.json"
        );
        // No segment names the production: beside its first output.
        assert_eq!(
            record_lfn(
                "KM-000001",
                "km3net.org",
                Some("/km3net.org/sim/run1/a.root")
            ),
            "/km3net.org/sim/run1/record/ro-crate-metadata.json"
        );
        assert_eq!(
            record_lfn("KM-000001", "km3net.org", None),
            "/km3net.org/prodsys/KM-000001/record/ro-crate-metadata.json"
        );
        assert_eq!(
            record_lfn("KM-000001", "", None),
            "/prodsys/prodsys/KM-000001/record/ro-crate-metadata.json"
        );
    }

    #[test]
    fn the_record_file_carries_what_its_outputs_share() {
        let common = json!({ "site": "LaPalma", "dataset": "PROD6_x", "data_level": "DL0" });
        let Value::Object(common) = common else {
            unreachable!()
        };
        let metadata = record_metadata(common, "CTA-000001");
        assert_eq!(metadata["dataset"], "PROD6_x");
        assert_eq!(metadata["data_level"], "record");
        assert_eq!(metadata["production_id"], "CTA-000001");
        let bare = record_metadata(serde_json::Map::new(), "KM-000001");
        assert_eq!(Value::Object(bare), json!({ "production_id": "KM-000001" }));
    }

    #[test]
    fn a_uuid_v7_tells_when_it_was_made() {
        let id = uuid::Uuid::parse_str("0190a4e2-1234-7000-8000-000000000001").unwrap();
        assert_eq!(uuid_v7_unix_ms(&id), Some(0x0190a4e21234));
        assert_eq!(uuid_v7_unix_ms(&uuid::Uuid::new_v4()), None);
        let now = chrono::Utc::now().timestamp_millis();
        let made = uuid_v7_unix_ms(&uuid::Uuid::now_v7()).unwrap();
        assert!((made - now).abs() < 5_000);
    }

    #[test]
    fn numbers_for_people() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_234_567), "1.2 MB");
        assert_eq!(human_bytes(5_000_000_000_000), "5.0 TB");
        assert_eq!(human_seconds(2.5), "2.5 s");
        assert_eq!(human_seconds(3723.0), "1 h 2 min 3 s");
        assert_eq!(human_seconds(61.0), "1 min 1 s");
    }

    #[test]
    fn markdown_tells_a_person_the_whole_story() {
        let md = to_markdown(&example());
        for expected in [
            "# Production CTA-000001",
            "**State:** COMPLETED",
            "| Submitter | `example` |",
            "| Profile | `cta-irf-mc` |",
            "| Runs | 1 – 4 |",
            "| corsika | 7.7550 |",
            "| site | `\"LaPalma\"` |",
            "4 jobs: 4 done, 0 exhausted, 0 cancelled, 0 failed. 5 attempts (1 retries).",
            "| Used | 2.5 s |",
            "| Estimated | 7 min 20 s |",
            "| Used / estimated | 0.6 % |",
            "| Submitted | 2023-11-14T22:13:20.000+00:00 |",
            "| Completed | 2023-11-14T22:13:29.100+00:00 |",
            "8 files, 1.2 MB (1234567 bytes).",
            "| PROD6_LaPalma_gamma_CTA-000001 | 8 | 1234567 |",
            "| disk | 3 | 1 | 9 |",
            "- Parents: none",
            "catalogued as `/vo.cta.in2p3.fr/MC/PROD6/CTA-000001/record/ro-crate-metadata.json`",
        ] {
            assert!(md.contains(expected), "{expected:?} missing from\n{md}");
        }
        // Unknown CPU time is said so, not shown as zero.
        let slurm = Record {
            cpu_measured_attempts: 0,
            cpu_seconds_used: 0.0,
            ..example()
        };
        let md = to_markdown(&slurm);
        assert!(
            md.contains("| Used | unknown (the WMS does not report it) |"),
            "{md}"
        );
        assert!(!md.contains("Used / estimated"));
        let partly = Record {
            cpu_measured_attempts: 2,
            ..example()
        };
        assert!(to_markdown(&partly).contains("(reported for 2 of 5 attempts)"));
        // A record from before records were kept: unknowns, no panic.
        let bare = Record {
            production_id: "CTA-000009".into(),
            state: "FAILED".into(),
            ..Default::default()
        };
        let md = to_markdown(&bare);
        assert!(md.contains("| Submitter | unknown |"), "{md}");
        assert!(md.contains("| Runs | none |"), "{md}");
        assert!(md.contains("| Estimated | unknown |"), "{md}");
        assert!(!knows_request(&bare) && knows_request(&example()));
    }

    #[test]
    fn every_rendering_says_where_the_jobs_ran() {
        let federated = Record {
            installation: "cta-grid".into(),
            installations: vec![
                Placement {
                    installation: "dirac-cta".into(),
                    counts: JobCounts {
                        done: 3,
                        exhausted: 1,
                        ..Default::default()
                    },
                    jobs: vec![
                        JobRange { first: 0, last: 2 },
                        JobRange { first: 9, last: 9 },
                    ],
                    jobs_truncated: false,
                },
                Placement {
                    installation: "slurm-local".into(),
                    counts: JobCounts {
                        done: 6,
                        ..Default::default()
                    },
                    jobs: vec![JobRange { first: 3, last: 8 }],
                    jobs_truncated: true,
                },
            ],
            ..example()
        };
        let as_json: Value = serde_json::from_str(&to_json(&federated)).unwrap();
        assert_eq!(as_json["installation"], "cta-grid");
        assert_eq!(as_json["installations"][0]["installation"], "dirac-cta");
        assert_eq!(as_json["installations"][0]["counts"]["exhausted"], 1);
        assert_eq!(as_json["installations"][1]["counts"]["done"], 6);
        assert_eq!(
            as_json["installations"][0]["jobs"],
            json!([{"first": 0, "last": 2}, {"first": 9, "last": 9}])
        );
        assert_eq!(as_json["installations"][1]["jobs_truncated"], true);
        let md = to_markdown(&federated);
        assert!(
            md.contains("| dirac-cta | 4 | 3 | 1 | 0 | 0 | 0–2, 9 |"),
            "{md}"
        );
        assert!(
            md.contains("| slurm-local | 6 | 6 | 0 | 0 | 0 | 3–8, … |"),
            "{md}"
        );
        let crate_json: Value = serde_json::from_str(&to_ro_crate(&federated)).unwrap();
        let graph = crate_json["@graph"].as_array().unwrap();
        let run = graph.iter().find(|e| e["@type"] == "CreateAction").unwrap();
        let places: Vec<&str> = run["location"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["@id"].as_str().unwrap())
            .collect();
        assert_eq!(
            places,
            [
                "urn:prodsys:installation:dirac-cta",
                "urn:prodsys:installation:slurm-local"
            ]
        );
        let slurm = graph
            .iter()
            .find(|e| e["@id"] == places[1])
            .unwrap_or_else(|| panic!("{crate_json}"));
        assert_eq!(slurm["@type"], "Place");
        assert!(
            slurm["description"]
                .as_str()
                .unwrap()
                .contains("6 jobs ran here (6 done"),
            "{slurm}"
        );
        assert!(
            slurm["description"]
                .as_str()
                .unwrap()
                .ends_with("; jobs 3–8, …"),
            "{slurm}"
        );
        // A record that does not know where its jobs ran says nothing of it.
        let unknown = Record {
            installations: Vec::new(),
            ..example()
        };
        assert!(!to_markdown(&unknown).contains("Where the jobs ran"));
        let crate_json: Value = serde_json::from_str(&to_ro_crate(&unknown)).unwrap();
        assert!(
            crate_json["@graph"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e.get("location").is_none())
        );
    }

    #[test]
    fn the_ro_crate_is_a_process_run_crate_and_the_same_bytes_every_time() {
        let record = example();
        let text = to_ro_crate(&record);
        if let Some(dir) = std::env::var_os("PRODSYS_RECORD_CRATE_DIR") {
            std::fs::write(std::path::Path::new(&dir).join(RO_CRATE_FILE), &text).unwrap();
        }
        // Live replica counts do not change the crate.
        let moved_on = Record {
            replicas: Vec::new(),
            ..record.clone()
        };
        assert_eq!(text, to_ro_crate(&moved_on));
        let crate_json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            crate_json["@context"],
            "https://w3id.org/ro/crate/1.1/context"
        );
        let graph = crate_json["@graph"].as_array().unwrap();
        let entity = |id: &str| {
            graph
                .iter()
                .find(|e| e["@id"] == id)
                .unwrap_or_else(|| panic!("{id} missing from {text}"))
                .clone()
        };
        let descriptor = entity("ro-crate-metadata.json");
        assert_eq!(descriptor["about"]["@id"], "./");
        let root = entity("./");
        assert_eq!(root["conformsTo"]["@id"], PROCESS_RUN_CRATE);
        assert_eq!(root["datePublished"], "2023-11-14T22:13:29.100+00:00");
        assert_eq!(
            entity(root["license"]["@id"].as_str().unwrap())["@type"],
            "CreativeWork"
        );
        assert_eq!(
            entity(root["publisher"]["@id"].as_str().unwrap())["name"],
            "vo.cta.in2p3.fr"
        );
        let run = entity("#run-CTA-000001");
        assert_eq!(run["@type"], "CreateAction");
        assert_eq!(root["mentions"]["@id"], "#run-CTA-000001");
        assert_eq!(run["startTime"], "2023-11-14T22:13:21.000+00:00");
        assert_eq!(run["endTime"], "2023-11-14T22:13:29.100+00:00");
        assert_eq!(
            run["actionStatus"],
            "http://schema.org/CompletedActionStatus"
        );
        let instrument = entity(run["instrument"]["@id"].as_str().unwrap());
        assert_eq!(instrument["@type"], "SoftwareApplication");
        assert_eq!(
            instrument["softwareVersion"],
            format!("sha256:{}", "ab".repeat(32))
        );
        assert_eq!(
            instrument["softwareRequirements"].as_array().unwrap().len(),
            2
        );
        let agent = entity(run["agent"]["@id"].as_str().unwrap());
        assert_eq!(agent["@type"], "Person");
        assert_eq!(agent["name"], "example");
        let site = entity("#parameter-site");
        assert_eq!(site["value"], "LaPalma");
        assert_eq!(entity("#parameter-n_showers")["value"], 4000);
        assert_eq!(entity("#parameter-nsb_levels")["value"], "[1,5]");
        assert_eq!(run["object"].as_array().unwrap().len(), 5);
        let dataset = entity("#dataset-PROD6_LaPalma_gamma_CTA-000001");
        assert_eq!(run["result"]["@id"], dataset["@id"]);
        assert!(
            run["description"]
                .as_str()
                .unwrap()
                .contains("8 files, 1234567 bytes")
        );
        // A partial production's run did not complete.
        let partial = Record {
            state: "PARTIALLY_COMPLETED".into(),
            ..record
        };
        let crate_json: Value = serde_json::from_str(&to_ro_crate(&partial)).unwrap();
        let run = crate_json["@graph"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["@type"] == "CreateAction")
            .unwrap()
            .clone();
        assert_eq!(run["actionStatus"], "http://schema.org/FailedActionStatus");
    }

    #[test]
    fn json_has_every_field_by_its_name() {
        let value: Value = serde_json::from_str(&to_json(&example())).unwrap();
        assert_eq!(value["production_id"], "CTA-000001");
        assert_eq!(value["counts"]["done"], 4);
        assert_eq!(value["software"]["sim_telarray"], "2024-02-05");
        assert_eq!(value["estimate"]["cpu_seconds_per_job"], 110.0);
        assert_eq!(value["datasets"][0]["file_count"], 8);
        assert_eq!(value["parent_production_ids"], json!([]));
    }
}
