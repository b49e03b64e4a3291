//! The table of figures (terminal and BENCHMARKS.md), the targets of issue 5
//! beside them, and what the measurements show about each figure.

use std::fmt::Write as _;

use crate::Results;
use crate::stack::PhaseLoad;
use crate::sys::{self, mib};

const MIB: u64 = 1024 * 1024;

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

/// The binding raw limit of an event consumer: the broker's round trip times
/// the items per message, or the database's batched insert rate, the lower.
fn consumer_limit(results: &Results, per_message: u64) -> (f64, String) {
    let broker = results
        .broker
        .as_ref()
        .map(|b| b.round_trip_per_s * per_message as f64);
    let db = results.db.as_ref().map(|d| d.batch_rows_per_s);
    match (broker, db) {
        (Some(b), Some(d)) => {
            let text = format!(
                "broker {} msgs/s × {per_message} = {}/s; batched insert {} rows/s",
                thousands(b / per_message as f64),
                thousands(b),
                thousands(d)
            );
            (b.min(d), text)
        }
        (Some(b), None) => (b, format!("broker × {per_message} = {}/s", thousands(b))),
        (None, Some(d)) => (d, format!("batched insert {} rows/s", thousands(d))),
        (None, None) => (f64::NAN, "—".into()),
    }
}

