//! Slurm through its commands: `sbatch --parsable` to submit (one batch script
//! per attempt, named by the attempt's tag), `squeue --json` to follow jobs in
//! bulk, `sacct` for jobs squeue has forgotten, `scancel` to kill. The job's
//! working directory is on a filesystem the nodes share with the dispatcher,
//! so outputs are collected the way the local executor's are, and the job's
//! CPU time is what its batch script recorded there once the command ended
//! (`prodsys.exit`, as the local executor's supervisor writes it: the
//! shell's `times`), which needs no accounting database. An installation
//! that does not share it (`shared_filesystem = false`) gets a batch script
//! that makes the attempt's directory on the node, writes its input list
//! there, runs the command and uploads the outputs to the production's
//! storage (see `remote`); its logs stay on the node (`/tmp`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use prodsys_core::JobState;
use serde_json::Value;
use tokio::sync::Notify;

use crate::backend::{Backend, BackendStatus, BoxFuture, JobSpec};
use crate::supervisor;

pub struct Slurm {
    name: String,
    partition: String,
    max_in_flight: usize,
    sbatch_args: Vec<String>,
    tools_dir: Option<PathBuf>,
    changed: Arc<Notify>,
}

const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Our state for a Slurm job state (`PENDING`, `COMPLETED`, …). A job
/// cancelled behind our back failed as far as the production goes: it is retried.
pub fn map_state(raw: &str) -> JobState {
    match raw {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESIZING"
        | "SUSPENDED" => JobState::Queued,
        "RUNNING" | "COMPLETING" | "STAGE_OUT" | "SIGNALING" => JobState::Running,
        "COMPLETED" => JobState::Done,
        _ => JobState::Failed,
    }
}

/// `'it''s'` quoting for a bash script.
fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

