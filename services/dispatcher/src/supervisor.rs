//! The supervisor of one local attempt: a small `/bin/sh` script that runs
//! the job in its own process group and records, in the attempt's directory,
//! what a dispatcher needs to find the attempt again after a restart:
//!
//! - `prodsys.started`, created exclusively before anything runs: an attempt
//!   directory is started at most once, whichever dispatcher (or replica
//!   sharing the work directory) tries;
//! - `prodsys.pid`: the supervisor's pid and its start time (field 22 of
//!   `/proc/<pid>/stat`), so a pid the kernel reused is not taken for it;
//! - `prodsys.exit`, written atomically (temporary file, then rename) once the
//!   job ended: its exit status and the CPU time of its processes (the
//!   shell's `times`).
//!
//! The supervisor is not the dispatcher's child in any sense that matters: it
//! outlives a dispatcher killed with SIGKILL or shut down, and the next one
//! reads its files ([`observe`]).

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;

pub const STARTED_FILE: &str = "prodsys.started";
pub const PID_FILE: &str = "prodsys.pid";
pub const EXIT_FILE: &str = "prodsys.exit";

/// How long after `prodsys.started` an attempt may still lack its pid file
/// (the supervisor starting) before it is taken for lost.
pub const START_GRACE: Duration = Duration::from_secs(10);

/// `sh -c SCRIPT prodsys-supervisor PROGRAM ARGS...`, run in the attempt's
/// directory. Signals (a cancel's SIGTERM to the process group) reach the job;
/// the supervisor only notes them and stays to record how the job ended.
/// Shell builtins only, so that the job's command is the one program started
/// besides the shell (a `cat` and two `mv`s cost more CPU than a short job);
/// its files are written in place: the pid file in one write, which a reader
/// that finds it empty takes for a supervisor still starting, and the exit
/// file, which counts only once the supervisor that writes it has ended.
pub const SCRIPT: &str = r#"trap 'signalled=1' TERM INT HUP
prodsys_pid() { s=${1##*) }; set -- $s; echo "$$ ${20}"; }
read -r prodsys_stat < /proc/$$/stat || exit 125
prodsys_pid "$prodsys_stat" > prodsys.pid || exit 125
"$@"
rc=$?
{ echo "exit $rc"; times; } > prodsys.exit
"#;

/// How an attempt's job ended, as its supervisor recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    /// The shell's `$?`: the exit code, or 128 + the signal that killed the job.
    pub status: i32,
    /// CPU seconds of the job's processes, user and system.
    pub user_s: f64,
    pub sys_s: f64,
}

impl Exit {
    /// The signal that killed the job, if the shell reported one.
    pub fn signal(&self) -> Option<i32> {
        (self.status > 128 && self.status < 128 + 65).then_some(self.status - 128)
    }
}

/// Reads `exit N` and the output of `times` (the second line: children's user and system time).
pub fn parse_exit(text: &str) -> anyhow::Result<Exit> {
    let mut lines = text.lines();
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("exit "))
        .context("no exit line")?
        .trim()
        .parse()
        .context("exit status")?;
    // `times` prints the shell's own times, then its children's.
    let children = lines.nth(1).unwrap_or_default();
    let mut fields = children.split_whitespace().map(parse_duration);
    let user_s = fields.next().flatten().unwrap_or(0.0);
    let sys_s = fields.next().flatten().unwrap_or(0.0);
    Ok(Exit {
        status,
        user_s,
        sys_s,
    })
}

/// `1m2.500000s` (dash) or `1m2.500s` (bash) in seconds.
fn parse_duration(text: &str) -> Option<f64> {
    let (minutes, seconds) = text.strip_suffix('s')?.split_once('m')?;
    Some(minutes.parse::<f64>().ok()? * 60.0 + seconds.parse::<f64>().ok()?)
}

/// `pid starttime` of the pid file.
pub fn parse_pid(text: &str) -> Option<(u32, u64)> {
    let mut fields = text.split_whitespace();
    let pid = fields.next()?.parse().ok()?;
    let start = fields.next()?.parse().ok()?;
    Some((pid, start))
}

/// State and start time (fields 3 and 22) of a `/proc/<pid>/stat` line; the
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted from its last `)`.
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Whether the process `pid` that started at `start` still runs (a zombie does not).
pub fn alive(pid: u32, start: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| parse_stat(&stat))
        .is_some_and(|(state, started)| started == start && state != 'Z' && state != 'X')
}

/// What an attempt directory says about its job.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// It ran to its end.
    Ended(Exit),
    /// Its supervisor still runs (pid).
    Running(u32),
    /// Started moments ago; the supervisor has not written its pid yet.
    Starting,
    /// Never started here.
    Unknown,
    /// Started, but its supervisor is gone without recording an end.
    Gone,
    /// The exit file cannot be read.
    Unreadable(String),
}

fn read_exit(dir: &Path) -> Option<Result<Exit, String>> {
    let text = std::fs::read_to_string(dir.join(EXIT_FILE)).ok()?;
    Some(parse_exit(&text).map_err(|e| format!("{e:#}")))
}

/// Reads an attempt directory: ended, still running, or gone.
pub fn observe(dir: &Path, now: SystemTime) -> Observed {
    observe_with(dir, now, alive)
}

