//! What the machine is, and what the processes on it use: resident memory of
//! this process and of each service process, and CPU time of those, of
//! PostgreSQL and of RabbitMQ (read from /proc), so each figure says where the
//! two cores went.

use std::time::{Duration, Instant};

/// Resident set size of this process in bytes (VmRSS).
pub fn rss_bytes() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// Peak resident set size of this process in bytes (VmHWM).
pub fn peak_rss_bytes() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Resident set size of process `pid` in bytes (VmRSS; 0 once it is gone).
pub fn pid_rss_bytes(pid: u32) -> u64 {
    proc_status_kib(&format!("/proc/{pid}/status"), "VmRSS:") * 1024
}

/// Peak resident set size of process `pid` in bytes (VmHWM; 0 once it is gone).
pub fn pid_peak_rss_bytes(pid: u32) -> u64 {
    proc_status_kib(&format!("/proc/{pid}/status"), "VmHWM:") * 1024
}

/// Starts process `pid`'s VmHWM again from its current RSS (writes 5 to
/// `/proc/PID/clear_refs`, which its owner may); whether it did.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn status_kib(field: &str) -> u64 {
    proc_status_kib("/proc/self/status", field)
}

fn proc_status_kib(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres: String,
    pub postgres_settings: String,
    pub rabbitmq: String,
}

pub fn describe() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        memory_gib: memory_kib as f64 / (1024.0 * 1024.0),
        kernel,
        ..Machine::default()
    }
}

/// The broker's version from `rabbitmqctl version` (lapin does not expose the
/// server properties of the connection), or "unknown".
pub async fn rabbitmq_version() -> String {
    let run = tokio::process::Command::new("rabbitmqctl")
        .arg("version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(20), run).await {
        Ok(Ok(out)) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if text.is_empty() {
                "unknown".into()
            } else {
                text
            }
        }
        _ => "unknown (rabbitmqctl version did not answer)".into(),
    }
}

/// Databases of this run: PostgreSQL backends serving other databases (other
/// people's tests, say) count as "other", not as this run's PostgreSQL.
static OWN_DATABASES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

pub fn own_database(name: &str) {
    if let Ok(mut own) = OWN_DATABASES.lock() {
        own.push(name.to_string());
    }
}

/// Whether postgres process `pid` works for this run: a server process of
/// its own (checkpointer, WAL writer, …) or a backend of one of its databases.
fn postgres_is_ours(pid: &str) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let title = String::from_utf8_lossy(&raw).replace('\0', " ");
    // "postgres: 15/main: USER DATABASE HOST(PORT) STATE" for a backend.
    let Some((_, rest)) = title.split_once(": ").and_then(|(_, r)| r.split_once(": ")) else {
        return true;
    };
    let tokens: Vec<&str> = rest.split_whitespace().collect();
    let backend = tokens.len() >= 3 && (tokens[2].contains('(') || tokens[2] == "[local]");
    if !backend {
        return true;
    }
    OWN_DATABASES
        .lock()
        .map(|own| own.iter().any(|d| d == tokens[1]))
        .unwrap_or(false)
}

/// CPU time used so far, in clock ticks, by the whole machine and by the
/// processes that matter here.
/// Per process, so one that exits or starts between two readings neither
/// subtracts from nor hides in the difference.
#[derive(Debug, Clone, Default)]
pub struct CpuTicks {
    pub machine_busy: u64,
    pub machine_total: u64,
    /// Ticks the hypervisor ran other guests while this one wanted the CPU
    /// (`steal` in /proc/stat; counted in `machine_busy`).
    pub machine_steal: u64,
    pub this_process: u64,
    pub postgres: std::collections::HashMap<u32, u64>,
    pub rabbitmq: std::collections::HashMap<u32, u64>,
}

/// Ticks the processes in `end` used since `start` (all of them for one started since).
fn used(
    start: &std::collections::HashMap<u32, u64>,
    end: &std::collections::HashMap<u32, u64>,
) -> u64 {
    end.iter()
        .map(|(pid, t)| t.saturating_sub(start.get(pid).copied().unwrap_or(0)))
        .sum()
}