fn rss_verdict(total: u64, share: u64, per_service_mib: u64) -> String {
    let bound = per_service_mib * MIB;
    if total <= bound {
        "pass".into()
    } else if share > 5 * bound {
        "miss".into()
    } else {
        format!(
            "cannot tell: one process; {:.0} MiB over five is {:.0} MiB each on average",
            mib(share),
            mib(share) / 5.0
        )
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
    if let Some(s) = &results.submit {
        let r = s.accepted_per_s / commits;
        let verdict = if s.seconds < 60.0 {
            format!(
                "n/a: {:.0} s run, the target is for 60 s ({} rate, {} ratio)",
                s.seconds,
                pass(s.accepted_per_s >= 1000.0),
                pass(r >= 0.15)
            )
        } else {
            smoke_mark(results, pass(s.accepted_per_s >= 1000.0 && r >= 0.15))
        };
        rows.push(Row {
            figure: format!(
                "prodsys: SubmitRequest → ACCEPTED, sustained {:.0} s, {} clients (closed loop)",
                s.seconds, s.clients
            ),
            measured: format!("{} req/s", thousands(s.accepted_per_s)),
            raw: format!("single-row commits {}/s", thousands(commits)),
            ratio: ratio(s.accepted_per_s, commits),
            target: "≥ 1,000 req/s for 60 s and ≥ 0.15 × single-row commit rate".into(),
            verdict,
        });
    }
    if let Some(l) = &results.latency {
        let raw_p99 = results.db.as_ref().map_or(f64::NAN, |d| d.single_p99_ms);
        let verdict = if l.offered_per_s < 200.0 {
            format!(
                "n/a: offered {:.0} req/s, the target is at 200 ({} at this load)",
                l.offered_per_s,
                pass(l.p99_ms <= 100.0)
            )
        } else {
            smoke_mark(results, pass(l.p99_ms <= 100.0 && l.failed == 0))
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
            target: "p99 ≤ 100 ms at 200 req/s".into(),
            verdict,
        });
    }
    if let Some(s) = &results.status {
        let (limit, text) = consumer_limit(results, s.per_message);
        rows.push(Row {
            figure: format!(
                "prodsys: job transitions into status ({} in batches of {})",
                thousands(s.transitions as f64),
                s.per_message
            ),
            measured: format!("{} transitions/s", thousands(s.transitions_per_s)),
            raw: text,
            ratio: ratio(s.transitions_per_s, limit),
            target: "≥ 100,000 transitions/s".into(),
            verdict: smoke_mark(results, pass(s.transitions_per_s >= 100_000.0)),
        });
    }
    if let Some(c) = &results.catalog {
        let (limit, text) = consumer_limit(results, c.per_message);
        rows.push(Row {
            figure: format!(
                "prodsys: files into the catalog ({} in job.output events of {})",
                thousands(c.files as f64),
                c.per_message
            ),
            measured: format!("{} files/s", thousands(c.files_per_s)),
            raw: text,
            ratio: ratio(c.files_per_s, limit),
            target: "≥ 50,000 files/s".into(),
            verdict: smoke_mark(results, pass(c.files_per_s >= 50_000.0)),
        });
    }
    if let Some(p) = &results.plan {
        let batch = results.db.as_ref().map_or(f64::NAN, |d| d.batch_rows_per_s);
        rows.push(Row {
            figure: format!(
                "prodsys: one production of {} jobs planned and persisted (request.accepted → plan committed)",
                thousands(p.jobs as f64)
            ),
            measured: format!(
                "{:.1} s ({} jobs/s), RSS ≤ {:.1} MiB",
                p.seconds,
                thousands(p.jobs_per_s),
                mib(p.load.max_rss)
            ),
            raw: format!("batched INSERT {} rows/s", thousands(batch)),
            ratio: ratio(p.jobs_per_s, batch),
            target: "1,000,000 jobs in < 20 s, dispatcher RSS < 256 MiB".into(),
            verdict: if p.jobs < 1_000_000 {
                format!(
                    "n/a: {} jobs, the target is for 1,000,000",
                    thousands(p.jobs as f64)
                )
            } else {
                // The whole process holds all five services: it bounds the dispatcher's RSS.
                smoke_mark(
                    results,
                    pass(p.seconds < 20.0 && p.load.max_rss < 256 * MIB),
                )
            },
        });
    }
    let before = results.rss_before_start.unwrap_or(0);
    if let Some(idle) = results.rss_idle {
        let share = idle.saturating_sub(before);
        rows.push(Row {
            figure:
                "prodsys: RSS idle — all five services in one process, with the bench's clients"
                    .into(),
            measured: format!(
                "{:.1} MiB ({:.1} MiB more than the bench alone)",
                mib(idle),
                mib(share)
            ),
            raw: "—".into(),
            ratio: "—".into(),
            target: "each service ≤ 50 MiB idle".into(),
            verdict: rss_verdict(idle, share, 50),
        });
    }
    if let Some((loaded, phase)) = results.loaded_rss() {
        let share = loaded.saturating_sub(before);
        rows.push(Row {
            figure: format!(
                "prodsys: RSS under load (largest, during {phase}) — all five in one process, with the bench's clients"
            ),
            measured: format!(
                "{:.1} MiB ({:.1} MiB more than the bench alone)",
                mib(loaded),
                mib(share)
            ),
            raw: "—".into(),
            ratio: "—".into(),
            target: "each service ≤ 256 MiB under load".into(),
            verdict: smoke_mark(results, &rss_verdict(loaded, share, 256)),
        });
    }
    rows
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
    let _ = writeln!(
        out,
        "\n  where the CPU went (cores, of {}):",
        results.machine.cpus
    );
    for (phase, load) in phases(results) {
        let _ = writeln!(out, "      {phase:<8} {}", load.cpu);
        let _ = writeln!(
            out,
            "               PostgreSQL by service: {}",
            pg_split(load)
        );
        let _ = writeln!(out, "               max ready messages: {}", depths(load));
        let _ = writeln!(
            out,
            "               largest RSS: {:.1} MiB",
            mib(load.max_rss)
        );
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

fn phases(results: &Results) -> Vec<(&'static str, &PhaseLoad)> {
    let mut out = Vec::new();
    if let Some(r) = &results.latency {
        out.push(("latency", &r.load));
    }
    if let Some(r) = &results.submit {
        out.push(("submit", &r.load));
    }
    if let Some(r) = &results.status {
        out.push(("status", &r.load));
    }
    if let Some(r) = &results.catalog {
        out.push(("catalog", &r.load));
    }
    if let Some(r) = &results.plan {
        out.push(("plan", &r.load));
    }
    out
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
    format!(
        "prodsys + bench clients {:.2} ms, PostgreSQL {:.2} ms, RabbitMQ {:.2} ms",
        each(cpu.this_process),
        each(cpu.postgres),
        each(cpu.rabbitmq)
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
        let _ = write!(
            line,
            " Time to ACCEPTED: {}. PostgreSQL CPU by the service it served (cores): {}. Transactions committed in the run's database: {} ({:.1} per accepted request).",
            stage_text(&s.stages),
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
    if let Some(s) = &results.submit {
        out.push(format!(
            "Submit, in short: the stage from request.received to request.accepted (the checker) took {:.0} % of the median time to ACCEPTED, and {:.1} transactions committed per accepted request across the five services; the two cores were {:.0} % busy.",
            100.0 * s.stages.checker_p50_ms / s.accept_p50_ms,
            s.load.commits as f64 / s.accepted_in_window.max(1) as f64,
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
    let mut busiest: Option<(&str, f64)> = None;
    let mut raw_other = Vec::new();
    if let Some(b) = &results.broker {
        raw_other.push(("raw RabbitMQ", b.cpu.other));
    }
    if let Some(d) = &results.db {
        raw_other.push(("raw single-row commits", d.single_cpu.other));
        raw_other.push(("raw batched inserts", d.batch_cpu.other));
    }
    for (phase, other) in phases(results)
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
                "Other work on the machine (not the bench, its PostgreSQL backends or the broker) used up to {other:.2} cores (during {phase}); the measurements it overlapped had that much less CPU than this machine has (see \"other\" above)."
            ));
        } else {
            out.push(format!(
                "Other work on the machine used at most {other:.2} cores during any measurement."
            ));
        }
    }
    if let (Some(idle), Some(before)) = (results.rss_idle, results.rss_before_start) {
        out.push(format!(
            "Memory: the bench process held {:.1} MiB before the services started and {:.1} MiB with all five idle; the services share one process, so the figure is for the five together (plus the bench's own gRPC and AMQP clients), not per service. Peak RSS of the whole run (VmHWM): {:.1} MiB.",
            mib(before),
            mib(idle),
            mib(sys::peak_rss_bytes())
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
        "- Broker, database and the bench (with all five services in its process) share these CPUs; anything else running at the time shows as \"other\" below.\n"
    );
    let _ = writeln!(out, "## How it measures\n");
    if let Some(p) = &results.raw_plan {
        let _ = writeln!(
            out,
            "- **Raw limits**, on a database and AMQP prefix of their own, before prodsys starts. RabbitMQ: lapin, one durable quorum queue, persistent mandatory messages the size of a `request.received` for the shipped CTA example with its CloudEvents headers, published for {} s with up to {} unconfirmed, consumed on another connection with prefetch {} and one multiple-ack per batch of what has arrived (≤ 128, as the prodsys consumer does); the rate is messages / (first publish → last ack). PostgreSQL: tokio-postgres, a table like the outbox (bigserial key, unique uuid, bytea payload of the same size); BEGIN / INSERT one row / COMMIT in a loop on {} connections for {} s; then INSERT … SELECT FROM unnest of {} rows per statement on one connection for {} s.",
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
            "- **prodsys**: `prodsys::start` of all five services in the bench's process on a fresh database and prefix (`TestEnv`), settings as the tests use them (database pool {} per service, prefetch {}, batch {}). Requests are the shipped CTA example with a unique `array_layout` and a fractional `zenith_deg`, so none duplicates or overlaps another; each plans one job on the local backend, whose single slot holds a job that only sleeps, so no job competes for the CPUs. ACCEPTED is seen on the bench's own exclusive queue bound to `request.accepted` and `request.rejected` on `prodsys.events`.",
            results.pool_size, results.prefetch, results.batch_size
        );
        let _ = writeln!(
            out,
            "- **Submit → ACCEPTED**: {} client tasks over {} gRPC connections, each submitting and waiting for its ACCEPTED before the next, for {} s; the rate counts ACCEPTED events inside those seconds. **Latency**: open loop at {} req/s for {} s after {} s of warm-up, timed from each request's scheduled start (so a stall is not hidden) to its ACCEPTED event.",
            p.submit_clients,
            4,
            p.submit_duration.as_secs(),
            p.latency_rate,
            p.latency_duration.as_secs(),
            p.latency_warmup.as_secs()
        );
        let _ = writeln!(
            out,
            "- **Status**: a `production.dispatched` of {} jobs, then `job.status` events of {} transitions each (SUBMITTED, then RUNNING, then DONE for every job: {} transitions), published with confirms (≤ 64 outstanding) as prodsys publishes, CloudEvents headers as `envelope.rs` writes them; timed from the first publish until `GetProduction` counts every job DONE. **Catalog**: `job.output` events of {} files each (LFN, size, adler32, URL, ten metadata keys), {} files in all, timed until `catalog.files` holds every one.",
            thousands(p.status_jobs as f64),
            p.transitions_per_message,
            thousands(p.status_jobs as f64 * 3.0),
            p.files_per_message,
            thousands(p.catalog_files as f64)
        );
        let _ = writeln!(
            out,
            "- **RSS** is this process's VmRSS: idle is 3 s after the five started; under load is the largest of samples every 250 ms during the measurements. Queue depths are ready messages in each service's queue, sampled with the same period.\n"
        );
    }
    let _ = writeln!(out, "## Results\n");
    let _ = writeln!(
        out,
        "| figure | measured | raw limit it depends on | ratio | target (issue 5) | verdict |"
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
    if !phases(results).is_empty() {
        let _ = writeln!(out, "### Where the CPU went (cores busy, of {})\n", m.cpus);
        let _ = writeln!(
            out,
            "| measurement | machine | bench process (prodsys + clients) | PostgreSQL for this run | PostgreSQL by service served | RabbitMQ (whole broker) | other | most ready messages per service queue | largest RSS |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        for (phase, load) in phases(results) {
            let c = &load.cpu;
            let _ = writeln!(
                out,
                "| {phase} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {} | {:.0} MiB |",
                c.machine,
                c.this_process,
                c.postgres,
                pg_split(load),
                c.rabbitmq,
                c.other,
                depths(load),
                mib(load.max_rss)
            );
        }
        let _ = writeln!(out);
    }
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