/// [`observe`], with the check of whether a process still runs given.
fn observe_with(dir: &Path, now: SystemTime, alive: impl Fn(u32, u64) -> bool) -> Observed {
    let ended = |exit: Result<Exit, String>| match exit {
        Ok(exit) => Observed::Ended(exit),
        Err(error) => Observed::Unreadable(error),
    };
    let read_pid = || {
        std::fs::read_to_string(dir.join(PID_FILE))
            .ok()
            .and_then(|text| parse_pid(&text))
    };
    if read_exit(dir).is_some() {
        // Its supervisor writes the file, then ends: while it lives the file
        // may be incomplete. (The pid file was written before the job ran.)
        if let Some((pid, start)) = read_pid()
            && alive(pid, start)
        {
            return Observed::Running(pid);
        }
        // Ended, so the file is whole now: read again, not the read above,
        // which may have caught it half written (an empty file taken for an
        // unreadable one failed a job that had succeeded, and ran it again).
        return read_exit(dir).map_or_else(
            || Observed::Unreadable("the exit file vanished".into()),
            ended,
        );
    }
    let pid = read_pid();
    if let Some((pid, start)) = pid
        && alive(pid, start)
    {
        return Observed::Running(pid);
    }
    // It may have ended between the two reads (or be writing its exit file
    // now, its pid file read before it was written): read as above.
    if read_exit(dir).is_some() {
        return observe_with(dir, now, alive);
    }
    let Ok(started) = std::fs::metadata(dir.join(STARTED_FILE)) else {
        return Observed::Unknown;
    };
    let young = started
        .modified()
        .ok()
        .and_then(|at| now.duration_since(at).ok())
        .is_none_or(|age| age < START_GRACE);
    if pid.is_none() && young {
        Observed::Starting
    } else {
        Observed::Gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_file_caught_half_written_is_read_again_once_its_supervisor_ended() {
        let dir = std::env::temp_dir().join(format!("prodsys-observe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(STARTED_FILE), "").unwrap();
        std::fs::write(dir.join(PID_FILE), "4242 65470\n").unwrap();
        // The supervisor has opened its exit file and not written it yet.
        std::fs::write(dir.join(EXIT_FILE), "").unwrap();
        // It finishes the file and ends between the first read and the
        // check of whether it still runs.
        let observed = observe_with(&dir, SystemTime::now(), |_, _| {
            std::fs::write(
                dir.join(EXIT_FILE),
                "exit 0\n0m0.000000s 0m0.000000s\n0m0.010000s 0m0.000000s\n",
            )
            .unwrap();
            false
        });
        std::fs::remove_dir_all(&dir).unwrap();
        match observed {
            Observed::Ended(exit) => assert_eq!(exit.status, 0),
            other => panic!("a job that ended with 0 taken for {other:?}"),
        }
    }

    #[test]
    fn exit_files_of_dash_and_bash_read() {
        let dash = "exit 0\n0m0.000000s 0m0.000000s\n1m2.500000s 0m0.250000s\n";
        let exit = parse_exit(dash).unwrap();
        assert_eq!(exit.status, 0);
        assert!((exit.user_s - 62.5).abs() < 1e-9, "{exit:?}");
        assert!((exit.sys_s - 0.25).abs() < 1e-9, "{exit:?}");
        assert_eq!(exit.signal(), None);
        let bash = "exit 143\n0m0.001s 0m0.002s\n0m0.150s 0m0.140s\n";
        let exit = parse_exit(bash).unwrap();
        assert_eq!(exit.status, 143);
        assert_eq!(exit.signal(), Some(15));
        assert!((exit.user_s - 0.15).abs() < 1e-9);
        // Times missing: the status still counts.
        assert_eq!(parse_exit("exit 3\n").unwrap().status, 3);
        assert!(parse_exit("").is_err());
        assert!(parse_exit("exit x\n").is_err());
        assert!(parse_exit("0m0.1s 0m0.1s\n").is_err());
    }

    #[test]
    fn stat_lines_with_odd_command_names_read() {
        let stat = "4242 (a) b) (c) S 1 4242 4242 0 -1 4194304 104 106 0 0 0 0 0 0 20 0 1 0 65470 2654208 400";
        assert_eq!(parse_stat(stat), Some(('S', 65470)));
        assert_eq!(parse_stat("4242 (sh) Z 1"), None);
        assert_eq!(parse_pid("4242 65470\n"), Some((4242, 65470)));
        assert_eq!(parse_pid("4242\n"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = std::process::id();
        let stat = std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
        let (_, start) = parse_stat(&stat).unwrap();
        assert!(alive(me, start));
        assert!(
            !alive(me, start + 1),
            "another start time is another process"
        );
    }

    #[test]
    fn an_attempt_directory_tells_how_its_job_is() {
        let dir = std::env::temp_dir().join(format!("prodsys-supervisor-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let now = SystemTime::now();
        assert_eq!(observe(&dir, now), Observed::Unknown);
        std::fs::write(dir.join(STARTED_FILE), "tag").unwrap();
        assert_eq!(observe(&dir, now), Observed::Starting);
        assert_eq!(observe(&dir, now + START_GRACE * 2), Observed::Gone);
        // A pid whose process is not the one that wrote it: gone.
        std::fs::write(dir.join(PID_FILE), format!("{} 1\n", std::process::id())).unwrap();
        assert_eq!(observe(&dir, now), Observed::Gone);
        let me = std::process::id();
        let (_, start) =
            parse_stat(&std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap()).unwrap();
        std::fs::write(dir.join(PID_FILE), format!("{me} {start}\n")).unwrap();
        assert_eq!(observe(&dir, now), Observed::Running(me));
        // An exit file while its supervisor lives is still being written.
        std::fs::write(dir.join(EXIT_FILE), "exit 2\n").unwrap();
        assert_eq!(observe(&dir, now), Observed::Running(me));
        std::fs::write(dir.join(EXIT_FILE), "exit 2\n0m0s 0m0s\n0m1.5s 0m0s\n").unwrap();
        std::fs::write(dir.join(PID_FILE), format!("{me} {}\n", start + 1)).unwrap();
        let Observed::Ended(exit) = observe(&dir, now) else {
            panic!("ended")
        };
        assert_eq!(exit.status, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
