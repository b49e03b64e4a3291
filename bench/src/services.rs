//! Each service in its own OS process, so each one's memory and CPU are its
//! own: the bench binary started again as `prodsys-bench --serve <service>
//! --config <file>`, which runs `prodsys::start` of that one service as the
//! `prodsys serve` launcher does, with the bench's settings written to a TOML
//! file (`Settings::load` reads it).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use prodsys::Service;
use prodsys_config::Settings;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::sys;

/// The services in the order of the pipeline, as reports name them.
pub const ORDER: [Service; 5] = [
    Service::Intake,
    Service::Checker,
    Service::Dispatcher,
    Service::Status,
    Service::Catalog,
];

/// How long one service may take from its start to answering health SERVING.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the services have to stop after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Lines of a service's log shown when it fails.
const LOG_TAIL_LINES: usize = 30;

/// `--serve`: runs one service until SIGTERM or SIGINT, or until the bench
/// that started it is gone.
pub fn serve(service: &str, config: &Path) -> anyhow::Result<()> {
    prodsys_telemetry::init("warn");
    let service: Service = service.parse().map_err(anyhow::Error::msg)?;
    let settings = Settings::load(Some(config))?;
    // As `prodsys serve <service>` runs it.
    let runtime = prodsys_server::runtime(1)?;
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_when_told(shutdown.clone()));
        match prodsys::start(&[service], &settings, shutdown.clone()).await {
            Ok(stack) => {
                for running in &stack.services {
                    eprintln!("{} ready on {}", running.service, running.addr);
                }
                stack.wait().await
            }
            Err(error) => {
                shutdown.cancel();
                Err(error)
            }
        }
    });
    // Jobs the dispatcher started outlive it (a restarted dispatcher adopts
    // them); the bench ends them with its environment (TestEnv::cleanup).
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

/// Cancels `shutdown` on SIGTERM or SIGINT, or once the parent process is gone
/// (so no service outlives a bench that was killed).
async fn stop_when_told(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let parent = std::os::unix::process::parent_id();
    let (Ok(mut term), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("cannot install signal handlers; stopping");
        shutdown.cancel();
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
            _ = tick.tick() => {
                if std::os::unix::process::parent_id() != parent {
                    eprintln!("the bench is gone; stopping");
                    break;
                }
            }
        }
    }
    shutdown.cancel();
}

/// One service's process.
struct Process {
    service: Service,
    /// 0 for the first process of the service, 1 for the second, …
    replica: usize,
    pid: u32,
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
    /// Set once its exit has been seen.
    exited: Option<ExitStatus>,
    /// Whether that exit has been reported.
    reported: bool,
}

/// The five service processes of a run.
pub struct Services {
    processes: Vec<Process>,
}

impl Services {
    /// Starts the five, each once the one before it answers gRPC health
    /// (in the order of `prodsys::start`: consumers of events first), on
    /// free ports chosen here and wired to each other as `prodsys::start`
    /// wires services started together. Logs go to `dir`. On failure every
    /// process started is stopped and the error holds the end of the log of
    /// the one that failed.
    pub async fn start(settings: &Settings, dir: &Path) -> anyhow::Result<Self> {
        Self::start_replicated(settings, dir, 1).await
    }

    /// [`Services::start`] with `replicas` processes of every service (each
    /// on a port of its own, sharing the database, the queues and the
    /// dispatcher's work directory, as replicas of a deployment do); intake
    /// and checker call the first checker and catalog.
    pub async fn start_replicated(
        settings: &Settings,
        dir: &Path,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let replicas = replicas.max(1);
        let mut settings = settings.clone();
        let host = settings.grpc.host.clone();
        let ports = free_ports(&host, 5 * replicas)?;
        let ip = connect_ip(&host)?;
        // Ports by service, in Service::ALL order, replica after replica.
        let port_of = |service: Service, replica: usize| {
            let i = Service::ALL.iter().position(|s| *s == service).unwrap_or(0);
            ports[replica * 5 + i]
        };
        settings.intake.checker_url = format!(
            "http://{}",
            SocketAddr::new(ip, port_of(Service::Checker, 0))
        );
        settings.checker.catalog_url = format!(
            "http://{}",
            SocketAddr::new(ip, port_of(Service::Catalog, 0))
        );
        std::fs::create_dir_all(dir)?;
        let mut services = Self {
            processes: Vec::new(),
        };
        for replica in 0..replicas {
            let mut own = settings.clone();
            own.intake.port = port_of(Service::Intake, replica);
            own.checker.port = port_of(Service::Checker, replica);
            own.dispatcher.port = port_of(Service::Dispatcher, replica);
            own.status.port = port_of(Service::Status, replica);
            own.catalog.port = port_of(Service::Catalog, replica);
            let config = if replica == 0 {
                dir.join("settings.toml")
            } else {
                dir.join(format!("settings-{}.toml", replica + 1))
            };
            write_private(
                &config,
                &toml::to_string(&own).context("writing the services' settings")?,
            )?;
            for service in Service::ALL {
                let addr = SocketAddr::new(ip, port_of(service, replica));
                if let Err(error) = services.spawn(service, replica, addr, &config, dir).await {
                    services.stop().await;
                    return Err(error);
                }
            }
        }
        Ok(services)
    }

