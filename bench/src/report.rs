//! The table of figures (terminal and BENCHMARKS.md), the targets of issue 5
//! beside them (memory per service process), and what the measurements show
//! about each figure.

use std::fmt::Write as _;

use crate::services::ORDER;
use crate::stack::PhaseLoad;
use crate::sys::{self, mib};
use crate::{Results, rss_list};

const MIB: u64 = 1024 * 1024;
/// Targets of issue 5 for each service process.
const IDLE_RSS_MIB: u64 = 50;
const LOADED_RSS_MIB: u64 = 256;
/// Targets of issue 17: each a ratio to a raw limit measured in the same run.
const SUBMIT_PER_COMMIT: f64 = 0.25;
const LATENCY_P99_PER_COMMIT_P99: f64 = 25.0;
const STATUS_PER_BATCH_ROW: f64 = 1.5;
const CATALOG_PER_BATCH_ROW: f64 = 0.5;
const PLAN_PER_BATCH_ROW: f64 = 0.5;
/// Two processes of each service against one: "does not fall", less the
/// few percent two runs of the same thing differ by on this machine.
const REPLICA_RATE_FLOOR: f64 = 0.95;

/// 12345.6 → "12,346".
pub fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "—".into();
    }
    let n = value.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn ms(value: f64) -> String {
    if !value.is_finite() {
        "—".into()
    } else if value < 10.0 {
        format!("{value:.2} ms")
    } else {
        format!("{value:.1} ms")
    }
}

fn ratio(value: f64, limit: f64) -> String {
    if !value.is_finite() || !limit.is_finite() || limit <= 0.0 {
        return "—".into();
    }
    let r = value / limit;
    if r >= 10.0 {
        format!("{r:.0}×")
    } else if r >= 0.1 {
        format!("{r:.2}×")
    } else {
        format!("{r:.3}×")
    }
}

struct Row {
    figure: String,
    measured: String,
    raw: String,
    ratio: String,
    target: String,
    verdict: String,
}

fn smoke_mark(results: &Results, verdict: &str) -> String {
    if results.smoke && (verdict == "pass" || verdict == "miss") {
        format!("{verdict} (smoke sizes)")
    } else {
        verdict.to_string()
    }
}

fn pass(ok: bool) -> &'static str {
    if ok { "pass" } else { "miss" }
}

/// The raw limits an event consumer depends on (the broker's round trip
/// times the items per message, and the database's batched insert rate:
/// each item is a row written in a statement of many), and its ratio to each.
fn consumer_limits(results: &Results, per_message: u64, rate: f64) -> (String, String) {
    let broker = results
        .broker
        .as_ref()
        .map(|b| b.round_trip_per_s * per_message as f64);
    let db = results.db.as_ref().map(|d| d.batch_rows_per_s);
    let mut raw = Vec::new();
    let mut ratios = Vec::new();
    if let Some(d) = db {
        raw.push(format!(
            "batched INSERT {} rows/s (bounds it)",
            thousands(d)
        ));
        ratios.push(format!("{} batched rows", ratio(rate, d)));
    }
    if let Some(b) = broker {
        raw.push(format!(
            "broker {} msgs/s × {per_message} = {}/s",
            thousands(b / per_message as f64),
            thousands(b)
        ));
        ratios.push(format!("{} broker", ratio(rate, b)));
    }
    if raw.is_empty() {
        return ("—".into(), "—".into());
    }
    (raw.join("; "), ratios.join("; "))
}

/// How a load's RSS figures were taken.
fn rss_kind(load: &PhaseLoad) -> &'static str {
    if load.hwm {
        "peak RSS (VmHWM over the measurement)"
    } else {
        "largest RSS of 250 ms samples"
    }
}

/// A verdict on a ratio: "n/a" (naming why) when the raw limit is missing.
fn ratio_verdict(results: &Results, value: f64, ok: impl Fn(f64) -> bool) -> String {
    if value.is_finite() {
        smoke_mark(results, pass(ok(value)))
    } else {
        "cannot tell: no raw limit measured in this run".into()
    }
}

