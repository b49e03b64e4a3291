//! The dispatcher's gRPC `JobService`: a production's jobs as the
//! dispatcher runs them (state, attempts, installation, the WMS's own status
//! and exit code) and the tail of a job's logs where its executor keeps
//! them. What the dashboard's production page shows of each job; read-only.
//! Failures are the dispatcher's [`DispatcherError`], mapped onto gRPC codes
//! once, as in every service.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use prodsys_config::BackendSettings;
use prodsys_core::{JobState, Violation};
use prodsys_db::Db;
use prodsys_proto as pb;
use prodsys_proto::StateProto;
use tonic::{Request, Response, Status};

use crate::error::{DispatcherError, Result};
use crate::store;

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
const DEFAULT_LOG_BYTES: u32 = 4096;
const MAX_LOG_BYTES: u32 = 65536;

#[derive(Clone)]
pub struct JobsApi {
    pub db: Db,
    /// The kind of each configured installation.
    pub kinds: BTreeMap<String, pb::WmsKind>,
}

impl JobsApi {
    pub fn new(db: Db, settings: &prodsys_config::Settings) -> Self {
        let kinds = settings
            .dispatcher
            .installations()
            .into_iter()
            .map(|(name, installation)| {
                let kind = match installation {
                    BackendSettings::Local { .. } => pb::WmsKind::Local,
                    BackendSettings::Slurm { .. } => pb::WmsKind::Slurm,
                    BackendSettings::Dirac(_) => pb::WmsKind::Dirac,
                };
                (name, kind)
            })
            .collect();
        Self { db, kinds }
    }

    fn kind(&self, installation: &str) -> pb::WmsKind {
        self.kinds
            .get(installation)
            .copied()
            .unwrap_or(pb::WmsKind::Unspecified)
    }
}

fn invalid(field: &str, description: impl Into<String>) -> DispatcherError {
    DispatcherError::Invalid(vec![Violation::new(field, description)])
}

fn required_id(production_id: &str) -> Result<()> {
    if production_id.is_empty() {
        return Err(invalid("production_id", "required"));
    }
    Ok(())
}

/// DIRAC's status as the dispatcher keeps it: `Status: MinorStatus` (see
/// `dirac::Dirac::status_of`), split back into its two parts.
fn split_status(kind: pb::WmsKind, raw: &str) -> (String, String) {
    match (kind, raw.split_once(": ")) {
        (pb::WmsKind::Dirac, Some((status, minor))) => (status.to_string(), minor.to_string()),
        _ => (raw.to_string(), String::new()),
    }
}

/// The last `max` bytes of a file, lossily as UTF-8, and whether there was
/// more; `None` when it does not exist.
fn tail(path: &Path, max: u64) -> std::io::Result<Option<(String, bool)>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity((len - start) as usize);
    file.take(max).read_to_end(&mut bytes)?;
    Ok(Some((
        String::from_utf8_lossy(&bytes).into_owned(),
        start > 0,
    )))
}

impl JobsApi {
    /// A page of a production's jobs.
    async fn jobs(&self, r: pb::ListJobsRequest) -> Result<pb::ListJobsResponse> {
        required_id(&r.production_id)?;
        let after: i64 = if r.page_token.is_empty() {
            -1
        } else {
            r.page_token
                .parse::<u64>()
                .ok()
                .and_then(|n| i64::try_from(n).ok())
                .ok_or_else(|| invalid("page_token", "not a token this call gave"))?
        };
        let page = match r.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let client = self.db.client().await?;
        // Another VO's production is not found, as for every other reader.
        let caller = prodsys_auth::caller();
        let backend: Option<String> = store::production_owner(&client, &r.production_id)
            .await?
            .filter(|owner| caller.may_see(&owner.vo))
            .map(|owner| owner.backend);
        let Some(backend) = backend else {
            return Err(DispatcherError::NotFound(format!(
                "production {} has no jobs at the dispatcher (unknown, or not planned yet)",
                r.production_id
            )));
        };
        let rows = store::jobs_page(&client, &r.production_id, after, i64::from(page) + 1).await?;
        let more = rows.len() > page as usize;
        let mut jobs = Vec::with_capacity(rows.len().min(page as usize));
        for row in rows.into_iter().take(page as usize) {
            let state = row
                .state
                .parse::<JobState>()
                .map(JobState::to_proto)
                .unwrap_or(pb::JobState::Unspecified);
            // Jobs reserved before placement was recorded ran where their
            // production did; a job waiting to be placed has none.
            let installation = row.installation.unwrap_or_else(|| {
                if state == pb::JobState::Created {
                    String::new()
                } else {
                    backend.clone()
                }
            });
            let kind = self.kind(&installation);
            let (wms_status, wms_minor_status) =
                split_status(kind, row.raw_status.as_deref().unwrap_or(""));
            jobs.push(pb::Job {
                job_index: row.job_index as u64,
                state: state as i32,
                attempt: row.attempt.max(0) as u32,
                attempts_submitted: row.attempts_submitted.max(0) as u32,
                installation,
                wms: kind as i32,
                backend_job_id: row.backend_job_id.unwrap_or_default(),
                wms_status,
                wms_minor_status,
                exit_code: row.exit_code,
                run_number: row.run_number.max(0) as u64,
                updated_unix_ms: row.updated_unix_ms,
            });
        }
        let next_page_token = match (more, jobs.last()) {
            (true, Some(last)) => last.job_index.to_string(),
            _ => String::new(),
        };
        Ok(pb::ListJobsResponse {
            jobs,
            next_page_token,
        })
    }

