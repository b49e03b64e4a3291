//! The "Scale-out" section of BENCHMARKS.md: what a deployment needs for the
//! expected loads of CTA and KM3NeT, worked out from the per-item costs and
//! rates this run measured (nothing here is measured anew; the loads are
//! stated inputs, the rest is arithmetic on the run's figures).

use std::fmt::Write as _;

use crate::Results;
use crate::report::thousands;
use crate::sys::CpuUse;

/// An experiment's expected load: the inputs of the section, stated in it.
pub struct Load {
    pub name: &'static str,
    pub requests_per_day: f64,
    pub jobs_in_flight: f64,
    /// Mean length of a job, hours (with `jobs_in_flight`, the jobs a day).
    pub job_hours: f64,
    pub files_per_day: f64,
    /// Where the figures come from.
    pub basis: &'static str,
}

/// The loads the section is worked out for. Their basis is stated beside
/// them; change them here and the section follows at the next run.
pub const LOADS: [Load; 2] = [
    Load {
        name: "CTA (simulation campaigns on the grid)",
        requests_per_day: 200.0,
        jobs_in_flight: 20_000.0,
        job_hours: 8.0,
        files_per_day: 300_000.0,
        basis: "order of magnitude of CTA's DIRAC Monte Carlo campaigns: about 20,000 grid jobs at once, jobs of hours, a few files per job (one per NSB level, and its log); a few hundred production requests a day at the busiest",
    },
    Load {
        name: "KM3NeT (container productions)",
        requests_per_day: 50.0,
        jobs_in_flight: 5_000.0,
        job_hours: 4.0,
        files_per_day: 60_000.0,
        basis: "a quarter of CTA's jobs in flight, shorter jobs of one file each and its log",
    },
];

/// Peak over the mean of a day: a campaign's jobs end in bursts.
const PEAK: f64 = 10.0;
/// Status transitions a job makes on a grid WMS (submitted, queued, running, done).
const TRANSITIONS_PER_JOB: f64 = 4.0;

/// One stage: what it is, its load per second (mean), the rate this run
/// measured it at, and CPU seconds (services, PostgreSQL, RabbitMQ) per item.
struct Stage {
    name: &'static str,
    unit: &'static str,
    per_s: f64,
    measured: f64,
    cpu_s_per_item: f64,
}

fn cpu_per_item(cpu: &CpuUse, seconds: f64, items: f64) -> f64 {
    (cpu.services_total() + cpu.postgres + cpu.rabbitmq) * seconds / items.max(1.0)
}

fn stages(results: &Results, load: &Load) -> Vec<Stage> {
    let jobs_per_day = load.jobs_in_flight * 24.0 / load.job_hours;
    let day = 86_400.0;
    let mut out = Vec::new();
    if let Some(s) = &results.submit {
        out.push(Stage {
            name: "intake + checker (SubmitRequest → ACCEPTED)",
            unit: "requests/s",
            per_s: load.requests_per_day / day,
            measured: s.accepted_per_s,
            cpu_s_per_item: cpu_per_item(&s.load.cpu, s.seconds, s.accepted_in_window as f64),
        });
    }
    if let Some(p) = &results.plan {
        out.push(Stage {
            name: "dispatcher planning (jobs created)",
            unit: "jobs/s",
            per_s: jobs_per_day / day,
            measured: p.jobs_per_s,
            cpu_s_per_item: cpu_per_item(&p.load.cpu, p.seconds, p.jobs as f64),
        });
    }
    if let Some(s) = &results.status {
        out.push(Stage {
            name: "status (job transitions)",
            unit: "transitions/s",
            per_s: jobs_per_day * TRANSITIONS_PER_JOB / day,
            measured: s.transitions_per_s,
            cpu_s_per_item: cpu_per_item(&s.load.cpu, s.seconds, s.transitions as f64),
        });
    }
    if let Some(c) = &results.catalog {
        out.push(Stage {
            name: "catalog (files registered)",
            unit: "files/s",
            per_s: load.files_per_day / day,
            measured: c.files_per_s,
            cpu_s_per_item: cpu_per_item(&c.load.cpu, c.seconds, c.files as f64),
        });
    }
    if let Some(p) = &results.productions {
        out.push(Stage {
            name: "a whole job besides the job itself (submit share, plan, start, poll, scan and checksum, status, catalog; local executor)",
            unit: "jobs/s",
            per_s: jobs_per_day / day,
            measured: p.prodsys_per_s(),
            cpu_s_per_item: cpu_per_item(&p.prodsys_cpu, p.prodsys_seconds, p.jobs as f64),
        });
    }
    out
}