    async fn spawn(
        &mut self,
        service: Service,
        replica: usize,
        addr: SocketAddr,
        config: &Path,
        dir: &Path,
    ) -> anyhow::Result<()> {
        let log = if replica == 0 {
            dir.join(format!("{service}.log"))
        } else {
            dir.join(format!("{service}-{}.log", replica + 1))
        };
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("--serve")
            .arg(service.name())
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Plain text in the log files (tracing-subscriber honours NO_COLOR).
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        // The settings file alone decides, as TestEnv's settings decided in process.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PRODSYS__") {
                command.env_remove(key);
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting the {service} process"))?;
        let pid = child.id().context("the new process has no pid")?;
        self.processes.push(Process {
            service,
            replica,
            pid,
            addr,
            child,
            log,
            exited: None,
            reported: false,
        });
        let process = self.processes.last_mut().expect("just pushed");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = process.child.try_wait()? {
                process.exited = Some(status);
                process.reported = true;
                anyhow::bail!(
                    "the {service} process exited before it was ready ({status}); the end of its log:\n{}",
                    log_tail(&process.log)
                );
            }
            if serving(addr).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the {service} process did not answer gRPC health SERVING within {READY_TIMEOUT:?}; the end of its log:\n{}",
                    log_tail(&process.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where `service` answers gRPC.
    pub fn addr(&self, service: Service) -> anyhow::Result<SocketAddr> {
        self.processes
            .iter()
            .find(|p| p.service == service)
            .map(|p| p.addr)
            .with_context(|| format!("no {service} process"))
    }

    /// Where each process of `service` answers gRPC.
    pub fn addrs(&self, service: Service) -> Vec<SocketAddr> {
        self.processes
            .iter()
            .filter(|p| p.service == service)
            .map(|p| p.addr)
            .collect()
    }

    /// Name and pid of each service's process, in pipeline order; a second
    /// replica is named `intake#2` and so on.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        ORDER
            .iter()
            .flat_map(|s| self.processes.iter().filter(move |p| p.service == *s))
            .map(|p| (replica_name(p.service, p.replica), p.pid))
            .collect()
    }

    /// An error if a service process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.first_exited() {
            Some(service) => anyhow::bail!("the {service} process has exited"),
            None => Ok(()),
        }
    }

    /// The first service whose process has exited, if any.
    pub fn first_exited(&mut self) -> Option<Service> {
        self.look();
        self.processes
            .iter()
            .find(|p| p.exited.is_some())
            .map(|p| p.service)
    }

    /// Service processes whose exit has not been reported yet, each with how
    /// it ended and the end of its log.
    pub fn newly_exited(&mut self) -> Vec<String> {
        self.look();
        let mut out = Vec::new();
        for process in &mut self.processes {
            if let (Some(status), false) = (process.exited, process.reported) {
                process.reported = true;
                out.push(format!(
                    "the {} process exited ({status}); the end of its log:\n{}",
                    process.service,
                    log_tail(&process.log)
                ));
            }
        }
        out
    }

    fn look(&mut self) {
        for process in &mut self.processes {
            if process.exited.is_none()
                && let Ok(Some(status)) = process.child.try_wait()
            {
                process.exited = Some(status);
            }
        }
    }

    /// Peak RSS (VmHWM) of each service process over its life, then SIGTERM
    /// to all of them; those still running after 15 s are killed.
    pub async fn stop(mut self) -> BTreeMap<String, u64> {
        let peaks = self
            .processes
            .iter()
            .filter(|p| p.exited.is_none())
            .map(|p| {
                (
                    replica_name(p.service, p.replica).to_string(),
                    sys::pid_peak_rss_bytes(p.pid),
                )
            })
            .filter(|(_, rss)| *rss > 0)
            .collect();
        for process in &mut self.processes {
            if process.exited.is_none() && matches!(process.child.try_wait(), Ok(None)) {
                terminate(process.pid).await;
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for process in &mut self.processes {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, process.child.wait()).await {
                Ok(Ok(status)) => {
                    if process.exited.is_none() && !status.success() {
                        eprintln!(
                            "the {} process ended with {status}; the end of its log:\n{}",
                            process.service,
                            log_tail(&process.log)
                        );
                    }
                }
                _ => {
                    eprintln!(
                        "the {} process did not stop within {STOP_TIMEOUT:?} of SIGTERM; killing it",
                        process.service
                    );
                    let _ = process.child.kill().await;
                }
            }
        }
        peaks
    }
}