async fn run(program: &str, args: &[String]) -> anyhow::Result<String> {
    let output = tokio::time::timeout(
        COMMAND_TIMEOUT,
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{program} did not answer within {COMMAND_TIMEOUT:?}"))?
    .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The state string of a job in `squeue --json` (a string in Slurm 22.05, a list later).
fn job_state(job: &Value) -> Option<String> {
    match job.get("job_state")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items.first().and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The exit code of a job in `squeue --json`, in whichever form this Slurm writes it.
fn exit_code(job: &Value) -> Option<i32> {
    match job.get("exit_code")? {
        // Slurm 22.05 writes the raw wait status: the exit code is its second byte.
        Value::Number(n) => n.as_i64().map(|n| ((n >> 8) & 0xff) as i32),
        Value::Object(o) => o
            .get("return_code")
            .and_then(|r| {
                r.as_i64()
                    .or_else(|| r.get("number").and_then(Value::as_i64))
            })
            .map(|n| n as i32),
        _ => None,
    }
}

/// The CPU time (ms) the batch script of a finished job recorded in its
/// working directory; none for a job not finished or that recorded none (a
/// job killed with its script, or one written before scripts recorded it).
async fn cpu_recorded(status: &BackendStatus, workdir: &str) -> Option<u64> {
    if !matches!(
        status.state,
        JobState::Done | JobState::Failed | JobState::Cancelled
    ) || workdir.is_empty()
    {
        return None;
    }
    let path = std::path::Path::new(workdir).join(supervisor::EXIT_FILE);
    let text = tokio::fs::read_to_string(path).await.ok()?;
    let exit = supervisor::parse_exit(&text).ok()?;
    Some(((exit.user_s + exit.sys_s) * 1000.0).round().max(0.0) as u64)
}

fn job_id(job: &Value) -> Option<String> {
    job.get("job_id")
        .and_then(Value::as_u64)
        .map(|id| id.to_string())
}

impl Slurm {
    pub fn new(
        name: &str,
        partition: &str,
        max_in_flight: usize,
        sbatch_args: Vec<String>,
        tools_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            name: name.to_string(),
            partition: partition.to_string(),
            max_in_flight: max_in_flight.max(1),
            sbatch_args,
            tools_dir,
            changed: Arc::new(Notify::new()),
        }
    }

    /// The batch script of one attempt: environment, then the job's command.
    fn script(&self, spec: &JobSpec) -> String {
        let mut script = String::from("#!/bin/bash\n# written by prodsys for ");
        script.push_str(&spec.tag);
        script.push('\n');
        if let Some(dir) = &self.tools_dir {
            script.push_str(&format!(
                "export PATH={}:\"$PATH\"\n",
                quote(&dir.to_string_lossy())
            ));
        }
        for (key, value) in &spec.env {
            if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                script.push_str(&format!("export {key}={}\n", quote(value)));
            }
        }
        script.push_str(&format!(
            "mkdir -p {} && cd {} || exit 1\n",
            quote(&spec.output_dir.to_string_lossy()),
            quote(&spec.workdir.to_string_lossy())
        ));
        if let Some(remote) = &spec.remote {
            script.push_str(&crate::remote::export_script(remote));
            if let Some((list, text)) = &spec.input_list {
                script.push_str(&format!(
                    "cat > {} <<'PRODSYS_INPUTS'\n{text}PRODSYS_INPUTS\n",
                    quote(&list.to_string_lossy())
                ));
            }
        }
        let mut command = String::new();
        for arg in std::iter::once(&spec.program).chain(&spec.args) {
            command.push_str(&quote(arg));
            command.push(' ');
        }
        script.push_str(command.trim_end());
        script.push('\n');
        // How it ended and the CPU time of its processes, in the working
        // directory (written atomically), as the local supervisor records it.
        script.push_str(&format!(
            "rc=$?\n{{ echo \"exit $rc\"; times; }} > {exit}.tmp && mv -f {exit}.tmp {exit}\n",
            exit = supervisor::EXIT_FILE
        ));
        if spec.remote.is_some() {
            // Once the command succeeded, the upload of what it wrote.
            script.push_str("[ \"$rc\" -eq 0 ] || exit $rc\nset -e\n");
            script.push_str(&crate::remote::upload_script(&quote(
                &spec.output_dir.to_string_lossy(),
            )));
        }
        script.push_str("exit $rc\n");
        script
    }

    async fn sbatch(&self, spec: &JobSpec) -> anyhow::Result<BackendStatus> {
        tokio::fs::create_dir_all(&spec.workdir)
            .await
            .with_context(|| format!("creating {}", spec.workdir.display()))?;
        let script = spec.workdir.join("job.sh");
        tokio::fs::write(&script, self.script(spec)).await?;
        // A node that does not share the work directory has no attempt
        // directory until the script makes it: it starts, and logs, in /tmp.
        let (dir, logs) = match spec.remote {
            None => {
                let dir = spec.workdir.to_string_lossy().into_owned();
                (dir.clone(), format!("{dir}/"))
            }
            Some(_) => ("/tmp".to_string(), format!("/tmp/{}.", spec.tag)),
        };
        // Twice the estimate, and never under ten minutes: an estimate is a guess.
        let minutes = ((spec.cpu_seconds * 2.0 / 60.0).ceil() as u64).max(10);
        let mut args = vec![
            "--parsable".to_string(),
            format!("--job-name={}", spec.tag),
            format!("--chdir={dir}"),
            format!("--output={logs}stdout.log"),
            format!("--error={logs}stderr.log"),
            format!("--time={minutes}"),
            format!("--mem={}M", spec.memory_mb.max(1)),
        ];
        if !self.partition.is_empty() {
            args.push(format!("--partition={}", self.partition));
        }
        args.extend(self.sbatch_args.iter().cloned());
        args.push(script.to_string_lossy().into_owned());
        let out = run("sbatch", &args).await?;
        // `--parsable` prints `id` or `id;cluster`.
        let id = out.trim().split(';').next().unwrap_or_default().to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            bail!("sbatch printed no job id: {out:?}");
        }
        Ok(BackendStatus {
            cpu_ms: None,
            backend_job_id: id,
            state: JobState::Queued,
            raw: "PENDING".into(),
            exit_code: None,
        })
    }

    /// `squeue --json` as job id → job; all of this user's jobs squeue still lists.
    async fn squeue(&self, extra: &[String]) -> anyhow::Result<HashMap<String, Value>> {
        let mut args = vec!["--json".to_string()];
        args.extend(extra.iter().cloned());
        let out = run("squeue", &args).await?;
        let doc: Value = serde_json::from_str(&out).context("squeue --json printed no JSON")?;
        Ok(doc
            .get("jobs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|job| Some((job_id(job)?, job.clone())))
            .collect())
    }

    /// States of jobs squeue no longer lists, from accounting (or the job
    /// completion log where no accounting database runs).
    async fn sacct(&self, ids: &[String]) -> anyhow::Result<Vec<BackendStatus>> {
        let mut args = vec![
            "-P".to_string(),
            "-X".to_string(),
            "-n".to_string(),
            "-o".to_string(),
            "JobID,State,ExitCode,WorkDir".to_string(),
            "-j".to_string(),
            ids.join(","),
        ];
        let parse = |out: &str| -> Vec<(BackendStatus, String)> {
            out.lines()
                .filter_map(|line| {
                    let mut fields = line.split('|');
                    let id = fields.next()?.to_string();
                    // "CANCELLED by 0" → CANCELLED
                    let raw = fields.next()?.split_whitespace().next()?.to_string();
                    let exit = fields
                        .next()
                        .and_then(|e| e.split(':').next()?.parse().ok());
                    let workdir = fields.next().unwrap_or_default().to_string();
                    ids.contains(&id).then(|| {
                        let status = BackendStatus {
                            cpu_ms: None,
                            backend_job_id: id,
                            state: map_state(&raw),
                            raw,
                            exit_code: exit,
                        };
                        (status, workdir)
                    })
                })
                .collect()
        };
        // Accounting first; where none runs, sacct answers from the job completion log (-c).
        let mut found = match run("sacct", &args).await {
            Ok(out) => parse(&out),
            Err(_) => Vec::new(),
        };
        if found.is_empty() {
            args.insert(0, "-c".to_string());
            found = parse(&run("sacct", &args).await?);
        }
        let mut statuses = Vec::with_capacity(found.len());
        for (mut status, workdir) in found {
            status.cpu_ms = cpu_recorded(&status, &workdir).await;
            statuses.push(status);
        }
        Ok(statuses)
    }
}

/// The ID of the job named `tag` in `sacct -P -o JobID,JobName` output (the newest if several).
fn named(out: &str, tag: &str) -> Option<String> {
    out.lines()
        .filter_map(|line| {
            let (id, name) = line.split_once('|')?;
            let name = name.split('|').next()?;
            (name == tag && !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
                .then(|| id.to_string())
        })
        .max_by_key(|id| id.parse::<u64>().unwrap_or(0))
}

impl Slurm {
    /// A finished job found by its name in accounting, or in the job
    /// completion log (`sacct -c`) where no accounting database runs.
    async fn sacct_named(&self, tag: &str) -> anyhow::Result<Option<String>> {
        let mut args = vec![
            "-P".to_string(),
            "-X".to_string(),
            "-n".to_string(),
            "-o".to_string(),
            "JobID,JobName".to_string(),
            "-S".to_string(),
            "now-30days".to_string(),
            format!("--name={tag}"),
        ];
        let accounting = run("sacct", &args).await;
        if let Ok(out) = &accounting
            && let Some(id) = named(out, tag)
        {
            return Ok(Some(id));
        }
        args.insert(0, "-c".to_string());
        match run("sacct", &args).await {
            Ok(out) => Ok(named(&out, tag)),
            // Accounting answered (without the job) and there is no completion log.
            Err(_) if accounting.is_ok() => Ok(None),
            Err(error) => Err(error.context("looking for a finished job by name")),
        }
    }
}

impl Backend for Slurm {
    fn name(&self) -> &str {
        &self.name
    }

    fn capacity(&self) -> usize {
        self.max_in_flight
    }

    fn submit<'a>(&'a self, spec: &'a JobSpec) -> BoxFuture<'a, anyhow::Result<BackendStatus>> {
        Box::pin(self.sbatch(spec))
    }

    fn poll<'a>(
        &'a self,
        in_flight: &'a [String],
    ) -> BoxFuture<'a, anyhow::Result<Vec<BackendStatus>>> {
        Box::pin(async move {
            let listed = self.squeue(&[]).await?;
            let mut statuses = Vec::with_capacity(in_flight.len());
            let mut forgotten = Vec::new();
            for id in in_flight {
                match listed
                    .get(id)
                    .and_then(|job| Some((job_state(job)?, exit_code(job))))
                {
                    Some((raw, exit)) => {
                        let mut status = BackendStatus {
                            cpu_ms: None,
                            backend_job_id: id.clone(),
                            state: map_state(&raw),
                            exit_code: exit,
                            raw,
                        };
                        let workdir = listed[id]
                            .get("current_working_directory")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        status.cpu_ms = cpu_recorded(&status, workdir).await;
                        statuses.push(status);
                    }
                    None => forgotten.push(id.clone()),
                }
            }
            if !forgotten.is_empty() {
                statuses.extend(self.sacct(&forgotten).await?);
            }
            Ok(statuses)
        })
    }

    fn cancel<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for chunk in ids.chunks(500) {
                run("scancel", chunk).await?;
            }
            self.changed.notify_one();
            Ok(())
        })
    }

    fn find<'a>(&'a self, spec: &'a JobSpec) -> BoxFuture<'a, anyhow::Result<Option<String>>> {
        Box::pin(async move {
            let tag = spec.tag.as_str();
            let jobs = self.squeue(&[format!("--name={tag}")]).await?;
            if let Some(id) = jobs
                .into_iter()
                .find(|(_, job)| job.get("name").and_then(Value::as_str) == Some(tag))
                .map(|(id, _)| id)
            {
                return Ok(Some(id));
            }
            // Not queued any more: it may have run to its end while no
            // dispatcher watched. Accounting (or the completion log)
            // remembers it; then it is followed, through sacct, not run again.
            self.sacct_named(tag).await
        })
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            // Answered by slurmctld: fails while the controller is down.
            let mut args = vec!["-h".to_string(), "-o".into(), "%a".into()];
            if !self.partition.is_empty() {
                args.extend(["-p".to_string(), self.partition.clone()]);
            }
            run("sinfo", &args).await.map(|_| ())
        })
    }

    fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_states_map_to_ours() {
        assert_eq!(map_state("PENDING"), JobState::Queued);
        assert_eq!(map_state("RUNNING"), JobState::Running);
        assert_eq!(map_state("COMPLETED"), JobState::Done);
        for failed in [
            "FAILED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "CANCELLED",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        ] {
            assert_eq!(map_state(failed), JobState::Failed, "{failed}");
        }
    }

    #[test]
    fn squeue_json_of_22_05_and_later_both_read() {
        let old: Value = serde_json::json!({"job_id": 7, "job_state": "FAILED", "exit_code": 768});
        let new: Value = serde_json::json!({"job_id": 7, "job_state": ["FAILED"],
            "exit_code": {"status": ["EXITED"], "return_code": {"set": true, "number": 3}}});
        assert_eq!(job_state(&old).as_deref(), Some("FAILED"));
        assert_eq!(exit_code(&old), Some(3));
        assert_eq!(job_state(&new).as_deref(), Some("FAILED"));
        assert_eq!(exit_code(&new), Some(3));
        assert_eq!(job_id(&old).as_deref(), Some("7"));
    }

    #[test]
    fn a_finished_job_is_found_by_its_exact_name_in_sacct_output() {
        let out =
            "17|p1.CTA-000001.000001.a1\n18|p1.CTA-000001.000001.a10\n21|p1.CTA-000001.000001.a1\n";
        assert_eq!(named(out, "p1.CTA-000001.000001.a1").as_deref(), Some("21"));
        assert_eq!(
            named(out, "p1.CTA-000001.000001.a10").as_deref(),
            Some("18")
        );
        assert_eq!(named(out, "p1.CTA-000001.000002.a1"), None);
        assert_eq!(named("", "x"), None);
    }

    #[test]
    fn scripts_quote_every_argument() {
        let slurm = Slurm::new("s", "", 1, vec![], Some(PathBuf::from("/opt/tools")));
        let spec = JobSpec {
            tag: "CTA-000001.000001.a1".into(),
            production_id: "CTA-000001".into(),
            program: "prodsys-toysim".into(),
            args: vec!["--layout".into(), "it's".into()],
            env: vec![("PRODSYS_PRODUCTION_ID".into(), "CTA-000001".into())],
            workdir: PathBuf::from("/w/x"),
            output_dir: PathBuf::from("/w/x/output"),
            cpu_seconds: 1.0,
            memory_mb: 1,
            disk_mb: 1.0,
            remote: None,
            input_list: None,
        };
        let script = slurm.script(&spec);
        assert!(
            script.contains("export PATH='/opt/tools':\"$PATH\""),
            "{script}"
        );
        assert!(
            script.contains("\n'prodsys-toysim' '--layout' 'it'\\''s'\nrc=$?\n"),
            "{script}"
        );
        assert!(script.contains("cd '/w/x' || exit 1"), "{script}");
    }

    #[test]
    fn a_node_elsewhere_uploads_what_the_command_wrote() {
        let slurm = Slurm::new("s", "", 1, vec![], None);
        let spec = JobSpec {
            tag: "d.CTA-000001.000001.a1".into(),
            production_id: "CTA-000001".into(),
            program: "prodsys-toysim".into(),
            args: vec!["--out".into(), "/w/x/output".into()],
            env: vec![],
            workdir: PathBuf::from("/w/x"),
            output_dir: PathBuf::from("/w/x/output"),
            cpu_seconds: 1.0,
            memory_mb: 1,
            disk_mb: 1.0,
            remote: Some(crate::remote::RemoteOutputs {
                output_url: "root://se:1094//data/cta/CTA-000001".into(),
                manifest_url: "root://se:1094//data/.prodsys/outputs/CTA-000001/t.txt".into(),
            }),
            input_list: Some((PathBuf::from("/w/x/inputs.txt"), "root://se//a\n".into())),
        };
        let script = slurm.script(&spec);
        assert!(
            script.contains("export PRODSYS_OUTPUT_URL='root://se:1094//data/cta/CTA-000001'"),
            "{script}"
        );
        assert!(
            script.contains(
                "cat > '/w/x/inputs.txt' <<'PRODSYS_INPUTS'\nroot://se//a\nPRODSYS_INPUTS\n"
            ),
            "{script}"
        );
        assert!(
            script.contains("\n'prodsys-toysim' '--out' '/w/x/output'\nrc=$?\n"),
            "{script}"
        );
        // Uploaded only once the command succeeded.
        assert!(
            script.contains("[ \"$rc\" -eq 0 ] || exit $rc\nset -e\n"),
            "{script}"
        );
        assert!(
            script.contains("for prodsys_file in '/w/x/output'/*; do"),
            "{script}"
        );
    }
}