fn process_ticks(stat: &str) -> Option<(String, u64)> {
    // pid (comm) state ... utime(14) stime(15): comm may hold spaces, so split after ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

pub fn cpu_ticks() -> CpuTicks {
    let mut ticks = CpuTicks::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/stat")
        && let Some(line) = stat.lines().find(|l| l.starts_with("cpu "))
    {
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        ticks.machine_total = total;
        ticks.machine_busy = total.saturating_sub(idle);
        ticks.machine_steal = fields.get(7).copied().unwrap_or(0);
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((_, t)) = process_ticks(&stat)
    {
        ticks.this_process = t;
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(pid) = name.parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((comm, t)) = process_ticks(&stat) else {
                continue;
            };
            if comm == "postgres" {
                if postgres_is_ours(name) {
                    ticks.postgres.insert(pid, t);
                }
            } else if comm.starts_with("beam") || comm == "erl_child_setup" || comm == "epmd" {
                ticks.rabbitmq.insert(pid, t);
            }
        }
    }
    ticks
}

/// CPU use over an interval, in cores (1.0 = one core busy the whole time).
#[derive(Debug, Clone, Default)]
pub struct CpuUse {
    pub machine: f64,
    /// The bench's own process: its clients while the services run (each in
    /// a process of its own), everything it measures with for the raw limits.
    pub bench: f64,
    /// Each service's process, by service, in pipeline order (none for the raw limits).
    pub services: Vec<(String, f64)>,
    pub postgres: f64,
    pub rabbitmq: f64,
    pub other: f64,
    /// CPU the hypervisor gave other guests while this machine's wanted it
    /// (part of `machine`, not of `other`): on a shared host, the CPU every
    /// measured thing did not get.
    pub steal: f64,
}

impl CpuUse {
    /// The service processes together.
    pub fn services_total(&self) -> f64 {
        self.services.iter().map(|(_, c)| c).sum()
    }

    /// The process of `service` (0 if it was not measured).
    pub fn service(&self, service: &str) -> f64 {
        self.services
            .iter()
            .find(|(s, _)| s == service)
            .map_or(0.0, |(_, c)| *c)
    }
}

pub struct CpuMeter {
    start: CpuTicks,
    /// Processes measured by name: (name, pid, ticks at the start).
    processes: Vec<(&'static str, u32, u64)>,
    at: Instant,
}

impl CpuMeter {
    /// The machine, this process, PostgreSQL and RabbitMQ.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Those, and each of `processes` (name, pid) on its own.
    pub fn start_with(processes: &[(&'static str, u32)]) -> Self {
        Self {
            processes: processes
                .iter()
                .map(|(name, pid)| (*name, *pid, pid_ticks(*pid as i32).unwrap_or(0)))
                .collect(),
            start: cpu_ticks(),
            at: Instant::now(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let end = cpu_ticks();
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        let hz = 100.0; // USER_HZ on Linux
        let cores = |a: u64, b: u64| b.saturating_sub(a) as f64 / hz / wall;
        let services: Vec<(String, f64)> = self
            .processes
            .iter()
            .map(|(name, pid, start)| {
                // A process gone since the start counts for nothing (not for its whole life).
                let end = pid_ticks(*pid as i32).unwrap_or(*start);
                (name.to_string(), cores(*start, end))
            })
            .collect();
        let machine_cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total_ticks = end.machine_total.saturating_sub(self.start.machine_total) as f64;
        let busy_ticks = end.machine_busy.saturating_sub(self.start.machine_busy) as f64;
        let steal_ticks = end.machine_steal.saturating_sub(self.start.machine_steal) as f64;
        let (machine, steal) = if total_ticks > 0.0 {
            (
                busy_ticks / total_ticks * machine_cpus,
                steal_ticks / total_ticks * machine_cpus,
            )
        } else {
            (0.0, 0.0)
        };
        let bench = cores(self.start.this_process, end.this_process);
        let postgres = used(&self.start.postgres, &end.postgres) as f64 / hz / wall;
        let rabbitmq = used(&self.start.rabbitmq, &end.rabbitmq) as f64 / hz / wall;
        let services_total: f64 = services.iter().map(|(_, c)| c).sum();
        CpuUse {
            machine,
            bench,
            services,
            postgres,
            rabbitmq,
            other: (machine - steal - bench - services_total - postgres - rabbitmq).max(0.0),
            steal,
        }
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "machine {:.2} cores: ", self.machine)?;
        if self.services.is_empty() {
            write!(f, "bench process {:.2}", self.bench)?;
        } else {
            for (service, cores) in &self.services {
                write!(f, "{service} {cores:.2}, ")?;
            }
            write!(f, "bench clients {:.2}", self.bench)?;
        }
        write!(
            f,
            ", PostgreSQL for this run {:.2}, RabbitMQ {:.2}, other {:.2}",
            self.postgres, self.rabbitmq, self.other
        )?;
        if self.steal >= 0.01 {
            write!(f, ", taken by the hypervisor (steal) {:.2}", self.steal)?;
        }
        Ok(())
    }
}

/// CPU ticks (user + system) of process `pid` so far.
pub fn pid_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    process_ticks(&stat).map(|(_, t)| t)
}

/// Work directories of measurements already taken, kept until the run ends.
/// Removing a scenario's tens of thousands of files right before the next one
/// would slow that one's every new file: ext4 passes over inodes freed in the
/// last minutes when it allocates one (`recently_deleted`), so the next
/// measurement's directories and files (its dispatcher's attempt directories,
/// the raw runs' outputs) would cost many times what they cost on a quiet
/// filesystem. Each is renamed beside itself (no inode is freed) and removed
/// by `remove_set_aside` once every figure is taken.
static SET_ASIDE: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
static SET_ASIDE_COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Moves `dir` out of the way, beside itself, to be removed when the run
/// ends; removes it at once if it cannot be renamed.
pub fn set_aside(dir: &std::path::Path) {
    if !dir.exists() {
        return;
    }
    let Some(parent) = dir.parent() else {
        let _ = std::fs::remove_dir_all(dir);
        return;
    };
    let trash = parent.join(format!("prodsys-bench-set-aside-{}", std::process::id()));
    let n = SET_ASIDE_COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let moved = std::fs::create_dir_all(&trash).is_ok()
        && std::fs::rename(dir, trash.join(n.to_string())).is_ok();
    match SET_ASIDE.lock() {
        Ok(mut list) if moved => {
            if !list.contains(&trash) {
                list.push(trash);
            }
        }
        _ => {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Removes what `set_aside` kept (after the last measurement).
pub fn remove_set_aside() {
    let dirs: Vec<std::path::PathBuf> = match SET_ASIDE.lock() {
        Ok(mut list) => list.drain(..).collect(),
        Err(_) => return,
    };
    for dir in dirs {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `TestEnv::cleanup`, its work directory set aside (`set_aside`) instead of
/// removed: jobs still running are ended, the database and queues dropped.
pub async fn cleanup(env: prodsys_testkit::TestEnv) {
    prodsys_testkit::end_jobs(&env.work_dir);
    set_aside(&env.work_dir);
    env.cleanup().await;
}