fn rows(results: &Results) -> Vec<Row> {
    let mut rows = Vec::new();
    if let Some(b) = &results.broker {
        rows.push(Row {
            figure: format!(
                "raw RabbitMQ: persistent publish + confirm → consume + ack, quorum queue, {} B messages",
                b.message_bytes
            ),
            measured: format!("{} msgs/s", thousands(b.round_trip_per_s)),
            raw: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            verdict: "—".into(),
        });
    }
    if let Some(d) = &results.db {
        let connections = results.raw_plan.map_or(0, |p| p.connections);
        rows.push(Row {
            figure: format!(
                "raw PostgreSQL: single-row INSERT + COMMIT, {connections} connections"
            ),
            measured: format!(
                "{} commits/s (p50 {}, p99 {})",
                thousands(d.single_per_s),
                ms(d.single_p50_ms),
                ms(d.single_p99_ms)
            ),
            raw: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            verdict: "—".into(),
        });
        let batch = results.raw_plan.map_or(0, |p| p.batch_rows);
        rows.push(Row {
            figure: format!(
                "raw PostgreSQL: batched INSERT (unnest, {batch} rows per statement), 1 connection"
            ),
            measured: format!("{} rows/s", thousands(d.batch_rows_per_s)),
            raw: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            verdict: "—".into(),
        });
    }
    let commits = results.db.as_ref().map_or(f64::NAN, |d| d.single_per_s);
    let batch_rows = results.db.as_ref().map_or(f64::NAN, |d| d.batch_rows_per_s);
    let broker = results
        .broker
        .as_ref()
        .map_or(f64::NAN, |b| b.round_trip_per_s);
    if let Some(s) = &results.submit {
        let r = s.accepted_per_s / commits;
        let verdict = if s.seconds < 60.0 {
            format!(
                "n/a: {:.0} s run, the target is for 60 s ({} at this length)",
                s.seconds,
                pass(r >= SUBMIT_PER_COMMIT)
            )
        } else {
            ratio_verdict(results, r, |r| r >= SUBMIT_PER_COMMIT)
        };
        rows.push(Row {
            figure: format!(
                "prodsys: SubmitRequest → ACCEPTED, sustained {:.0} s, {} clients (closed loop)",
                s.seconds, s.clients
            ),
            measured: format!("{} req/s", thousands(s.accepted_per_s)),
            raw: format!(
                "single-row commits {}/s (the target's limit); batched INSERT {} rows/s; broker round trip {} msgs/s",
                thousands(commits),
                thousands(batch_rows),
                thousands(broker)
            ),
            ratio: format!(
                "{} commits; {} batched rows; {} broker messages",
                ratio(s.accepted_per_s, commits),
                ratio(s.accepted_per_s, batch_rows),
                ratio(s.accepted_per_s, broker)
            ),
            target: format!("≥ {SUBMIT_PER_COMMIT} × single-row commit rate, 60 s (issue 17)"),
            verdict,
        });
    }
    if let Some(l) = &results.latency {
        let raw_p99 = results.db.as_ref().map_or(f64::NAN, |d| d.single_p99_ms);
        let r = l.p99_ms / raw_p99;
        let verdict = if l.offered_per_s < 200.0 {
            format!(
                "n/a: offered {:.0} req/s, the target is at 200 ({} at this load)",
                l.offered_per_s,
                pass(r <= LATENCY_P99_PER_COMMIT_P99)
            )
        } else if l.failed > 0 {
            smoke_mark(results, "miss")
        } else {
            ratio_verdict(results, r, |r| r <= LATENCY_P99_PER_COMMIT_P99)
        };
        rows.push(Row {
            figure: format!(
                "prodsys: SubmitRequest → ACCEPTED latency at {:.0} req/s offered (open loop, {:.0} s)",
                l.offered_per_s, l.seconds
            ),
            measured: format!(
                "p50 {}, p99 {} (max {})",
                ms(l.p50_ms),
                ms(l.p99_ms),
                ms(l.max_ms)
            ),
            raw: format!("single-row commit p99 {}", ms(raw_p99)),
            ratio: format!("p99 = {}", ratio(l.p99_ms, raw_p99)),
            target: format!(
                "p99 ≤ {LATENCY_P99_PER_COMMIT_P99} × single-row commit p99 at 200 req/s (issue 17)"
            ),
            verdict,
        });
    }
    if let Some(s) = &results.status {
        let (raw, ratios) = consumer_limits(results, s.per_message, s.transitions_per_s);
        rows.push(Row {
            figure: format!(
                "prodsys: job transitions into status ({} in batches of {})",
                thousands(s.transitions as f64),
                s.per_message
            ),
            measured: format!("{} transitions/s", thousands(s.transitions_per_s)),
            raw,
            ratio: ratios,
            target: format!("≥ {STATUS_PER_BATCH_ROW} × batched INSERT rows/s (issue 17)"),
            verdict: ratio_verdict(results, s.transitions_per_s / batch_rows, |r| {
                r >= STATUS_PER_BATCH_ROW
            }),
        });
    }
    if let Some(w) = &results.watched {
        watched_row(results, w, &mut rows);
    }
    if let Some(c) = &results.catalog {
        let (raw, ratios) = consumer_limits(results, c.per_message, c.files_per_s);
        rows.push(Row {
            figure: format!(
                "prodsys: files into the catalog ({} in job.output events of {})",
                thousands(c.files as f64),
                c.per_message
            ),
            measured: format!("{} files/s", thousands(c.files_per_s)),
            raw,
            ratio: ratios,
            target: format!("≥ {CATALOG_PER_BATCH_ROW} × batched INSERT rows/s (issue 17)"),
            verdict: ratio_verdict(results, c.files_per_s / batch_rows, |r| {
                r >= CATALOG_PER_BATCH_ROW
            }),
        });
    }
    if let Some(c) = &results.chain {
        let (raw, ratios) = consumer_limits(results, c.files_per_event, c.files_per_s);
        let ok = c.lag_p99_ms <= 1000.0 && c.files_per_s >= 20_000.0 && c.misused == 0;
        rows.push(Row {
            figure: format!(
                "prodsys: a chained production fed by its parent (job.output events of {} files): a job per input file; lag from an event handed to the broker to the child's jobs for it ({} events, one every {} ms), and {} more files at once",
                c.files_per_event,
                c.paced_events,
                c.pace_ms,
                thousands(c.files as f64)
            ),
            measured: format!(
                "lag p50 {}, p99 {}, max {}; {} files/s ({} jobs made for {} inputs, {} inputs used twice or not at all)",
                ms(c.lag_p50_ms),
                ms(c.lag_p99_ms),
                ms(c.lag_max_ms),
                thousands(c.files_per_s),
                thousands(c.jobs as f64),
                thousands(c.files_all() as f64),
                c.misused
            ),
            raw,
            ratio: ratios,
            target: "child's jobs within 1 s p99 of their inputs arriving, ≥ 20,000 files/s for a parent of 100,000 files, each input used once (issue 14)".into(),
            verdict: if c.files < 100_000 {
                format!(
                    "n/a: {} files, the target is for 100,000 ({} at this size)",
                    thousands(c.files as f64),
                    pass(ok)
                )
            } else {
                smoke_mark(results, pass(ok))
            },
        });
    }
    if let Some(p) = &results.plan {
        let batch = results.db.as_ref().map_or(f64::NAN, |d| d.batch_rows_per_s);
        let dispatcher = p.load.max_rss.get("dispatcher").copied();
        rows.push(Row {
            figure: format!(
                "prodsys: one production of {} jobs planned and persisted (request.accepted → plan committed)",
                thousands(p.jobs as f64)
            ),
            measured: format!(
                "{:.1} s ({} jobs/s), dispatcher process {} {}",
                p.seconds,
                thousands(p.jobs_per_s),
                rss_kind(&p.load),
                dispatcher.map_or("—".into(), |r| format!("{:.1} MiB", mib(r)))
            ),
            raw: format!("batched INSERT {} rows/s", thousands(batch)),
            ratio: ratio(p.jobs_per_s, batch),
            target: format!(
                "≥ {PLAN_PER_BATCH_ROW} × batched INSERT rows/s (issue 17), dispatcher peak RSS ≤ 256 MiB, 1,000,000 jobs"
            ),
            verdict: if p.jobs < 1_000_000 {
                format!(
                    "n/a: {} jobs, the target is for 1,000,000 ({} at this size)",
                    thousands(p.jobs as f64),
                    pass(p.jobs_per_s / batch >= PLAN_PER_BATCH_ROW)
                )
            } else {
                match dispatcher {
                    Some(rss) => ratio_verdict(results, p.jobs_per_s / batch, |r| {
                        r >= PLAN_PER_BATCH_ROW && rss <= 256 * MIB
                    }),
                    None => "cannot tell: the dispatcher's RSS was not read".into(),
                }
            },
        });
    }
    if let Some(c) = &results.cancel {
        let per_s = c.jobs as f64 / c.seconds;
        let half_plan = c.plan_seconds / 2.0;
        let dispatcher = c.load.max_rss.get("dispatcher").copied();
        let largest = c.messages.as_ref().map(|m| m.largest);
        let ok = c.seconds <= half_plan
            && c.unfinished == 0
            && dispatcher.is_some_and(|r| r <= 256 * MIB)
            && largest.is_some_and(|b| b <= 16 * MIB);
        rows.push(Row {
            figure: format!(
                "prodsys: the production of {} jobs cancelled while queued (CancelProduction sent → status counts every job CANCELLED)",
                thousands(c.jobs as f64)
            ),
            measured: format!(
                "{:.1} s ({} jobs/s); {} jobs left not CANCELLED; dispatcher process {} {}; largest AMQP message body while planning and cancelling {}",
                c.seconds,
                thousands(per_s),
                c.unfinished,
                rss_kind(&c.load),
                dispatcher.map_or("—".into(), |r| format!("{:.1} MiB", mib(r))),
                c.messages.as_ref().map_or("— (not measured)".into(), |m| format!(
                    "{} bytes ({}; {} messages, {:.1} MiB in all)",
                    thousands(m.largest as f64),
                    m.largest_key,
                    thousands(m.messages as f64),
                    mib(m.bytes)
                ))
            ),
            raw: format!(
                "half the time the same run took to plan it: {half_plan:.1} s"
            ),
            ratio: format!("{:.2}× the plan time", c.seconds / c.plan_seconds),
            target: "every job CANCELLED within ½ × the plan time, dispatcher peak RSS ≤ 256 MiB, no message body over 16 MiB, 1,000,000 jobs (issue 17)".into(),
            verdict: if c.jobs < 1_000_000 {
                format!(
                    "n/a: {} jobs, the target is for 1,000,000 ({} at this size)",
                    thousands(c.jobs as f64),
                    pass(ok)
                )
            } else {
                smoke_mark(results, pass(ok))
            },
        });
    }
    if let Some(h) = &results.history {
        history_rows(results, h, &mut rows);
    }
    if let Some(c) = &results.containers {
        rows.push(Row {
            figure: format!(
                "prodsys: {} container jobs (podman, one event each), {} at once, SubmitRequest → COMPLETED",
                thousands(c.jobs as f64),
                c.concurrency
            ),
            measured: format!(
                "{:.1} s ({:.1} jobs/s), {} files catalogued",
                c.prodsys_seconds,
                c.prodsys_per_s(),
                thousands(c.files as f64)
            ),
            raw: format!(
                "`podman run` of the same command, {} at once: {:.1} s ({:.1} jobs/s)",
                c.concurrency,
                c.raw_seconds,
                c.raw_per_s()
            ),
            ratio: format!("{:.2}×", c.ratio()),
            target: "≥ 0.9 × podman run (1,000 jobs)".into(),
            verdict: if c.jobs < 1000 {
                format!(
                    "n/a: {} jobs, the target is for 1,000",
                    thousands(c.jobs as f64)
                )
            } else {
                smoke_mark(results, pass(c.ratio() >= 0.9))
            },
        });
    }
    if let Some(p) = &results.productions {
        rows.push(Row {
            figure: format!(
                "prodsys: {} productions × {} real toysim jobs on the local executor, {} at once, SubmitRequest → every production COMPLETED with every file scanned, checksummed and catalogued",
                thousands(p.productions as f64),
                p.jobs / p.productions.max(1),
                p.concurrency
            ),
            measured: format!(
                "{:.1} s ({:.1} jobs/s); {} files catalogued, {} of them read again and found of the catalogued size and adler32{}",
                p.prodsys_seconds,
                p.prodsys_per_s(),
                thousands(p.files as f64),
                thousands(p.files_verified as f64),
                p.xrootd.as_ref().map_or(String::new(), |server| format!(
                    "; {} files forwarded to XRootD ({server}) and verified there",
                    thousands(p.forwarded as f64)
                ))
            ),
            raw: format!(
                "the same toysim commands by a plain spawner, {} at once{}: {:.1} s ({:.1} jobs/s)",
                p.concurrency,
                if p.xrootd.is_some() {
                    ", each job's outputs then copied with `xrdcp -f`"
                } else {
                    ""
                },
                p.raw_seconds,
                p.raw_per_s()
            ),
            ratio: format!("{:.2}×", p.ratio()),
            target: "≥ 0.8 × the raw spawner's job rate, 1,000 productions × 10 jobs (issue 17)"
                .into(),
            verdict: if p.productions < 1000 {
                format!(
                    "n/a: {} productions, the target is for 1,000 ({} at this size)",
                    thousands(p.productions as f64),
                    pass(p.ratio() >= 0.8)
                )
            } else if p.files_verified != p.files
                || (p.xrootd.is_some() && p.forwarded != p.files)
            {
                smoke_mark(results, "miss")
            } else {
                smoke_mark(results, pass(p.ratio() >= 0.8))
            },
        });
    }
    if let Some(r) = &results.replicated {
        let single = results.productions.as_ref();
        let ratio = single.map_or(f64::NAN, |s| r.prodsys_per_s() / s.prodsys_per_s());
        let ok = ratio >= REPLICA_RATE_FLOOR && r.duplicates.total() == 0;
        let d = &r.duplicates;
        rows.push(Row {
            figure: format!(
                "prodsys: the same {} productions × {} jobs with {} processes of every service (each on its own port; one database, one broker, one work directory)",
                thousands(r.productions as f64),
                r.jobs / r.productions.max(1),
                r.replicas
            ),
            measured: format!(
                "{:.1} s ({:.1} jobs/s); done twice: {} (productions per request beyond one {}, extra job attempts {}{}, outputs catalogued twice for a job {}); {} of {} files verified",
                r.prodsys_seconds,
                r.prodsys_per_s(),
                d.total(),
                d.productions_per_request,
                d.extra_attempts,
                if d.retried.is_empty() {
                    String::new()
                } else {
                    format!(": {}", d.retried.join("; "))
                },
                d.files_per_job,
                thousands(r.files_verified as f64),
                thousands(r.files as f64)
            ),
            raw: single.map_or("— (one process each did not run)".into(), |s| {
                format!(
                    "one process of each, same run: {:.1} jobs/s",
                    s.prodsys_per_s()
                )
            }),
            ratio: if ratio.is_finite() {
                format!("{ratio:.2}×")
            } else {
                "—".into()
            },
            target: format!(
                "rate does not fall (≥ {REPLICA_RATE_FLOOR} × one process each, the run-to-run noise allowed) and nothing is done twice (issue 17)"
            ),
            verdict: if ratio.is_finite() {
                smoke_mark(results, pass(ok))
            } else {
                "cannot tell: no run with one process each".into()
            },
        });
    }
    if let Some(f) = &results.forwarding {
        let complete = f.verified == f.files && f.stored == f.files && f.raw_stored == f.files;
        rows.push(Row {
            figure: format!(
                "prodsys: {} catalogued files of {} bytes forwarded by the catalog to a real XRootD server, the forwarding planned → every replica verified on the storage ({} copy slots, {} files a slot)",
                thousands(f.files as f64),
                thousands(f.file_bytes as f64),
                f.max_concurrent_copies,
                f.claim_batch
            ),
            measured: format!(
                "{:.1} s ({} files/s), the median of {} runs ({}); {} replicas verified, {} files on the storage, each run",
                f.prodsys_seconds,
                thousands(f.prodsys_per_s()),
                f.prodsys_runs.len(),
                seconds_list(&f.prodsys_runs),
                thousands(f.verified as f64),
                thousands(f.stored as f64)
            ),
            raw: format!(
                "`xrdcp --parallel {} --cksum adler32` of {} files of a directory an invocation, {} at once, same files, same server: {:.1} s ({} files/s), the median of {} runs, one before the services started and one after each prodsys run ({})",
                f.raw_parallel,
                f.raw_batch,
                f.raw_concurrency,
                f.raw_seconds,
                thousands(f.raw_per_s()),
                f.raw_runs.len(),
                seconds_list(&f.raw_runs)
            ),
            ratio: format!(
                "{:.2}× (the median of each run against the raw runs just before and after it: {})",
                f.ratio(),
                f.round_ratios()
                    .iter()
                    .map(|r| format!("{r:.2}×"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            target: "≥ 0.8 × raw xrdcp, 10,000 small files (issue 12)".into(),
            verdict: if !complete {
                smoke_mark(results, "miss")
            } else if f.files < 10_000 {
                format!(
                    "n/a: {} files, the target is for 10,000 ({} at this size)",
                    thousands(f.files as f64),
                    pass(f.ratio() >= 0.8)
                )
            } else {
                smoke_mark(results, pass(f.ratio() >= 0.8))
            },
        });
    }
    if let Some(r) = &results.rucio {
        let complete = r.listed == r.files && r.raw_listed == r.files;
        rows.push(Row {
            figure: format!(
                "prodsys: {} catalogued files registered by the catalog in a real Rucio server (replica with PFN, bytes, adler32 and metadata on an RSE, attached to the production's dataset), the forwarding planned → every replica registered",
                thousands(r.files as f64)
            ),
            measured: format!(
                "{:.1} s ({} replicas/s); Rucio lists {} files in the dataset",
                r.prodsys_seconds,
                thousands(r.prodsys_per_s()),
                thousands(r.listed as f64)
            ),
            raw: format!(
                "bulk REST on the same server and RSE: `POST /replicas` and `POST /dids/attachments` of {} replicas each, {} calls at once: {:.1} s ({} replicas/s)",
                r.batch,
                r.raw_clients,
                r.raw_seconds,
                thousands(r.raw_per_s())
            ),
            ratio: format!("{:.2}×", r.ratio()),
            target: "≥ 0.9 × raw bulk REST registration (issue 12)".into(),
            verdict: if !complete {
                smoke_mark(results, "miss")
            } else {
                smoke_mark(results, pass(r.ratio() >= 0.9))
            },
        });
    }
    // Memory, per service: each runs in a process of its own.
    for service in ORDER.map(|s| s.name()) {
        let idle = results.service_rss_idle.get(service).copied();
        let loaded = results.loaded_rss(service);
        if idle.is_none() && loaded.is_none() {
            continue;
        }
        let mut measured = Vec::new();
        let mut verdicts = Vec::new();
        if let Some(idle) = idle {
            measured.push(format!("idle {:.1} MiB", mib(idle)));
            verdicts.push(format!("idle {}", pass(idle <= IDLE_RSS_MIB * MIB)));
        }
        if let Some((rss, phase)) = loaded {
            let kind = results
                .phases()
                .iter()
                .find(|(p, _)| *p == phase)
                .map_or("", |(_, l)| if l.hwm { "peak " } else { "sampled " });
            measured.push(format!(
                "under load {kind}{:.1} MiB (during {phase})",
                mib(rss)
            ));
            verdicts.push(format!(
                "under load {}",
                smoke_mark(results, pass(rss <= LOADED_RSS_MIB * MIB))
            ));
        }
        rows.push(Row {
            figure: format!(
                "prodsys: RSS of the {service} service, in its own process (idle, and largest under load)"
            ),
            measured: measured.join("; "),
            raw: "—".into(),
            ratio: "—".into(),
            target: format!(
                "each service ≤ {IDLE_RSS_MIB} MiB idle, ≤ {LOADED_RSS_MIB} MiB under load"
            ),
            verdict: verdicts.join("; "),
        });
    }
    rows
}

/// The status measurement with watchers, beside the same without them.
fn watched_row(results: &Results, s: &crate::stack::StatusResult, rows: &mut Vec<Row>) {
    let Some(w) = &s.watchers else { return };
    let before = results
        .status
        .as_ref()
        .map_or(f64::NAN, |p| p.transitions_per_s);
    let after = results.status_again.as_ref().map(|p| p.transitions_per_s);
    let plain = after.map_or(before, |after| (before + after) / 2.0);
    let r = s.transitions_per_s / plain;
    // The lag is judged where the service keeps up (the paced run); the
    // lag here is mostly the queue every message waits in.
    let paced = results.watched_paced.as_ref().and_then(|p| {
        let pw = p.watchers.as_ref()?;
        Some((p, pw))
    });
    let lag_p99 = paced.map_or(w.lag_p99_ms, |(_, pw)| pw.lag_p99_ms);
    let clean = |w: &crate::watchers::WatcherStats| w.errors == 0 && w.complete == w.grpc + w.sse;
    let ok = r >= 0.9 && lag_p99 <= 1000.0 && clean(w) && paced.is_none_or(|(_, pw)| clean(pw));
    let full = w.grpc >= 1000 && w.sse >= 100;
    rows.push(Row {
        figure: format!(
            "prodsys: job transitions into status ({} as above) with {} WatchProduction streams and {} dashboard SSE clients following the production; lag from a job.status message handed to the broker to a watcher seeing its effect",
            thousands(s.transitions as f64),
            thousands(w.grpc as f64),
            w.sse
        ),
        measured: format!(
            "{} transitions/s; {}; {} updates received; {} watch errors{}",
            thousands(s.transitions_per_s),
            watcher_lags(w),
            thousands(w.updates as f64),
            w.errors,
            w.first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        ),
        raw: match after {
            Some(after) => format!(
                "the same measurement without watchers, same run, before and after it: {} and {} transitions/s (mean {})",
                thousands(before),
                thousands(after),
                thousands(plain)
            ),
            None => format!(
                "the same measurement without watchers, same run: {} transitions/s",
                thousands(plain)
            ),
        },
        ratio: ratio(s.transitions_per_s, plain),
        target: if paced.is_some() {
            "≥ 0.9 × without watchers, lag p99 ≤ 1 s (the paced run, next row), 1,000 streams and 100 SSE clients (issue 17)".into()
        } else {
            "≥ 0.9 × without watchers, lag p99 ≤ 1 s, 1,000 streams and 100 SSE clients (issue 17)".into()
        },
        verdict: if !plain.is_finite() {
            "cannot tell: the measurement without watchers did not run".into()
        } else if full {
            smoke_mark(results, pass(ok))
        } else {
            format!(
                "n/a: {} streams and {} SSE clients, the target is for 1,000 and 100 ({} at this size)",
                w.grpc,
                w.sse,
                pass(ok)
            )
        },
    });
    if let Some((p, pw)) = paced {
        rows.push(Row {
            figure: format!(
                "prodsys: the same with job.status messages paced at {} transitions/s (half the rate without watchers, so no queue builds); lag from a message handed to the broker to a watcher seeing its effect",
                thousands(p.offered_per_s.unwrap_or(f64::NAN))
            ),
            measured: format!(
                "{}; {} updates; {} snapshot reads; {} watch errors",
                watcher_lags(pw),
                thousands(pw.updates as f64),
                thousands(pw.snapshot_reads),
                pw.errors
            ),
            raw: format!(
                "absorbed at {} transitions/s (offered {})",
                thousands(p.transitions_per_s),
                thousands(p.offered_per_s.unwrap_or(f64::NAN))
            ),
            ratio: "—".into(),
            target: "lag p99 ≤ 1 s with 1,000 streams and 100 SSE clients (issue 17)".into(),
            verdict: if full {
                smoke_mark(results, pass(pw.lag_p99_ms <= 1000.0 && clean(pw)))
            } else {
                format!(
                    "n/a: {} streams and {} SSE clients, the target is for 1,000 and 100 ({} at this size)",
                    pw.grpc,
                    pw.sse,
                    pass(pw.lag_p99_ms <= 1000.0 && clean(pw))
                )
            },
        });
    }
}

/// The watchers' lags and how many saw the end, as both watched rows say it.
fn watcher_lags(w: &crate::watchers::WatcherStats) -> String {
    format!(
        "lag p50 {}, p99 {} (WatchProduction {}, SSE {}), max {}; {} of {} watchers saw every job DONE",
        ms(w.lag_p50_ms),
        ms(w.lag_p99_ms),
        ms(w.grpc_p99_ms),
        ms(w.sse_p99_ms),
        ms(w.lag_max_ms),
        thousands(w.complete as f64),
        thousands((w.grpc + w.sse) as f64)
    )
}

/// Seconds of runs in order: "6.1, 5.9 and 6.4 s".
fn seconds_list(runs: &[f64]) -> String {
    let each: Vec<String> = runs.iter().map(|s| format!("{s:.1}")).collect();
    match each.split_last() {
        None => String::new(),
        Some((last, [])) => format!("{last} s"),
        Some((last, rest)) => format!("{} and {last} s", rest.join(", ")),
    }
}

/// The rows of the catalog with a history (issue 10): its first pages, its
/// stream, and submit beside the empty catalog.
fn history_rows(results: &Results, h: &crate::history::HistoryResult, rows: &mut Vec<Row>) {
    let full = h.files >= 10_000_000 && h.productions >= 100_000;
    let sized = |verdict: &str| {
        if full {
            smoke_mark(results, verdict)
        } else {
            format!(
                "n/a: {} files, the target is for 10,000,000",
                thousands(h.files as f64)
            )
        }
    };
    let single = results.db.as_ref().map(|d| d.single_p99_ms);
    if let Some(f) = &h.find {
        rows.push(Row {
            figure: format!(
                "prodsys: FindFiles first page with {} files of {} productions in the catalog, three typed conditions one a range (`{}` and the like, {} queries one after the other)",
                thousands(h.files as f64),
                thousands(h.productions as f64),
                f.example,
                f.queries
            ),
            measured: format!(
                "p50 {}, p99 {} (max {}); {} files a page, asked by class as prodctl asks (each file's whole metadata: p50 {}, p99 {})",
                ms(f.p50_ms),
                ms(f.p99_ms),
                ms(f.max_ms),
                thousands(f.page_size as f64),
                ms(f.whole_p50_ms),
                ms(f.whole_p99_ms)
            ),
            raw: single.map_or("—".into(), |p| format!("single-row commit p99 {}", ms(p))),
            ratio: single.map_or("—".into(), |p| {
                format!("p99 = {}", ratio(f.p99_ms, p))
            }),
            target: "p99 ≤ 20 ms with 10,000,000 files (issue 10)".into(),
            verdict: sized(pass(f.p99_ms <= 20.0)),
        });
    }
    if let Some(s) = &h.stream {
        let batch = results.db.as_ref().map_or(f64::NAN, |d| d.batch_rows_per_s);
        rows.push(Row {
            figure: format!(
                "prodsys: StreamFiles, the whole answer of `{}` ({} files in {} pages)",
                s.query,
                thousands(s.files as f64),
                thousands(s.pages as f64)
            ),
            measured: format!(
                "{} files/s ({:.1} s; first page after {})",
                thousands(s.files_per_s),
                s.seconds,
                ms(s.first_ms)
            ),
            raw: format!("batched INSERT {} rows/s", thousands(batch)),
            ratio: ratio(s.files_per_s, batch),
            target: "≥ 200,000 files/s with 10,000,000 files (issue 10)".into(),
            verdict: sized(pass(s.files_per_s >= 200_000.0)),
        });
    }
    if let (Some(empty), Some(history), Some(r)) = (&h.empty, &h.history, h.submit_ratio()) {
        rows.push(Row {
            figure: format!(
                "prodsys: SubmitRequest → verdict with {} files and {} productions present, one request in ten a duplicate or an overlap ({} clients, {} s), beside the empty catalog in the same run",
                thousands(h.files as f64),
                thousands(h.productions as f64),
                history.clients,
                history.seconds
            ),
            measured: format!(
                "{} req/s decided ({} accepted, {} rejected); empty catalog {} req/s",
                thousands(history.decided_per_s()),
                thousands(history.accepted_in_window as f64),
                thousands(history.rejected as f64),
                thousands(empty.decided_per_s())
            ),
            raw: "the same on the empty catalog".into(),
            ratio: format!("{r:.2}×"),
            target: "≥ 0.8 × the empty catalog's rate (issue 10)".into(),
            verdict: sized(pass(r >= 0.8)),
        });
    }
}

/// The table for the terminal.
pub fn text(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "prodsys-bench{} — {} — {} CPUs ({}), {:.1} GiB; PostgreSQL {}; RabbitMQ {}",
        if results.smoke { " (smoke)" } else { "" },
        results.started,
        results.machine.cpus,
        results.machine.cpu_model,
        results.machine.memory_gib,
        results.machine.postgres,
        results.machine.rabbitmq
    );
    for row in rows(results) {
        let _ = writeln!(out, "\n  {}", row.figure);
        let _ = writeln!(out, "      measured : {}", row.measured);
        if row.raw != "—" {
            let _ = writeln!(out, "      raw limit: {}   ratio {}", row.raw, row.ratio);
        }
        if row.target != "—" {
            let _ = writeln!(out, "      target   : {}   → {}", row.target, row.verdict);
        }
    }
    if !results.sweep.is_empty() {
        let _ = writeln!(
            out,
            "\n  submit → ACCEPTED by requests in flight (short closed-loop runs):"
        );
        for r in &results.sweep {
            let _ = writeln!(
                out,
                "      {:>5} in flight: {} req/s, p50 {}, p99 {}",
                r.clients,
                thousands(r.accepted_per_s),
                ms(r.accept_p50_ms),
                ms(r.accept_p99_ms)
            );
        }
    }
    let _ = writeln!(
        out,
        "\n  where the CPU went (cores, of {}):",
        results.machine.cpus
    );
    for (phase, load) in results.phases() {
        let _ = writeln!(out, "      {phase:<8} {}", load.cpu);
        let _ = writeln!(
            out,
            "               PostgreSQL by service: {}",
            pg_split(load)
        );
        let _ = writeln!(out, "               max ready messages: {}", depths(load));
        let _ = writeln!(out, "               largest RSS: {}", largest_rss(load));
    }
    for line in findings(results) {
        let _ = writeln!(out, "\n  - {line}");
    }
    let _ = writeln!(out, "\n  run took {:.1} s", results.wall_seconds);
    for error in &results.errors {
        let _ = writeln!(out, "  FAILED: {error}");
    }
    out
}

/// Largest RSS of each process in one measurement.
fn largest_rss(load: &PhaseLoad) -> String {
    format!(
        "{}; bench clients {:.1} MiB",
        rss_list(&load.max_rss),
        mib(load.bench_max_rss)
    )
}

fn depths(load: &PhaseLoad) -> String {
    let parts: Vec<String> = load
        .max_depth
        .iter()
        .map(|(service, n)| format!("{service} {}", thousands(f64::from(*n))))
        .collect();
    if parts.is_empty() {
        "—".into()
    } else {
        parts.join(", ")
    }
}

/// PostgreSQL CPU by the service its backends served, largest first.
fn pg_split(load: &PhaseLoad) -> String {
    let mut parts: Vec<(&String, &f64)> =
        load.pg_cpu.iter().filter(|(_, c)| **c >= 0.005).collect();
    parts.sort_by(|a, b| b.1.total_cmp(a.1));
    if parts.is_empty() {
        return "—".into();
    }
    parts
        .iter()
        .map(|(service, cores)| format!("{service} {cores:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn stage_text(stages: &crate::stack::Stages) -> String {
    format!(
        "until request.received was published (SubmitRequest, intake's commit, its outbox relay) p50 {} / p99 {}; from there until request.accepted was published (the checker's consume, commit, relay) p50 {} / p99 {}",
        ms(stages.intake_p50_ms),
        ms(stages.intake_p99_ms),
        ms(stages.checker_p50_ms),
        ms(stages.checker_p99_ms)
    )
}

fn deepest(load: &PhaseLoad) -> Option<(&str, u32)> {
    load.max_depth
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(s, n)| (s.as_str(), *n))
}

/// CPU milliseconds per item, in each place.
fn cost(cpu: &sys::CpuUse, seconds: f64, items: f64, per: f64) -> String {
    let each = |cores: f64| cores * seconds * 1000.0 / items * per;
    let services: Vec<String> = cpu
        .services
        .iter()
        .map(|(service, cores)| format!("{service} {:.2}", each(*cores)))
        .collect();
    format!(
        "the five service processes {:.2} ms ({}), bench clients {:.2} ms, PostgreSQL {:.2} ms, RabbitMQ {:.2} ms",
        each(cpu.services_total()),
        services.join(", "),
        each(cpu.bench),
        each(cpu.postgres),
        each(cpu.rabbitmq)
    )
}

/// One line of the table of submit runs by requests in flight.
fn sweep_row(r: &crate::stack::SubmitResult) -> String {
    let accepted = r.accepted_in_window.max(1) as f64;
    let each = |cores: f64| cores * r.seconds * 1000.0 / accepted;
    let c = &r.load.cpu;
    format!(
        "| {} | {:.0} | {} | {} | {} | {} / {} | {} / {} | {:.2} | {:.2} ms (services {:.2}, bench clients {:.2}, PostgreSQL {:.2}, RabbitMQ {:.2}) | {:.1} |",
        r.clients,
        r.seconds,
        thousands(r.accepted_per_s),
        ms(r.accept_p50_ms),
        ms(r.accept_p99_ms),
        ms(r.stages.intake_p50_ms),
        ms(r.stages.intake_p99_ms),
        ms(r.stages.checker_p50_ms),
        ms(r.stages.checker_p99_ms),
        c.machine,
        each(c.services_total() + c.bench + c.postgres + c.rabbitmq),
        each(c.services_total()),
        each(c.bench),
        each(c.postgres),
        each(c.rabbitmq),
        r.load.commits as f64 / accepted
    )
}

/// Who set the pace of an event consumer's measurement.
fn pace(service: &str, published: f64, absorbed: f64, load: &PhaseLoad, cpus: f64) -> String {
    let backend = load.pg_cpu.get(service).copied().unwrap_or(0.0);
    let ready = load.max_depth.get(service).copied().unwrap_or(0);
    format!(
        "{}, in short: the broker had confirmed every message after {:.2} s, {:.0}× sooner than the {service} service absorbed them ({:.2} s); its queue held up to {} ready messages; the database backend(s) serving {service} used {:.2} cores while the machine was {:.0} % busy.{}",
        capitalised(service),
        published,
        absorbed / published.max(1e-6),
        absorbed,
        thousands(f64::from(ready)),
        backend,
        100.0 * load.cpu.machine / cpus,
        if absorbed > 2.0 * published {
            format!(" The {service} consumer, not the broker, set the pace.")
        } else {
            String::new()
        }
    )
}

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// What the measurements show, in sentences that state only measured facts.
pub fn findings(results: &Results) -> Vec<String> {
    let cpus = results.machine.cpus as f64;
    let mut out = Vec::new();
    if let Some(b) = &results.broker {
        out.push(format!(
            "RabbitMQ round trip: {} messages in {:.1} s; publishing alone was confirmed at {} msgs/s. CPU: {}.",
            thousands(b.messages as f64),
            b.seconds,
            thousands(b.publish_confirmed_per_s),
            b.cpu
        ));
    }
    if let Some(d) = &results.db {
        out.push(format!(
            "PostgreSQL ({}): single-row commits used {}; batched inserts used {}.",
            d.settings, d.single_cpu, d.batch_cpu
        ));
    }
    if let Some(s) = &results.submit {
        let mut line = format!(
            "Submit → ACCEPTED: {} accepted in {:.0} s ({} submitted, {} rejected, {} failed); accepted/s by tenth of the run: {}. SubmitRequest itself answered in p50 {} / p99 {}; ACCEPTED came p50 {} / p99 {} after the call began. The machine was {:.2} of {:.0} cores busy ({}). CPU per accepted request: {}.",
            thousands(s.accepted_in_window as f64),
            s.seconds,
            thousands(s.submitted as f64),
            s.rejected,
            s.failed,
            s.slices
                .iter()
                .map(|v| thousands(*v))
                .collect::<Vec<_>>()
                .join(" "),
            ms(s.grpc_p50_ms),
            ms(s.grpc_p99_ms),
            ms(s.accept_p50_ms),
            ms(s.accept_p99_ms),
            s.load.cpu.machine,
            cpus,
            s.load.cpu,
            cost(
                &s.load.cpu,
                s.seconds,
                s.accepted_in_window.max(1) as f64,
                1.0
            ),
        );
        let split = if s.stages.intake_p50_ms.is_finite() {
            stage_text(&s.stages)
        } else {
            "not split into stages: this run listened only for the verdicts, as a client does (each short run's split is in the table by requests in flight, beside the run it was measured in)".into()
        };
        let _ = write!(
            line,
            " Time to ACCEPTED: {split}. PostgreSQL CPU by the service it served (cores): {}. Transactions committed in the run's database: {} ({:.1} per accepted request).",
            pg_split(&s.load),
            thousands(s.load.commits as f64),
            s.load.commits as f64 / s.accepted_in_window.max(1) as f64
        );
        if let Some((service, n)) = deepest(&s.load) {
            let _ = write!(
                line,
                " Deepest service queue: {service} ({} ready at most; all: {}).",
                thousands(f64::from(n)),
                depths(&s.load)
            );
        }
        out.push(line);
    }
    if let (Some(s), Some(d)) = (&results.submit, &results.db) {
        let per_request = s.load.commits as f64 / s.accepted_in_window.max(1) as f64;
        out.push(format!(
            "Submit, which limit bounds which stage: intake group-commits concurrent SubmitRequests and the checker decides a delivery batch per transaction, so each request is a row in a shared transaction, not a commit of its own. Their transactions are bounded by the single-row commit rate ({} commits/s; at the {per_request:.1} transactions per accepted request of this run, across the five services, that is a ceiling of {} req/s, {} of it reached); their rows by the batched insert rate ({} rows/s, {} of it reached at one row per request). The lower of the two, the {}, is the one that binds at this batching ({} requests in flight make the groups). The cores were {:.0} % busy.",
            thousands(d.single_per_s),
            thousands(d.single_per_s / per_request),
            ratio(s.accepted_per_s, d.single_per_s / per_request),
            thousands(d.batch_rows_per_s),
            ratio(s.accepted_per_s, d.batch_rows_per_s),
            if d.single_per_s / per_request <= d.batch_rows_per_s {
                "commit ceiling"
            } else {
                "batched-insert ceiling"
            },
            s.clients,
            100.0 * s.load.cpu.machine / cpus
        ));
    }
    if let Some(l) = &results.latency {
        out.push(format!(
            "Latency: {} requests at {:.0}/s offered, {} without a verdict within 60 s; p50 {}, p90 {}, p99 {}, max {}; {}. The machine was {:.2} of {:.0} cores busy ({}); PostgreSQL CPU by service (cores): {}. Max ready messages: {}.",
            thousands(l.samples as f64),
            l.offered_per_s,
            l.failed,
            ms(l.p50_ms),
            ms(l.p90_ms),
            ms(l.p99_ms),
            ms(l.max_ms),
            stage_text(&l.stages),
            l.load.cpu.machine,
            cpus,
            l.load.cpu,
            pg_split(&l.load),
            depths(&l.load)
        ));
    }
    if let Some(s) = &results.status {
        out.push(pace("status", s.publish_seconds, s.seconds, &s.load, cpus));
        out.push(format!(
            "Status: {} job.status messages ({} transitions) were all confirmed by the broker after {:.2} s; the status service's counts showed every job DONE after {:.2} s. The machine was {:.2} of {:.0} cores busy ({}); PostgreSQL CPU by service (cores): {}. CPU per 1,000 transitions: {}. Max ready messages: {}.",
            thousands(s.messages as f64),
            thousands(s.transitions as f64),
            s.publish_seconds,
            s.seconds,
            s.load.cpu.machine,
            cpus,
            s.load.cpu,
            pg_split(&s.load),
            cost(&s.load.cpu, s.seconds, s.transitions as f64, 1000.0),
            depths(&s.load)
        ));
    }
    if let Some(c) = &results.catalog {
        out.push(pace("catalog", c.publish_seconds, c.seconds, &c.load, cpus));
        out.push(format!(
            "Catalog: {} job.output messages ({} files) were all confirmed by the broker after {:.2} s; catalog.files held every file after {:.2} s. The machine was {:.2} of {:.0} cores busy ({}); PostgreSQL CPU by service (cores): {}. CPU per 1,000 files: {}. Max ready messages: {}.",
            thousands(c.messages as f64),
            thousands(c.files as f64),
            c.publish_seconds,
            c.seconds,
            c.load.cpu.machine,
            cpus,
            c.load.cpu,
            pg_split(&c.load),
            cost(&c.load.cpu, c.seconds, c.files as f64, 1000.0),
            depths(&c.load)
        ));
    }
    if let (Some(plain), Some(watched)) = (&results.status, &results.watched)
        && let Some(w) = &watched.watchers
    {
        let pg = |l: &PhaseLoad| l.pg_cpu.get("status").copied().unwrap_or(0.0);
        out.push(format!(
            "Watchers: with {} WatchProduction streams and {} SSE clients the status process used {:.2} cores (without: {:.2}) and the PostgreSQL backends serving status {:.2} (without: {:.2}); the watchers received {} updates in all ({:.1} each), for which the status service read {} snapshots (one reader per followed production and one for the dashboards' stream, however many follow: `prodsys_status_snapshot_reads_total`).",
            thousands(w.grpc as f64),
            w.sse,
            watched.load.cpu.service("status"),
            plain.load.cpu.service("status"),
            pg(&watched.load),
            pg(&plain.load),
            thousands(w.updates as f64),
            w.updates as f64 / (w.grpc + w.sse).max(1) as f64,
            thousands(w.snapshot_reads)
        ));
    }
    if let Some(c) = &results.containers {
        let each = |cores: f64, seconds: f64| cores * seconds * 1000.0 / c.jobs as f64;
        let (p, r) = (&c.prodsys_cpu, &c.raw_cpu);
        out.push(format!(
            "Containers: CPU per job through prodsys: the service processes {:.1} ms, PostgreSQL {:.1} ms, RabbitMQ {:.1} ms, the rest of the machine (podman, the containers, each job's supervisor) {:.1} ms, {:.1} ms in all (the machine: {}); by `podman run` alone: the rest of the machine {:.1} ms, {:.1} ms in all (the machine: {}).",
            each(p.services_total(), c.prodsys_seconds),
            each(p.postgres, c.prodsys_seconds),
            each(p.rabbitmq, c.prodsys_seconds),
            each(p.other, c.prodsys_seconds),
            each(p.machine - p.steal, c.prodsys_seconds),
            p,
            each(r.other + r.bench, c.raw_seconds),
            each(r.machine - r.steal, c.raw_seconds),
            r
        ));
    }
    if let Some(p) = &results.productions {
        let c = &p.prodsys_cpu;
        let each = |cores: f64| cores * p.prodsys_seconds * 1000.0 / p.jobs as f64;
        out.push(format!(
            "Whole productions: intake answered all {} SubmitRequests within {:.1} s; every production was finished {:.1} s after the first. CPU per job besides the job itself: the service processes {:.1} ms, PostgreSQL {:.1} ms, RabbitMQ {:.1} ms (the machine: {}; the jobs' own CPU shows as \"other\"); the plain spawner's machine: {}. The dispatcher's scheduler took a round at least every {} ms (its poll interval; `--poll-interval-ms` sets it) for {} local slots.",
            thousands(p.productions as f64),
            p.submit_seconds,
            p.prodsys_seconds,
            each(c.services_total()),
            each(c.postgres),
            each(c.rabbitmq),
            c,
            p.raw_cpu,
            p.poll_interval_ms,
            p.concurrency
        ));
    }
    if let (Some(one), Some(two)) = (&results.productions, &results.replicated) {
        let per_job = |r: &crate::productions::ProductionsResult, cores: f64| {
            cores * r.prodsys_seconds * 1000.0 / r.jobs as f64
        };
        let by_service = |r: &crate::productions::ProductionsResult| {
            r.prodsys_cpu
                .services
                .iter()
                .map(|(s, c)| format!("{s} {:.2}", per_job(r, *c)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push(format!(
            "Replicas: CPU per job with two processes of every service: the service processes {:.2} ms ({}), PostgreSQL {:.2} ms, RabbitMQ {:.2} ms, the jobs and the rest {:.2} ms (the machine: {}); with one of each: {:.2} ms ({}), PostgreSQL {:.2} ms, RabbitMQ {:.2} ms, the jobs and the rest {:.2} ms.",
            per_job(two, two.prodsys_cpu.services_total()),
            by_service(two),
            per_job(two, two.prodsys_cpu.postgres),
            per_job(two, two.prodsys_cpu.rabbitmq),
            per_job(two, two.prodsys_cpu.other),
            two.prodsys_cpu,
            per_job(one, one.prodsys_cpu.services_total()),
            by_service(one),
            per_job(one, one.prodsys_cpu.postgres),
            per_job(one, one.prodsys_cpu.rabbitmq),
            per_job(one, one.prodsys_cpu.other),
        ));
    }
    let mut stolen: Option<(&str, f64)> = None;
    for (phase, steal) in results.phases().into_iter().map(|(p, l)| (p, l.cpu.steal)) {
        if stolen.is_none_or(|(_, s)| steal > s) {
            stolen = Some((phase, steal));
        }
    }
    if let Some((phase, steal)) = stolen
        && steal >= 0.05
    {
        out.push(format!(
            "The hypervisor ran other guests on this machine's CPUs for up to {steal:.2} cores while it wanted them (CPU steal, during {phase}; counted in the machine's busy cores, not in \"other\"): every process measured then had that much less CPU, the raw limits' runs as well when they were taken alike (their own steal is in their CPU lines)."
        ));
    }
    let mut busiest: Option<(&str, f64)> = None;
    let mut raw_other = Vec::new();
    if let Some(b) = &results.broker {
        raw_other.push(("raw RabbitMQ", b.cpu.other));
    }
    if let Some(d) = &results.db {
        raw_other.push(("raw single-row commits", d.single_cpu.other));
        raw_other.push(("raw batched inserts", d.batch_cpu.other));
    }
    for (phase, other) in results
        .phases()
        .into_iter()
        .map(|(p, l)| (p, l.cpu.other))
        .chain(raw_other)
    {
        if busiest.is_none_or(|(_, o)| other > o) {
            busiest = Some((phase, other));
        }
    }
    if let Some((phase, other)) = busiest {
        if other >= 0.25 {
            out.push(format!(
                "Other work on the machine (not the bench, the service processes, this run's PostgreSQL processes or the broker) used up to {other:.2} cores (during {phase}); the measurements it overlapped had that much less CPU than this machine has (see \"other\" above)."
            ));
        } else {
            out.push(format!(
                "Other work on the machine used at most {other:.2} cores during any measurement."
            ));
        }
    }
    if !results.service_rss_idle.is_empty() {
        let mut line = format!(
            "Memory: each service ran in a process of its own (this harness started again for one service). 3 s after all five answered gRPC health they held {}.",
            rss_list(&results.service_rss_idle)
        );
        let loaded: Vec<String> = ORDER
            .iter()
            .filter_map(|s| {
                results
                    .loaded_rss(s.name())
                    .map(|(rss, phase)| format!("{s} {:.1} MiB (during {phase})", mib(rss)))
            })
            .collect();
        if !loaded.is_empty() {
            let _ = write!(
                line,
                " Largest under load (each measurement's VmHWM, reset at its start): {}.",
                loaded.join(", ")
            );
        }
        if !results.service_rss_peak.is_empty() {
            let _ = write!(
                line,
                " Peak of each process over the whole run (VmHWM, the kernel's high-water mark, between samples too): {}.",
                rss_list(&results.service_rss_peak)
            );
        }
        if let (Some(before), Some(idle)) = (results.rss_before_start, results.rss_idle) {
            let _ = write!(
                line,
                " The bench's own process (its gRPC and AMQP clients only) held {:.1} MiB before the services started and {:.1} MiB with them idle",
                mib(before),
                mib(idle)
            );
            match results.bench_loaded_rss() {
                Some((rss, phase)) => {
                    let _ = write!(
                        line,
                        ", at most {:.1} MiB under load (during {phase}).",
                        mib(rss)
                    );
                }
                None => line.push('.'),
            }
            let _ = write!(
                line,
                " Its peak over the whole run (VmHWM, the raw limits included): {:.1} MiB.",
                mib(sys::peak_rss_bytes())
            );
        }
        out.push(line);
    }
    if let Some(h) = &results.history {
        let mut line = format!(
            "Catalog with a history: {} productions and {} files ({:.1} GiB with its indexes) written in {:.0} s, of which {:.0} s building the catalog's secondary indexes again and {:.0} s vacuuming and analysing.",
            thousands(h.productions as f64),
            thousands(h.files as f64),
            h.catalog_bytes as f64 / (1024.0 * MIB as f64),
            h.fill_seconds,
            h.index_seconds,
            h.vacuum_seconds
        );
        if let Some(f) = &h.find {
            let _ = write!(
                line,
                " FindFiles: {} first pages ({} files in all) asked by class, p50 {}, p99 {}, max {}; the same pages with each file's whole metadata p50 {}, p99 {}.",
                f.queries,
                thousands(f.files as f64),
                ms(f.p50_ms),
                ms(f.p99_ms),
                ms(f.max_ms),
                ms(f.whole_p50_ms),
                ms(f.whole_p99_ms)
            );
        }
        if let Some(s) = &h.stream {
            let _ = write!(
                line,
                " StreamFiles: {} files in {} pages in {:.1} s; the machine was {:.2} of {} cores busy ({}); PostgreSQL CPU by service (cores): {}.",
                thousands(s.files as f64),
                s.pages,
                s.seconds,
                s.load.cpu.machine,
                results.machine.cpus,
                s.load.cpu,
                pg_split(&s.load)
            );
        }
        for (name, r) in [
            ("empty catalog", &h.empty),
            ("with the history", &h.history),
        ] {
            if let Some(r) = r {
                let _ = write!(
                    line,
                    " Submit, {name}: {} decided in {} s ({} accepted, {} rejected, {} failed); accepted/s by tenth: {}; CPU per decided request: {}.",
                    thousands(r.decided_in_window as f64),
                    r.seconds,
                    thousands(r.accepted_in_window as f64),
                    thousands(r.rejected as f64),
                    r.failed,
                    r.slices
                        .iter()
                        .map(|v| thousands(*v))
                        .collect::<Vec<_>>()
                        .join(" "),
                    cost(&r.load.cpu, r.seconds, r.decided_in_window as f64, 1.0)
                );
            }
        }
        out.push(line);
    }
    if let Some(c) = &results.cancel {
        out.push(format!(
            "Cancel: the production of {} jobs was CANCELLED with every job counted cancelled {:.1} s after CancelProduction was sent; {} of its jobs were left not CANCELLED in the dispatcher. The machine was {:.2} of {} cores busy ({}); PostgreSQL CPU by service (cores): {}.",
            thousands(c.jobs as f64),
            c.seconds,
            c.unfinished,
            c.load.cpu.machine,
            results.machine.cpus,
            c.load.cpu,
            pg_split(&c.load)
        ));
    }
    out
}

/// BENCHMARKS.md.
pub fn markdown(results: &Results) -> String {
    let m = &results.machine;
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `{}` on {} ({:.0} s). Rerun it to refresh this file; every figure below comes from that one run on the machine described here.\n",
        command_line(results),
        results.started,
        results.wall_seconds
    );
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(
        out,
        "- {} CPUs (`nproc`), {}; {:.1} GiB memory; Linux {}",
        m.cpus, m.cpu_model, m.memory_gib, m.kernel
    );
    let _ = writeln!(out, "- PostgreSQL {} ({})", m.postgres, m.postgres_settings);
    let _ = writeln!(out, "- RabbitMQ {}", m.rabbitmq);
    let _ = writeln!(
        out,
        "- Broker, database, the five service processes and the bench's own process (its clients) share these CPUs; anything else running at the time shows as \"other\" below.\n"
    );
    let _ = writeln!(out, "## How it measures\n");
    if let Some(p) = &results.raw_plan {
        let _ = writeln!(
            out,
            "- **Raw limits**, on a database and AMQP prefix of their own, before prodsys starts. RabbitMQ: lapin, one durable quorum queue, persistent mandatory messages the size of a `request.received` for the shipped CTA example with its CloudEvents headers, published for {} s with up to {} unconfirmed, consumed on another connection with prefetch {} and one multiple-ack per batch of what has arrived (≤ 128, as the prodsys consumer does); the rate is messages / (first publish → last ack). PostgreSQL: tokio-postgres, a table like the outbox (bigserial key, unique uuid, bytea payload of the same size); BEGIN / INSERT one row / COMMIT in a loop on {} connections for {} s; then INSERT … SELECT FROM unnest of {} rows per statement on one connection for {} s. A CHECKPOINT follows, so their WAL is written out before prodsys is measured.",
            p.duration.as_secs(),
            p.publish_window,
            p.prefetch,
            p.connections,
            p.duration.as_secs(),
            p.batch_rows,
            p.duration.as_secs()
        );
    }
    if let Some(p) = &results.stack_plan {
        let _ = writeln!(
            out,
            "- **prodsys**: each of the five services in a process of its own (the bench binary started again for one service: `prodsys::start` of that service, as `prodsys serve <service>` runs it, stopped with SIGTERM), started in the order `prodsys::start` uses, each once the one before answered gRPC health, on a fresh database and prefix (`TestEnv`), settings as the tests use them (database pool {} per service, prefetch {}, batch {}) handed to every process in one settings file, gRPC on free ports, intake and checker pointed at the checker's and catalog's. Requests are the shipped CTA example with a unique `array_layout` and a fractional `zenith_deg`, so none duplicates or overlaps another; each plans one job on the local backend, whose single slot holds a job that only sleeps, so no job competes for the CPUs. ACCEPTED is seen on the bench's own exclusive queue bound to `request.accepted` and `request.rejected` on `prodsys.events`.",
            results.pool_size, results.prefetch, results.batch_size
        );
        let _ = writeln!(
            out,
            "- **Submit → ACCEPTED**: first short runs of {} s at {} requests in flight, then the sustained run: {} client tasks over {} gRPC connections, each submitting and waiting for its ACCEPTED before the next, for {} s; the rate counts ACCEPTED events inside those seconds. The short runs also take `request.received` to split the time into stages; the sustained run takes only the verdicts, as a client would, so the broker carries nothing for the bench's instruments. **Latency**: open loop at {} req/s for {} s after {} s of warm-up, timed from each request's scheduled start (so a stall is not hidden) to its ACCEPTED event.",
            p.sweep_duration.as_secs(),
            p.sweep_clients
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            p.submit_clients,
            4,
            p.submit_duration.as_secs(),
            p.latency_rate,
            p.latency_duration.as_secs(),
            p.latency_warmup.as_secs()
        );
        let _ = writeln!(
            out,
            "- **Watchers**: the status measurement again on a production of its own, with {} `WatchProduction` streams ({} per HTTP/2 connection) and {} dashboard clients of `GET /api/events` (a `resync` answered with `GET /api/productions/{{id}}`, as the dashboard does) opened on it before the first publish; each watcher notes when it sees counts that hold the transitions of message k (and of all before it), and its lag for k is that moment less the moment k was handed to the broker: end to end, so it holds the status consumer's backlog too (the measurement publishes every message at once; the production's `updated_unix_ms` cannot time the watch path alone, as job transitions move its counts without touching it). The ratio is to the same measurement without watchers in the same run.\n- **Status**: a `production.dispatched` of {} jobs, then `job.status` events of {} transitions each (SUBMITTED, then RUNNING, then DONE for every job: {} transitions), published with confirms (≤ 64 outstanding) as prodsys publishes, CloudEvents headers as `envelope.rs` writes them; timed from the first publish until `GetProduction` counts every job DONE. **Catalog**: `job.output` events of {} files each (LFN, size, adler32, URL, ten metadata keys), {} files in all, timed until `catalog.files` holds every one.",
            thousands(p.watchers.0 as f64),
            100,
            p.watchers.1,
            thousands(p.status_jobs as f64),
            p.transitions_per_message,
            thousands(p.status_jobs as f64 * 3.0),
            p.files_per_message,
            thousands(p.catalog_files as f64)
        );
        let _ = writeln!(
            out,
            "- **RSS** is each service process's VmRSS: idle is 3 s after all five answered gRPC health; under load is each process's VmHWM over each measurement (the kernel's high-water mark, between samples too; reset at the measurement's start by writing 5 to `/proc/PID/clear_refs`, or the largest of samples every 250 ms where that is refused, as the figure then says); the peak over the whole run is the largest of those and the VmHWM read as the processes stop. Verdicts on memory read these peaks. **CPU** is per process (user + system time): each service's process, the bench's own (its clients), PostgreSQL's processes for this run, the broker's; the machine's busy cores hold the hypervisor's steal (time its CPUs ran other guests while this one wanted them), shown beside \"other\" where there was any. Queue depths are ready messages in each service's queue, sampled with the same period.\n"
        );
    }
    if let Some(c) = &results.chain {
        let _ = writeln!(
            out,
            "- **Chain**: on the same stack, a CTA simulation production (the shipped example, accepted, its one job holding the local slot) and a DL1 processing production chained after it (`examples/cta-dl1.json`, one job per simulation file); then the parent's `job.output` events as the dispatcher publishes them for DONE jobs ({} files each, each described as a CTA simulation job describes it). Paced: {} events, one every {} ms, each timed from the moment it was handed to the broker until the dispatcher's job total of the chained production (read every 5 ms) holds a job for each of its files and of every event before it. Then {} more files published at once, timed until the chained production has a job for every one. Afterwards every input must have been taken by exactly one job. The catalog registers the same files meanwhile, as it would.\n",
            c.files_per_event,
            c.paced_events,
            c.pace_ms,
            thousands(c.files as f64)
        );
    }
    if let Some(c) = &results.containers {
        let _ = writeln!(
            out,
            "- **Containers**: the KM3NeT example's image (`{}`, built here by `deploy/local/build-images`) run by podman (runc): {} jobs of one event each, on a database and prefix of their own with the five services in their own processes and {} local slots with a queue of {} (`max_queued_jobs`: jobs waiting for a slot, each started the moment one frees, as the raw run starts its next; the dispatcher's poll interval is the tests' 200 ms), timed from SubmitRequest to COMPLETED (checks, planning, each job's supervisor, collecting and checksumming its file); beside it, after one warm-up run, `podman run` of the same command line (the profile's runtime line, the template's image and entrypoint, the job's arguments) {} times, {} at once, on the same machine in the same run.",
            c.image,
            thousands(c.jobs as f64),
            c.concurrency,
            c.queued,
            thousands(c.jobs as f64),
            c.concurrency
        );
    }
    if let Some(p) = &results.productions {
        let _ = writeln!(
            out,
            "- **Whole productions**: on a database and prefix of their own with the five services in their own processes, {} CTA requests (the shipped example, one shower per job, one NSB level: one file per job; an array layout of its own each, so none duplicates another) sent over gRPC {} at a time, {} jobs each, run by the real `prodsys-toysim` on the local executor with {} slots and a queue of {} (`max_queued_jobs`: jobs waiting for a slot, each started the moment one frees, as a batch system's queue; dispatcher poll interval {} ms; the tests set 200), timed from the first SubmitRequest until every production is COMPLETED and finished (the catalog announced every output catalogued); then every catalogued file is read again and its size and adler32 compared with the catalog's. The raw limit: after the services stopped, the same commands (each job's command line and environment rendered from the profile with the parameters, run number and seed the dispatcher stored for it) run by a plain spawner in Rust, {} at once, each in a directory of its own.{}{}",
            thousands(p.productions as f64),
            16,
            p.jobs / p.productions.max(1),
            p.concurrency,
            p.queued,
            p.poll_interval_ms,
            p.concurrency,
            if p.xrootd.is_some() {
                " With `--xrootd` every request also names an XRootD destination (a real server started by `tests/servers/xrootd/start`): a production is finished once its outputs are there with the storage's own adler32 equal to the catalog's, and the raw spawner copies each job's outputs there with `xrdcp -f` in the job's slot."
            } else {
                ""
            },
            if results.replicated.is_some() {
                " **Replicas**: the same productions again on a fresh database and prefix with two processes of every service (ten processes, each on a port of its own, sharing the database, the queues and the dispatcher's work directory; requests alternate between the two intakes), and afterwards the databases counted for work done twice: productions per request beyond one (dispatcher), job attempts beyond the first (no job fails here, so any is a job run twice), outputs catalogued more than once for one job."
            } else {
                ""
            }
        );
    }
    if let Some(f) = &results.forwarding {
        let _ = writeln!(
            out,
            "- **Forwarding** (issue 12): on a database and prefix of their own, {} files of {} bytes written at their LFNs under a work directory, catalogued under one production by `job.output` events (200 files each, CTA metadata) before the production has any destination; then a `request.accepted` naming an `xroot` destination on a real XRootD server (`tests/servers/xrootd/start`, adler32 computed by the server) gives every file a due replica at once, timed from its publication until the catalog holds every replica `verified` (the storage answered the catalog's adler32); {} such runs, each of a production of its own. The server computes 32 checksums at once (`xrootd.chksum max 32`; XRootD's default of 4 has a client that asks more wait 30 s) and the destination's `parallel` is {}. The raw limit: the same files copied to the same server with `xrdcp --force --parallel {} --cksum adler32` (without `--posc`, as the catalog's batches) ({} files of one directory an invocation, {} invocations at once, directories made first in one `xrdfs` session; `--cksum adler32` has each file's adler32 computed here and compared with the one the storage answers) — the copy as the catalog makes it (`claim_batch` files of a directory an `xrdcp`, which has the storage's adler32 of each printed, at most `parallel` transfers to the destination at once), less the catalog — once before the services start and once after each prodsys run (the services idle). Each prodsys run is compared with the mean of the raw runs just before and just after it, and the ratio shown is the median of those, so the machine's drift over the scenario falls on both sides.",
            thousands(f.files as f64),
            thousands(f.file_bytes as f64),
            f.prodsys_runs.len(),
            f.raw_parallel,
            f.raw_parallel,
            f.raw_batch,
            f.raw_concurrency
        );
    }
    if let Some(r) = &results.rucio {
        let _ = writeln!(
            out,
            "- **Rucio** (issue 12): a real Rucio server (`tests/servers/rucio/start`, PyPI rucio 41.5.1, gunicorn with two workers, on the test PostgreSQL) with a scope and a non-deterministic RSE of the run whose `file` protocol is a directory; {} files of 1 KiB written there at their LFNs and catalogued there under one production (the storage destination is that directory: the catalog reads each file's adler32 there and copies nothing, as for a remote job's outputs), then a `request.accepted` naming the `rucio` destination (batch {}, no rule), timed until the catalog holds every replica `registered` (bulk `POST /replicas` with PFN, bytes, adler32 and the catalog's metadata, the dataset made, `POST /dids/attachments`; before each batch the catalog asks `POST /dids/bulkmeta` for files Rucio already knows otherwise). The raw limit, measured first: as many replicas (the same files in a scope of their own, with the same metadata) registered with `POST /replicas` and `POST /dids/attachments` of {} each, {} calls at once, after the dataset is made.",
            thousands(r.files as f64),
            r.batch,
            r.batch,
            r.raw_clients
        );
    }
    if let (Some(p), Some(h)) = (&results.history_plan, &results.history) {
        let _ = writeln!(
            out,
            "- **Catalog with a history** (issue 10), on a stack of its own (fresh database and prefix, the five services started again): first the closed loop of submissions on the empty catalog ({} clients, {} s, new requests as above); then the checker's `productions` and the catalog's `files`, `totals` and `productions` filled with set-based SQL (`INSERT … SELECT` over `unnest` of the productions and `generate_series` of their jobs, two connections, the catalog's secondary indexes dropped and built again from their own definitions, then `VACUUM (ANALYZE)`): {} CTA productions, every combination of site, particle, zenith, pointing, array layout, NSB levels ([1, 5] or [19]), spectral index and campaign, each validated by the profile and stored with the fingerprints the checker gives it, of {} jobs writing one file per NSB level ({} files), each file's LFN and typed metadata (numbers as numbers) as the profile's outputs template and catalog keys give them. Then {} `FindFiles` first pages, one after the other, of three conditions over particle (`=`), NSB level (`=`) and zenith (`<`, `<=`, `>`, `>=`), varied; the whole answer of one query through `StreamFiles`; and the closed loop again, each request a new simulation of an identity the catalog holds files of (another sim_telarray build of a production of the history, so the checker's and the catalog's look-ups find its neighbours), one in ten a production of the history repeated exactly or with an NSB level it has. The rate compared is requests decided (accepted or rejected) per second.\n",
            p.submit_clients,
            p.submit_duration.as_secs(),
            thousands(h.productions as f64),
            h.jobs_per_production,
            thousands(h.files as f64),
            p.find_queries
        );
    }
    let _ = writeln!(out, "## Results\n");
    let _ = writeln!(
        out,
        "| figure | measured | raw limit it depends on | ratio | target (issue 5 unless named) | verdict |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for row in rows(results) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            row.figure, row.measured, row.raw, row.ratio, row.target, row.verdict
        );
    }
    let _ = writeln!(out);
    if !results.sweep.is_empty() {
        let _ = writeln!(out, "### Submit → ACCEPTED by requests in flight\n");
        let _ = writeln!(
            out,
            "Short closed-loop runs before the sustained one, each split into stages by its own `request.received` events. Each stage takes what waits for it in one transaction, so more requests in flight make larger batches: less CPU per request, more throughput, longer waits.\n"
        );
        let _ = writeln!(
            out,
            "| requests in flight | seconds | accepted/s | ACCEPTED p50 | ACCEPTED p99 | until request.received p50 / p99 (intake) | request.received → request.accepted p50 / p99 (checker) | cores busy | CPU per accepted request | transactions per request |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for r in &results.sweep {
            let _ = writeln!(out, "{}", sweep_row(r));
        }
        let _ = writeln!(out);
    }
    if !results.phases().is_empty() {
        let _ = writeln!(out, "### Where the CPU went (cores busy, of {})\n", m.cpus);
        let services = ORDER.map(|s| s.name());
        let _ = writeln!(
            out,
            "| measurement | machine | {} | bench clients | PostgreSQL for this run | PostgreSQL by service served | RabbitMQ (whole broker) | other | most ready messages per service queue | largest RSS per process |",
            services
                .iter()
                .map(|s| format!("{s} process"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(
            out,
            "|---|---|{}---|---|---|---|---|---|---|",
            "---|".repeat(services.len())
        );
        for (phase, load) in results.phases() {
            let c = &load.cpu;
            let per_service: Vec<String> = services
                .iter()
                .map(|s| format!("{:.2}", c.service(s)))
                .collect();
            let _ = writeln!(
                out,
                "| {phase} | {:.2} | {} | {:.2} | {:.2} | {} | {:.2} | {} | {} | {} |",
                c.machine,
                per_service.join(" | "),
                c.bench,
                c.postgres,
                pg_split(load),
                c.rabbitmq,
                other_and_steal(c),
                depths(load),
                largest_rss(load)
            );
        }
        let _ = writeln!(out);
    }
    let _ = write!(out, "{}", crate::scale::section(results));
    let _ = writeln!(out, "## What this run shows\n");
    let _ = writeln!(
        out,
        "What this run's measurements show (no figure here is estimated):\n"
    );
    for line in findings(results) {
        let _ = writeln!(out, "- {line}");
    }
    if !results.errors.is_empty() {
        let _ = writeln!(out, "\n## Failed measurements\n");
        for error in &results.errors {
            let _ = writeln!(out, "- {error}");
        }
    }
    // The history of optimisations is kept by hand beside the harness.
    let _ = write!(out, "\n{}", include_str!("../HISTORY.md"));
    out
}

fn command_line(results: &Results) -> String {
    let args: Vec<&str> = results.command.split_whitespace().skip(1).collect();
    format!(
        "cargo run --release -p prodsys-bench -- {}",
        if args.is_empty() {
            "all".to_string()
        } else {
            args.join(" ")
        }
    )
}

/// The "other" column: other work's cores, and the hypervisor's steal
/// beside it where there was any.
fn other_and_steal(c: &crate::sys::CpuUse) -> String {
    if c.steal >= 0.01 {
        format!("{:.2} (steal {:.2})", c.other, c.steal)
    } else {
        format!("{:.2}", c.other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{PhaseLoad, PlanResult};

    /// Every row of every markdown table has as many cells as its header.
    #[test]
    fn markdown_tables_are_rectangular() {
        let mut load = PhaseLoad {
            hwm: true,
            ..PhaseLoad::default()
        };
        for service in ORDER {
            load.max_rss.insert(service.name().into(), 30 * MIB);
            load.cpu.services.push((service.name().into(), 0.1));
        }
        let results = Results {
            service_rss_idle: ORDER
                .iter()
                .map(|s| (s.name().to_string(), 20 * MIB))
                .collect(),
            rss_before_start: Some(10 * MIB),
            rss_idle: Some(20 * MIB),
            db: Some(crate::raw::DbResult {
                single_per_s: 10_000.0,
                single_p99_ms: 2.0,
                batch_rows_per_s: 150_000.0,
                ..Default::default()
            }),
            plan: Some(PlanResult {
                production_id: "CTA-000001".into(),
                jobs: 1_000_000,
                seconds: 10.0,
                jobs_per_s: 100_000.0,
                rows: 1_000_000,
                load,
            }),
            ..Results::default()
        };
        let mut results = results;
        let whole = crate::productions::ProductionsResult {
            productions: 1000,
            jobs: 10_000,
            concurrency: 4,
            replicas: 1,
            poll_interval_ms: 200,
            prodsys_seconds: 500.0,
            submit_seconds: 5.0,
            files: 10_000,
            files_verified: 10_000,
            raw_seconds: 100.0,
            ..Default::default()
        };
        results.replicated = Some(crate::productions::ProductionsResult {
            replicas: 2,
            prodsys_seconds: 490.0,
            raw_seconds: f64::NAN,
            ..whole.clone()
        });
        results.productions = Some(whole);
        results.status = Some(crate::stack::StatusResult {
            jobs: 200_000,
            transitions: 600_000,
            seconds: 4.0,
            transitions_per_s: 150_000.0,
            ..Default::default()
        });
        results.watched = Some(crate::stack::StatusResult {
            jobs: 200_000,
            transitions: 600_000,
            seconds: 5.0,
            transitions_per_s: 120_000.0,
            watchers: Some(crate::watchers::WatcherStats {
                grpc: 1000,
                sse: 100,
                complete: 1100,
                lag_p99_ms: 500.0,
                ..Default::default()
            }),
            ..Default::default()
        });
        let text = markdown(&results);
        let mut cells = None;
        for line in text.lines() {
            if !line.starts_with('|') {
                cells = None;
                continue;
            }
            let n = line.matches('|').count();
            assert_eq!(*cells.get_or_insert(n), n, "{line}");
        }
        assert!(text.contains("RSS of the dispatcher service"));
        assert!(text.contains("dispatcher process peak RSS (VmHWM over the measurement) 30.0 MiB"));
        assert!(!text.contains("cannot tell"));
        assert!(
            text.contains("| 0.20× |"),
            "whole productions against the spawner"
        );
        assert!(
            text.contains("| 1.02× |"),
            "two processes of each against one"
        );
        assert!(text.contains("| 0.80× |"), "watched status against plain");
        assert!(text.contains("## Scale-out"));
        assert!(text.contains("Saturates first"));
    }
}