fn rate(v: f64) -> String {
    if v >= 100.0 {
        thousands(v)
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The section, in markdown.
pub fn section(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Scale-out\n");
    let _ = writeln!(
        out,
        "Worked out from this run's measured rates and CPU per item (the service processes, this run's PostgreSQL and the broker; bench clients and the jobs themselves left out) for the loads below. The loads are inputs, not measurements; the peak is taken as {PEAK:.0} × a day's mean (a campaign's jobs start and end in bursts), and a job makes {TRANSITIONS_PER_JOB:.0} status transitions on a grid WMS. A stage's utilisation is its peak load over the rate this run measured it at on this machine ({} CPUs shared by everything); the first to reach 1 saturates first (the whole-job row is the rate of the local executor on this machine, jobs and all, not a grid WMS's: shown, not ranked). Cores are the mean CPU the load costs, at this run's cost per item.\n",
        results.machine.cpus
    );
    for load in &LOADS {
        let jobs_per_day = load.jobs_in_flight * 24.0 / load.job_hours;
        let _ = writeln!(
            out,
            "### {}\n\n{} requests a day, {} jobs in flight of {:.0} h ({} jobs a day), {} files a day. Basis: {}.\n",
            load.name,
            thousands(load.requests_per_day),
            thousands(load.jobs_in_flight),
            load.job_hours,
            thousands(jobs_per_day),
            thousands(load.files_per_day),
            load.basis
        );
        let stages = stages(results, load);
        if stages.is_empty() {
            let _ = writeln!(out, "(no stage of this run measured)\n");
            continue;
        }
        let _ = writeln!(
            out,
            "| stage | mean load | peak load | measured rate (this run) | utilisation at peak | CPU per item | mean cores |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        let mut first: Option<(&str, f64)> = None;
        let mut cores = 0.0;
        for s in &stages {
            let utilisation = s.per_s * PEAK / s.measured;
            let mean_cores = s.per_s * s.cpu_s_per_item;
            // The whole job's rate is the local executor's on this
            // machine, not a grid WMS's: shown, not ranked; its CPU is the
            // other stages' again.
            if !s.name.starts_with("a whole job") {
                cores += mean_cores;
                if first.is_none_or(|(_, u)| utilisation > u) {
                    first = Some((s.name, utilisation));
                }
            }
            let _ = writeln!(
                out,
                "| {} | {} {} | {} {} | {} {} | {:.4} | {:.2} ms | {:.4} |",
                s.name,
                rate(s.per_s),
                s.unit,
                rate(s.per_s * PEAK),
                s.unit,
                rate(s.measured),
                s.unit,
                utilisation,
                s.cpu_s_per_item * 1000.0,
                mean_cores
            );
        }
        let _ = writeln!(out);
        if let Some((name, u)) = first {
            let _ = writeln!(
                out,
                "Saturates first: **{name}**, at {:.1} % of the rate this run measured at the peak ({}). The stages measured separately cost {:.4} cores on average over a day.\n",
                u * 100.0,
                if u < 1.0 {
                    format!(
                        "one process of each service on this machine carries {:.0} × the peak",
                        1.0 / u
                    )
                } else {
                    format!("it needs {:.0} × this machine's rate", u.ceil())
                },
                cores
            );
        }
    }
    if let Some(p) = &results.plan {
        let _ = writeln!(
            out,
            "Jobs in flight are rows, not memory: the dispatcher plans in chunks and holds no production whole; this run planned one production of {} jobs with the dispatcher's peak RSS at {:.0} MiB.\n",
            thousands(p.jobs as f64),
            crate::sys::mib(p.load.max_rss.get("dispatcher").copied().unwrap_or(0))
        );
    }
    let _ = writeln!(out, "### By replicas\n");
    match (&results.productions, &results.replicated) {
        (Some(one), Some(two)) => {
            let _ = writeln!(
                out,
                "Measured in this run: the whole productions with two processes of every service (ten processes on the same {} CPUs, one database, one broker) ran at {:.1} jobs/s against {:.1} with one of each ({:.2} ×), and the databases held {} pieces of work done twice.\n",
                results.machine.cpus,
                two.prodsys_per_s(),
                one.prodsys_per_s(),
                two.prodsys_per_s() / one.prodsys_per_s(),
                two.duplicates.total()
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "(the replicas scenario did not run: `cargo run --release -p prodsys-bench -- replicas`)\n"
            );
        }
    }
    let _ = writeln!(
        out,
        "- **intake, checker, status, catalog**: more processes share each service's queue (competing consumers); intake also behind one gRPC address. The checker decides one ID prefix at a time (a PostgreSQL lock per prefix, held for a batch): replicas add throughput across profiles of different prefixes, not within one.\n- **dispatcher**: every replica plans (shared queue, `SKIP LOCKED` chunks); each WMS installation is scheduled by one lease holder, so jobs in flight scale by installations (and each installation's `max_in_flight`), not by dispatcher replicas.\n- **RabbitMQ**: each service's queue is one quorum queue; its leader runs on one node of a cluster, so a cluster spreads the five queues' leaders and replicates each (the round trip measured above is one queue on one node).\n- **PostgreSQL**: every write goes to one primary (the commit rate and the batched insert rate above are its limits); the read paths (`GetProduction`, `ListProductions`, `FindFiles`, watches) are the ones a read replica could take, which prodsys does not configure today.\n"
    );
    out
}