/// On a path that skipped [`Services::stop`] (a panic, say): SIGTERM to every
/// process still running and a few seconds to stop, then `kill_on_drop`
/// kills what is left (the dispatcher's jobs outlive it, by design).
impl Drop for Services {
    fn drop(&mut self) {
        let mut running: Vec<&mut Process> = self.processes.iter_mut().collect();
        running.retain_mut(|p| matches!(p.child.try_wait(), Ok(None)));
        if running.is_empty() {
            return;
        }
        for process in &running {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &process.pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            running.retain_mut(|p| matches!(p.child.try_wait(), Ok(None)));
            if running.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `intake` for the first process of a service, `intake#2` for the second, …
fn replica_name(service: Service, replica: usize) -> &'static str {
    if replica == 0 {
        service.name()
    } else {
        // A handful per run, named once each.
        static NAMES: std::sync::Mutex<Vec<(Service, usize, &'static str)>> =
            std::sync::Mutex::new(Vec::new());
        let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, name)) = names
            .iter()
            .find(|(s, r, _)| *s == service && *r == replica)
        {
            return name;
        }
        let name: &'static str =
            Box::leak(format!("{}#{}", service.name(), replica + 1).into_boxed_str());
        names.push((service, replica, name));
        name
    }
}

/// SIGTERM to `pid` (with kill(1): the workspace forbids unsafe code, and the
/// dispatcher cancels its jobs the same way).
async fn terminate(pid: u32) {
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if !sent.is_ok_and(|s| s.success()) {
        eprintln!("could not send SIGTERM to service process {pid}");
    }
}

/// Whether a gRPC server at `addr` answers the overall health check SERVING.
async fn serving(addr: SocketAddr) -> bool {
    let check = async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()?;
        let answer = HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(answer.into_inner().status == ServingStatus::Serving as i32)
    };
    tokio::time::timeout(Duration::from_secs(2), check)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// `n` distinct ports free on `host` now (bound to port 0, read, released).
fn free_ports(host: &str, n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind((host, 0)))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("finding free ports on {host}"))?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// The address to reach a server bound on `host` (loopback for a wildcard).
fn connect_ip(host: &str) -> anyhow::Result<IpAddr> {
    let ip = match host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => std::net::ToSocketAddrs::to_socket_addrs(&(host, 0))?
            .next()
            .with_context(|| format!("resolving {host}"))?
            .ip(),
    };
    Ok(if ip.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        ip
    })
}

/// Writes `text` to a new file only its owner may read (it may hold passwords).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    // A process that failed printed its error before a backtrace that
    // would fill the tail: from the error on, then.
    let from = lines
        .iter()
        .rposition(|l| l.starts_with("Error: "))
        .unwrap_or_else(|| lines.len().saturating_sub(LOG_TAIL_LINES));
    let tail = lines[from..(from + LOG_TAIL_LINES).min(lines.len())].join("\n");
    if tail.is_empty() {
        "(empty)".into()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file the services load holds exactly the settings the bench made.
    #[test]
    fn settings_survive_the_file() {
        let mut settings = Settings::default();
        settings.database.url = "postgres://u:pw@db:5432/x".to_string().into();
        settings.amqp.prefix = "test.abc.".into();
        settings.dispatcher.max_concurrent_jobs = 1;
        settings.dispatcher.tools_dir = PathBuf::from("/tmp/tools");
        settings.checker.catalog_url = "http://127.0.0.1:4242".into();
        settings.dispatcher.backends.insert(
            "dirac-x".into(),
            prodsys_config::BackendSettings::Dirac(prodsys_config::DiracSettings {
                url: "https://diracx.example.org".into(),
                token: None,
                token_file: None,
                token_command: vec!["get-token".into()],
                token_refresh_margin_s: 60,
                ca_file: None,
                max_in_flight: 10,
                sites: vec![],
                output_se: None,
                jdl: [("Priority".to_string(), "5".to_string())].into(),
                shared_filesystem: false,
            }),
        );
        let dir =
            std::env::temp_dir().join(format!("prodsys-bench-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("settings.toml");
        write_private(&path, &toml::to_string(&settings).unwrap()).unwrap();
        let loaded = Settings::load(Some(&path)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(format!("{loaded:?}"), format!("{settings:?}"));
        assert_eq!(loaded.database.url(), "postgres://u:pw@db:5432/x");
        assert_eq!(loaded.amqp.url(), settings.amqp.url());
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports("127.0.0.1", 5).unwrap();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 5);
        assert!(ports.iter().all(|p| *p != 0));
    }
}