    /// The tail of a job's logs, or why there is none to show.
    async fn log(&self, r: pb::GetJobLogRequest) -> Result<pb::JobLog> {
        required_id(&r.production_id)?;
        let index = i64::try_from(r.job_index)
            .map_err(|_| invalid("job_index", "larger than any job index"))?;
        let max = match r.max_bytes {
            0 => DEFAULT_LOG_BYTES,
            n => n.min(MAX_LOG_BYTES),
        };
        let client = self.db.client().await?;
        let place = store::job_place(&client, &r.production_id, index)
            .await?
            .filter(|place| prodsys_auth::caller().may_see(&place.vo))
            .ok_or_else(|| {
                DispatcherError::NotFound(format!(
                    "production {} has no job {}",
                    r.production_id, r.job_index
                ))
            })?;
        let attempt = place.attempt.max(0) as u32;
        let installation = place.installation;
        let workdir = place.workdir;
        let unavailable = |reason: String| pb::JobLog {
            attempt,
            available: false,
            unavailable_reason: reason,
            ..Default::default()
        };
        if self.kind(&installation) == pb::WmsKind::Dirac {
            return Ok(unavailable(format!(
                "installation {installation} is DIRAC: a job's output stays in its output sandbox"
            )));
        }
        let Some(workdir) = workdir else {
            return Ok(unavailable("the job has not been submitted yet".into()));
        };
        let dir = std::path::PathBuf::from(workdir);
        let read = tokio::task::spawn_blocking(move || {
            Ok::<_, std::io::Error>((
                tail(&dir.join("stdout.log"), u64::from(max))?,
                tail(&dir.join("stderr.log"), u64::from(max))?,
            ))
        })
        .await
        .map_err(|e| DispatcherError::Unexpected(e.into()))?
        .map_err(|e| DispatcherError::Unexpected(e.into()))?;
        let log = match read {
            (None, None) => unavailable(format!(
                "no log of attempt {attempt} on this dispatcher's host (not started yet, or \
                 written on another host)"
            )),
            (stdout, stderr) => {
                let (stdout_tail, stdout_truncated) = stdout.unwrap_or_default();
                let (stderr_tail, stderr_truncated) = stderr.unwrap_or_default();
                pb::JobLog {
                    attempt,
                    available: true,
                    unavailable_reason: String::new(),
                    stdout_tail,
                    stdout_truncated,
                    stderr_tail,
                    stderr_truncated,
                }
            }
        };
        Ok(log)
    }
}

/// The handlers: check the request, answer it, map a failure onto its gRPC
/// code once (`From<DispatcherError> for Status`).
#[tonic::async_trait]
impl pb::job_service_server::JobService for JobsApi {
    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        Ok(Response::new(self.jobs(request.into_inner()).await?))
    }

    async fn get_job_log(
        &self,
        request: Request<pb::GetJobLogRequest>,
    ) -> Result<Response<pb::JobLog>, Status> {
        prodsys_server::input::checked(request.get_ref())?;
        Ok(Response::new(self.log(request.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirac_statuses_split_into_status_and_minor_status() {
        assert_eq!(
            split_status(
                pb::WmsKind::Dirac,
                "Failed: Application Finished With Errors"
            ),
            (
                "Failed".to_string(),
                "Application Finished With Errors".to_string()
            )
        );
        assert_eq!(
            split_status(pb::WmsKind::Dirac, "Received"),
            ("Received".to_string(), String::new())
        );
        assert_eq!(
            split_status(pb::WmsKind::Slurm, "NODE_FAIL: x"),
            ("NODE_FAIL: x".to_string(), String::new())
        );
    }

    #[test]
    fn a_tail_is_the_end_of_the_file_and_says_when_there_was_more() {
        let dir = std::env::temp_dir().join(format!("prodsys-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stdout.log");
        std::fs::write(&path, "first line\nsecond line\n").unwrap();
        assert_eq!(
            tail(&path, 12).unwrap(),
            Some(("second line\n".to_string(), true))
        );
        assert_eq!(
            tail(&path, 100).unwrap(),
            Some(("first line\nsecond line\n".to_string(), false))
        );
        assert_eq!(tail(&dir.join("absent.log"), 100).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
