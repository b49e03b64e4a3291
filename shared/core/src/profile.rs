//! Production profiles: one data file per kind of production. A profile says
//! which parameters a request takes (a JSON Schema plus cross-field rules),
//! which of them make two requests "the same simulation" (the fingerprint),
//! how the production splits into jobs, what a job costs, which command a job
//! runs and how its outputs are named. A new observatory adds a file, not code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::Violation;
use crate::container::{
    ContainerPolicy, Containers, RecordedTemplates, ResolvedTemplate, TEMPLATE_KEY, TemplateError,
};
use crate::inputs::{INPUT_VARIABLES, InputSpec};
use crate::period::{Directions, Expansion, Period, PeriodError, PeriodSpec};

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot read profiles from {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no profiles found in {0}")]
    Empty(PathBuf),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: String,
    description: String,
    /// Prefix of production IDs (`CTA` → `CTA-000042`).
    id_prefix: String,
    /// Virtual organisations allowed to use the profile; empty means any.
    #[serde(default)]
    vos: Vec<String>,
    /// JSON Schema of the request parameters.
    parameters: Value,
    #[serde(default)]
    rules: Vec<Rule>,
    /// Parameters that together define "the same simulation".
    identity: Vec<String>,
    /// Identity parameters that only set how much is simulated (`n_showers`):
    /// differing only in these is an overlap, not a new simulation.
    #[serde(default)]
    statistics: Vec<String>,
    /// Identity ranges (`energy_min_tev`..`energy_max_tev`): intersecting
    /// ranges overlap, disjoint ones are a different simulation.
    #[serde(default)]
    ranges: Vec<Range>,
    #[serde(default)]
    derived: BTreeMap<String, Derived>,
    /// How outputs are catalogued: the type of every output metadata key and
    /// which keys make a file's simulation identity.
    #[serde(default)]
    catalog: Option<CatalogSpec>,
    /// How a production splits into jobs; a chained profile (`inputs`)
    /// splits by its input files instead.
    #[serde(default)]
    split: Option<Split>,
    /// The files a chained production's jobs take as input (see [`crate::inputs`]).
    #[serde(default)]
    inputs: Option<InputSpec>,
    resources: Resources,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    /// Most jobs one production of this profile may have.
    #[serde(default = "default_max_jobs")]
    max_jobs: u64,
    /// How jobs run in containers, when they do: the runtimes' command lines
    /// and the images each VO may run.
    #[serde(default)]
    containers: Option<ContainerPolicy>,
    job: JobTemplate,
    outputs: OutputTemplate,
    /// Where the outputs are forwarded by default.
    #[serde(default)]
    forward: Forward,
    /// Identity parameters that count only when a request gives them (the
    /// atmosphere model an observation period sets): a request without one
    /// keeps the fingerprint it had before the key was added.
    #[serde(default)]
    identity_when_given: Vec<String>,
    /// How requests name an observation period (see [`crate::period`]).
    #[serde(default)]
    periods: Option<PeriodSpec>,
}

/// A profile's default forwarding destinations: fixed names, and/or the
/// value of a parameter that names one (KM3NeT's `output_storage`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    #[serde(default)]
    pub destinations: Vec<String>,
    /// A string parameter whose value is a destination's name.
    #[serde(default)]
    pub parameter: Option<String>,
}

fn default_max_attempts() -> u32 {
    3
}

/// A profile's `max_jobs` when its file does not say.
pub const DEFAULT_MAX_JOBS: u64 = 1_000_000;

fn default_max_jobs() -> u64 {
    DEFAULT_MAX_JOBS
}

/// A cross-field rule a JSON Schema cannot say.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// `left` < `right`.
    LessThan { left: String, right: String },
    /// `left` ≤ `right`.
    AtMost { left: String, right: String },
    /// `field` > 0 whenever parameter `when` is one of `values`.
    PositiveWhen {
        field: String,
        when: String,
        values: Vec<Value>,
    },
}

/// A pair of identity parameters bounding a range.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub min: String,
    pub max: String,
}

/// A value computed from a parameter by a lookup table (pointing North → azimuth 180).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Derived {
    pub from: String,
    pub map: BTreeMap<String, Value>,
    /// A parameter that, when given, replaces the looked-up value (a derived
    /// container template overriding its image, say).
    #[serde(default)]
    pub unless: Option<String>,
}

/// How a production splits into jobs: `total` units in jobs of `per_job`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub total: String,
    pub per_job: String,
}

/// Cost of one job as a function of its units (showers, events).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub cpu_seconds_base: f64,
    pub cpu_seconds_per_unit: f64,
    pub memory_mb: u64,
    #[serde(default)]
    pub disk_mb_base: f64,
    pub disk_mb_per_unit: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTemplate {
    /// Program and arguments; `{name}` placeholders are filled per job. In a
    /// container job, the arguments after the template's entrypoint.
    pub command: Vec<String>,
    /// The job runs the request's container template (the profile's
    /// `containers` section says how).
    #[serde(default)]
    pub container: bool,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputTemplate {
    /// Directory, relative to the job's working directory, whose files are the outputs.
    pub dir: String,
    /// Logical file name template.
    pub lfn: String,
    /// Metadata attached to every output file (values are templates).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// Variables every job template may use besides the parameters.
pub const JOB_VARIABLES: &[&str] = &[
    "production_id",
    "vo",
    "job_index",
    "run_number",
    "seed",
    "job_units",
    "attempt",
    "output_dir",
    "output_url",
    "memory_mb",
];
/// Variables the LFN and metadata templates may use besides the job variables.
pub const OUTPUT_VARIABLES: &[&str] = &["file_name", "run_group"];

/// A loaded, checked profile.
#[derive(Debug)]
pub struct Profile {
    file: ProfileFile,
    validator: jsonschema::Validator,
    containers: Option<Containers>,
    /// SHA-256 of the file's text, so a production's record names exactly
    /// the profile it was checked against.
    content_sha256: String,
}

/// What one job runs: program, arguments and environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCommand {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// One job of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedJob {
    pub index: u64,
    pub run_number: u64,
    pub seed: u64,
    pub units: u64,
}

/// The split of a production into jobs, computed on demand so a million-job
/// plan never sits in memory.
#[derive(Debug, Clone)]
pub struct JobPlan {
    pub total_units: u64,
    pub per_job: u64,
    pub job_count: u64,
    pub run_number_offset: u64,
    fingerprint: String,
}

/// What one job is expected to need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResourceEstimate {
    pub cpu_seconds: f64,
    pub memory_mb: u64,
    pub disk_mb: f64,
}

/// A plan's resource estimate as the API shows it: per job and in all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanEstimate {
    pub cpu_seconds_per_job: f64,
    pub cpu_hours_total: f64,
    pub memory_mb: u64,
    pub disk_mb_per_job: f64,
    pub disk_gb_total: f64,
}

impl JobPlan {
    /// The plan of a chained production when it is accepted: no job yet
    /// (they are made as its input files arrive).
    pub fn empty(fingerprint: &str, run_number_offset: u64) -> Self {
        Self {
            total_units: 0,
            per_job: 1,
            job_count: 0,
            run_number_offset,
            fingerprint: fingerprint.to_string(),
        }
    }

    pub fn job(&self, index: u64) -> PlannedJob {
        let start = index * self.per_job;
        let units = self.per_job.min(self.total_units - start);
        let run_number = self.run_number_offset + index + 1;
        PlannedJob {
            index,
            run_number,
            seed: seed_for(&self.fingerprint, run_number),
            units,
        }
    }

    pub fn jobs(&self) -> impl Iterator<Item = PlannedJob> + '_ {
        (0..self.job_count).map(|i| self.job(i))
    }
}

/// Job `index` of a chained production: run numbers follow its offset as a
/// split production's do; its units are its input files.
pub fn input_job(fingerprint: &str, run_number_offset: u64, index: u64, files: u64) -> PlannedJob {
    let run_number = run_number_offset + index + 1;
    PlannedJob {
        index,
        run_number,
        seed: seed_for(fingerprint, run_number),
        units: files,
    }
}

/// A reproducible seed per run: different for every run of an identity, the
/// same whenever the same run is simulated again. Kept below CORSIKA's limit.
fn seed_for(fingerprint: &str, run_number: u64) -> u64 {
    let digest = Sha256::digest(format!("{fingerprint}:{run_number}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) % 900_000_000 + 1
}

impl Profile {
    /// Parses and checks a profile; `path` only names it in errors.
    pub fn from_json(path: &Path, text: &str) -> Result<Self, ProfileError> {
        let invalid = |reason: String| ProfileError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let file: ProfileFile = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let validator = jsonschema::validator_for(&file.parameters)
            .map_err(|e| invalid(format!("parameters is not a valid JSON Schema: {e}")))?;
        let mut properties: BTreeSet<String> = file
            .parameters
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        if file.containers.is_some() {
            // The resolved template travels with the parameters.
            properties.insert(TEMPLATE_KEY.to_string());
        }
        let known = |name: &str| properties.contains(name);
        if let Some(parameter) = &file.forward.parameter
            && !known(parameter)
        {
            return Err(invalid(format!(
                "forward.parameter {parameter:?} is not a parameter"
            )));
        }
        for key in &file.identity {
            // `template.version` names a member of an object parameter.
            if !known(key.split('.').next().unwrap_or(key)) {
                return Err(invalid(format!("identity key {key:?} is not a parameter")));
            }
        }
        for key in &file.identity_when_given {
            if !known(key) || file.identity.contains(key) {
                return Err(invalid(format!(
                    "identity_when_given key {key:?} is not a parameter, or is in identity already"
                )));
            }
        }
        if let Some(periods) = &file.periods {
            let needed = std::iter::once(periods.parameter.as_str())
                .chain(crate::period::CONDITIONS.iter().copied())
                .chain([periods.zenith.as_str()])
                .chain(periods.dates.as_deref());
            if let Some(missing) = needed.into_iter().find(|k| !known(k)) {
                return Err(invalid(format!("periods: {missing:?} is not a parameter")));
            }
            match file.derived.get(&periods.azimuth) {
                Some(derived) if derived.map.values().all(Value::is_number) => {}
                _ => {
                    return Err(invalid(format!(
                        "periods.azimuth {:?} must be a derived value mapping names to numbers",
                        periods.azimuth
                    )));
                }
            }
            if let Some(o) = periods
                .overridable
                .iter()
                .find(|o| !crate::period::CONDITIONS.contains(&o.as_str()))
            {
                return Err(invalid(format!(
                    "periods.overridable {o:?} is not a condition a period sets"
                )));
            }
        }
        let in_identity = |name: &String| file.identity.contains(name);
        for key in file
            .statistics
            .iter()
            .chain(file.ranges.iter().flat_map(|r| [&r.min, &r.max]))
        {
            if !in_identity(key) {
                return Err(invalid(format!(
                    "statistics/range field {key:?} is not an identity key"
                )));
            }
        }
        match (&file.split, &file.inputs) {
            (Some(split), None) => {
                for key in [&split.total, &split.per_job] {
                    if !known(key) {
                        return Err(invalid(format!("split field {key:?} is not a parameter")));
                    }
                }
            }
            (None, Some(inputs)) => inputs.check(known).map_err(invalid)?,
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "split and inputs exclude each other: a chained profile's jobs follow its input files".into(),
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "a profile needs split (units in jobs) or inputs (a chained production)".into(),
                ));
            }
        }
        for rule in &file.rules {
            let fields: Vec<&String> = match rule {
                Rule::LessThan { left, right } | Rule::AtMost { left, right } => {
                    vec![left, right]
                }
                Rule::PositiveWhen { field, when, .. } => vec![field, when],
            };
            if let Some(f) = fields.into_iter().find(|f| !known(f)) {
                return Err(invalid(format!("rule names unknown parameter {f:?}")));
            }
        }
        for (name, derived) in &file.derived {
            let overriding = derived
                .unless
                .as_deref()
                .map(|u| u.split('.').next().unwrap_or(u));
            if let Some(key) = overriding.filter(|k| !known(k)) {
                return Err(invalid(format!(
                    "derived {name:?} is overridden by unknown parameter {key:?}"
                )));
            }
            if !known(&derived.from) {
                return Err(invalid(format!(
                    "derived {name:?} is computed from unknown parameter {:?}",
                    derived.from
                )));
            }
        }
        if file.job.command.is_empty() && !file.job.container {
            return Err(invalid("job.command is empty".into()));
        }
        if file.job.container && file.containers.is_none() {
            return Err(invalid(
                "job.container needs a containers section (runtimes, allowed_images)".into(),
            ));
        }
        if !file.id_prefix.chars().all(|c| c.is_ascii_uppercase()) || file.id_prefix.is_empty() {
            return Err(invalid(format!(
                "id_prefix {:?} must be upper-case letters",
                file.id_prefix
            )));
        }
        // Outputs are collected from this directory: it must stay inside
        // the job's working directory, whatever the job does.
        let output_dir = std::path::Path::new(&file.outputs.dir);
        if file.outputs.dir.is_empty()
            || !output_dir
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(invalid(format!(
                "outputs.dir {:?} must be a relative path without \"..\" inside the job's directory",
                file.outputs.dir
            )));
        }
        if file.max_attempts == 0 {
            return Err(invalid("max_attempts must be at least 1".into()));
        }
        if file.max_jobs == 0 {
            return Err(invalid("max_jobs must be at least 1".into()));
        }
        let job_vars: BTreeSet<&str> = properties
            .iter()
            .map(String::as_str)
            .chain(file.derived.keys().map(String::as_str))
            .chain(JOB_VARIABLES.iter().copied())
            .chain(
                INPUT_VARIABLES
                    .iter()
                    .copied()
                    .filter(|_| file.inputs.is_some()),
            )
            .collect();
        let output_vars: BTreeSet<&str> = job_vars
            .iter()
            .copied()
            .chain(OUTPUT_VARIABLES.iter().copied())
            .collect();
        let parameter_vars: BTreeSet<&str> = properties
            .iter()
            .map(String::as_str)
            .chain(file.derived.keys().map(String::as_str))
            .collect();
        let per_file: Vec<&str> = file
            .catalog
            .iter()
            .flat_map(|c| c.per_file.keys().map(String::as_str))
            .collect();
        if let Some(inputs) = &file.inputs {
            for template in inputs.metadata.values() {
                check_template(template, &parameter_vars)
                    .map_err(|e| invalid(format!("inputs.metadata: {e}")))?;
            }
        }
        if let Some(catalog) = &file.catalog {
            check_catalog(catalog, &file.outputs, &properties, &parameter_vars)
                .map_err(|e| invalid(format!("catalog: {e}")))?;
        }
        let output_vars: BTreeSet<&str> = output_vars.into_iter().chain(per_file).collect();
        let runtime_templates = file
            .containers
            .iter()
            .flat_map(|c| c.runtimes.values().flatten());
        let job_templates = file
            .job
            .command
            .iter()
            .chain(file.job.env.values())
            .chain(runtime_templates);
        for template in job_templates {
            check_template(template, &job_vars).map_err(|e| invalid(format!("job: {e}")))?;
        }
        let output_templates =
            std::iter::once(&file.outputs.lfn).chain(file.outputs.metadata.values());
        for template in output_templates {
            check_template(template, &output_vars).map_err(|e| invalid(format!("outputs: {e}")))?;
        }
        let containers = file.containers.clone().map(|policy| Containers {
            policy,
            templates: BTreeMap::new(),
        });
        Ok(Self {
            file,
            validator,
            containers,
            content_sha256: hex::encode(Sha256::digest(text.as_bytes())),
        })
    }

    /// SHA-256 of the profile file's text, as 64 lowercase hex digits.
    pub fn content_sha256(&self) -> &str {
        &self.content_sha256
    }

    /// The container templates of this profile, when its jobs run in containers.
    pub fn containers(&self) -> Option<&Containers> {
        self.containers.as_ref()
    }

    /// The request's template resolved (shipped, recorded or derived now), or
    /// the violations that refuse it; `Ok(None)` for a profile without
    /// containers. See [`Containers::resolve`] for `recorded`.
    pub fn resolve_template(
        &self,
        vo: &str,
        parameters: &Value,
        recorded: Option<&dyn RecordedTemplates>,
    ) -> Result<Option<ResolvedTemplate>, Vec<Violation>> {
        match &self.containers {
            Some(containers) => containers.resolve(vo, parameters, recorded),
            None => Ok(None),
        }
    }

    /// The parameters with the resolved template, as the production carries them.
    pub fn with_template(&self, mut parameters: Value, template: &ResolvedTemplate) -> Value {
        if let Some(object) = parameters.as_object_mut() {
            object.insert(
                TEMPLATE_KEY.to_string(),
                serde_json::to_value(template).unwrap_or_default(),
            );
        }
        parameters
    }

    /// Program, arguments and environment of one job, from its variables
    /// (see [`Profile::job_variables`]) and its production's parameters.
    pub fn job_command(
        &self,
        parameters: &Value,
        vars: &BTreeMap<String, String>,
    ) -> Result<JobCommand, String> {
        let job = &self.file.job;
        let mut args: Vec<String> = Vec::with_capacity(job.command.len());
        for t in &job.command {
            // A chained job's inputs, one argument each.
            match vars.get("input_files") {
                Some(files) if t == "{input_files}" => {
                    args.extend(files.split(' ').filter(|f| !f.is_empty()).map(String::from))
                }
                _ => args.push(render(t, vars)),
            }
        }
        // A variable over an optional parameter the request leaves out
        // (the observation period) is not set.
        let env: Vec<(String, String)> = job
            .env
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), render_known(v, vars)?)))
            .collect();
        let mut command = if job.container {
            let containers = self
                .containers
                .as_ref()
                .ok_or("the profile has no containers section")?;
            let template: ResolvedTemplate = parameters
                .get(TEMPLATE_KEY)
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| format!("the production's template cannot be read: {e}"))?
                .ok_or("the production carries no resolved container template")?;
            containers.command(&template, vars, &env, args)?
        } else {
            args
        }
        .into_iter();
        let program = command.next().unwrap_or_default();
        // A container's environment is passed on its command line.
        let env = if job.container { Vec::new() } else { env };
        Ok(JobCommand {
            program,
            args: command.collect(),
            env,
        })
    }

    pub fn name(&self) -> &str {
        &self.file.name
    }

    /// Where a request's outputs go: the profile's defaults (unless
    /// `replace`) and the request's `forward`, each once, in that order; a
    /// name that is not among `configured` is a violation of the field that
    /// named it. A deployment with no destination configured forwards
    /// nothing and ignores the profile's defaults (outputs stay where the
    /// jobs wrote them), but still refuses a request that asks for one.
    pub fn destinations(
        &self,
        parameters: &Value,
        forward: &[String],
        replace: bool,
        configured: &[String],
    ) -> Result<Vec<String>, Vec<Violation>> {
        let defaults = if replace || configured.is_empty() {
            Vec::new()
        } else {
            self.default_destinations(parameters)
        };
        let asked = forward
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("forward[{i}]"), d.clone()));
        let mut resolved: Vec<String> = Vec::new();
        let mut violations = Vec::new();
        for (field, name) in defaults.into_iter().chain(asked) {
            if !configured.contains(&name) {
                let known = if configured.is_empty() {
                    "none is configured".to_string()
                } else {
                    format!("this deployment has {}", configured.join(", "))
                };
                violations.push(Violation::new(
                    &field,
                    format!("unknown forwarding destination {name:?}; {known}"),
                ));
            } else if !resolved.contains(&name) {
                resolved.push(name);
            }
        }
        if violations.is_empty() {
            Ok(resolved)
        } else {
            Err(violations)
        }
    }

    /// The destinations the profile forwards outputs to by default, each
    /// with the request field that named it (`forward` for the profile's
    /// fixed ones, `parameters.<name>` for one a parameter names).
    pub fn default_destinations(&self, parameters: &Value) -> Vec<(String, String)> {
        let forward = &self.file.forward;
        let mut all: Vec<(String, String)> = forward
            .destinations
            .iter()
            .map(|d| ("forward".to_string(), d.clone()))
            .collect();
        if let Some(parameter) = &forward.parameter
            && let Some(name) = parameters.get(parameter).and_then(Value::as_str)
        {
            all.push((format!("parameters.{parameter}"), name.to_string()));
        }
        all
    }

    pub fn description(&self) -> &str {
        &self.file.description
    }

    pub fn id_prefix(&self) -> &str {
        &self.file.id_prefix
    }

    pub fn vos(&self) -> &[String] {
        &self.file.vos
    }

    pub fn identity(&self) -> &[String] {
        &self.file.identity
    }

    /// The JSON Schema of the parameters.
    pub fn parameters_schema(&self) -> &Value {
        &self.file.parameters
    }

    pub fn max_attempts(&self) -> u32 {
        self.file.max_attempts
    }

    /// Most jobs one production of this profile may have.
    pub fn max_jobs(&self) -> u64 {
        self.file.max_jobs
    }

    /// The violation of a plan with more jobs than allowed: the smaller of the
    /// profile's `max_jobs` and the deployment's `ceiling`, named on the
    /// split's total parameter.
    pub fn check_job_count(&self, plan: &JobPlan, ceiling: u64) -> Option<Violation> {
        let split = self.file.split.as_ref()?;
        let (limit, whose) = if ceiling < self.file.max_jobs {
            (
                ceiling,
                "this deployment allows (dispatcher.max_jobs_per_production)",
            )
        } else {
            (self.file.max_jobs, "this profile allows (max_jobs)")
        };
        (plan.job_count > limit).then(|| {
            Violation::new(
                format!("parameters.{}", split.total),
                format!(
                    "gives {} jobs, more than the {limit} {whose}",
                    plan.job_count
                ),
            )
        })
    }

    pub fn job_template(&self) -> &JobTemplate {
        &self.file.job
    }

    pub fn outputs(&self) -> &OutputTemplate {
        &self.file.outputs
    }

    /// How the production splits into jobs; `None` for a chained profile.
    pub fn split(&self) -> Option<&Split> {
        self.file.split.as_ref()
    }

    /// Every reason `parameters` cannot be accepted by this profile for `vo`.
    pub fn validate(&self, vo: &str, parameters: &Value) -> Vec<Violation> {
        let mut violations = Vec::new();
        if !self.file.vos.is_empty() && !self.file.vos.iter().any(|v| v == vo) {
            violations.push(Violation::new(
                "vo",
                format!(
                    "profile {} is for {}, not {vo:?}",
                    self.file.name,
                    self.file.vos.join(", ")
                ),
            ));
        }
        if !parameters.is_object() {
            violations.push(Violation::new("parameters", "must be a JSON object"));
            return violations;
        }
        // Nights are nights of a period: without one they mean nothing.
        if let Some(spec) = &self.file.periods
            && let Some(dates) = &spec.dates
            && parameters.get(dates).is_some()
            && parameters.get(&spec.parameter).is_none()
        {
            violations.push(Violation::new(
                format!("parameters.{dates}"),
                format!(
                    "dates are checked against an observation period's validity; \
                     name one in parameters.{}",
                    spec.parameter
                ),
            ));
        }
        for error in self.validator.iter_errors(parameters) {
            let pointer = error.instance_path().to_string();
            let mut field = pointer_to_field(&pointer);
            let description = match error.kind() {
                jsonschema::error::ValidationErrorKind::Required { property } => {
                    let name = property.as_str().unwrap_or_default();
                    field = format!("{field}.{name}");
                    "is required".to_string()
                }
                jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                    for name in unexpected {
                        violations.push(Violation::new(
                            format!("{field}.{name}"),
                            format!("is not a parameter of profile {}", self.file.name),
                        ));
                    }
                    continue;
                }
                _ => error.to_string(),
            };
            violations.push(Violation::new(field, description));
        }
        for rule in &self.file.rules {
            if let Some(v) = check_rule(rule, parameters) {
                violations.push(v);
            }
        }
        if violations.is_empty()
            && let Err(refused) = self.resolve_template(vo, parameters, None)
        {
            violations.extend(refused);
        }
        violations
    }

    /// SHA-256 (hex) of the canonical JSON of the profile name and the identity parameters.
    pub fn fingerprint(&self, parameters: &Value) -> String {
        self.identity_digest("identity", &BTreeSet::new(), parameters)
    }

    /// SHA-256 (hex) of `{"profile": name, <label>: identity}`, the identity
    /// parameters but `left_out` in canonical JSON: every fingerprint's form.
    fn identity_digest(
        &self,
        label: &str,
        left_out: &BTreeSet<&str>,
        parameters: &Value,
    ) -> String {
        let mut identity = Map::new();
        let given = self
            .file
            .identity_when_given
            .iter()
            .filter(|k| parameters.get(k.as_str()).is_some_and(|v| !v.is_null()));
        for key in self
            .file
            .identity
            .iter()
            .chain(given)
            .filter(|k| !left_out.contains(k.as_str()))
        {
            let value = parameters.get(key).or_else(|| {
                key.contains('.')
                    .then(|| parameters.pointer(&format!("/{}", key.replace('.', "/"))))
                    .flatten()
            });
            identity.insert(key.clone(), canonical(value.unwrap_or(&Value::Null)));
        }
        let mut doc = Map::new();
        doc.insert("profile".into(), Value::String(self.file.name.clone()));
        doc.insert(label.into(), Value::Object(identity));
        hex::encode(Sha256::digest(Value::Object(doc).to_string().as_bytes()))
    }

    /// Fingerprint of the identity without its statistics and ranges: equal
    /// for productions that differ only in how much or which range they simulate.
    pub fn base_fingerprint(&self, parameters: &Value) -> String {
        let varying: BTreeSet<&str> = self
            .file
            .statistics
            .iter()
            .chain(self.file.ranges.iter().flat_map(|r| [&r.min, &r.max]))
            .map(String::as_str)
            .collect();
        self.identity_digest("base", &varying, parameters)
    }

    /// How `mine` overlaps `theirs`, two requests with the same base
    /// fingerprint; `None` when a range is disjoint (a different simulation).
    pub fn overlap(&self, mine: &Value, theirs: &Value) -> Option<String> {
        let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
        let mut parts = Vec::new();
        for range in &self.file.ranges {
            let (a0, a1) = (num(mine, &range.min)?, num(mine, &range.max)?);
            let (b0, b1) = (num(theirs, &range.min)?, num(theirs, &range.max)?);
            if a0 >= b1 || b0 >= a1 {
                return None;
            }
            if (a0, a1) != (b0, b1) {
                parts.push(format!(
                    "{}..{} {a0}..{a1} intersects {b0}..{b1}",
                    range.min, range.max
                ));
            }
        }
        for key in &self.file.statistics {
            let (a, b) = (mine.get(key), theirs.get(key));
            if a != b {
                let show = |v: Option<&Value>| v.map(render_value).unwrap_or_default();
                parts.push(format!("{key} {} (existing {})", show(a), show(b)));
            }
        }
        if parts.is_empty() {
            parts.push("same identity".into());
        }
        Some(parts.join("; "))
    }

    /// The job plan of a validated request; `None` if the split fields are not positive integers.
    pub fn plan(
        &self,
        parameters: &Value,
        fingerprint: &str,
        run_number_offset: u64,
    ) -> Option<JobPlan> {
        let split = self.file.split.as_ref()?;
        let total_units = parameters.get(&split.total)?.as_u64()?;
        let per_job = parameters.get(&split.per_job)?.as_u64()?;
        if total_units == 0 || per_job == 0 {
            return None;
        }
        Some(JobPlan {
            total_units,
            per_job,
            job_count: total_units.div_ceil(per_job),
            run_number_offset,
            fingerprint: fingerprint.to_string(),
        })
    }

    pub fn estimate(&self, units: u64) -> ResourceEstimate {
        let r = &self.file.resources;
        ResourceEstimate {
            cpu_seconds: r.cpu_seconds_base + r.cpu_seconds_per_unit * units as f64,
            memory_mb: r.memory_mb,
            disk_mb: r.disk_mb_base + r.disk_mb_per_unit * units as f64,
        }
    }

    /// The input files of a chained profile's jobs: where they come from and
    /// how they are grouped; `None` for a profile that splits by units.
    pub fn inputs(&self) -> Option<&InputSpec> {
        self.file.inputs.as_ref()
    }

    /// A chained production's metadata conditions on its input files,
    /// rendered from its parameters.
    pub fn input_conditions(&self, parameters: &Value) -> BTreeMap<String, String> {
        self.inputs()
            .map(|i| i.conditions(&self.parameter_variables(parameters)))
            .unwrap_or_default()
    }

    /// The metadata every output file of a production with `parameters`
    /// carries, by key: the value when the parameters alone fix it, `None`
    /// when it differs per job or file (a run number, a per-file NSB level).
    pub fn output_metadata_of(&self, parameters: &Value) -> BTreeMap<String, Option<String>> {
        let vars = self.parameter_variables(parameters);
        self.file
            .outputs
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), render_known(v, &vars)))
            .collect()
    }

    /// Template variables from the parameters and the derived values alone.
    fn parameter_variables(&self, parameters: &Value) -> BTreeMap<String, String> {
        let mut vars = BTreeMap::new();
        if let Some(object) = parameters.as_object() {
            for (key, value) in object {
                if let Some(inner) = value.as_object() {
                    for (sub, v) in inner {
                        vars.insert(format!("{key}.{sub}"), render_value(v));
                    }
                }
                vars.insert(key.clone(), render_value(value));
            }
        }
        for (name, derived) in &self.file.derived {
            let source = parameters
                .get(&derived.from)
                .map(render_value)
                .unwrap_or_default();
            let chosen = derived
                .unless
                .as_ref()
                .and_then(|key| parameters.pointer(&format!("/{}", key.replace('.', "/"))))
                .or_else(|| derived.map.get(&source));
            if let Some(value) = chosen {
                vars.insert(name.clone(), render_value(value));
            }
        }
        vars
    }

    /// What the whole plan needs: the sum over its jobs.
    pub fn estimate_plan(&self, plan: &JobPlan) -> ResourceEstimate {
        let r = &self.file.resources;
        let jobs = plan.job_count as f64;
        let units = plan.total_units as f64;
        ResourceEstimate {
            cpu_seconds: r.cpu_seconds_base * jobs + r.cpu_seconds_per_unit * units,
            memory_mb: r.memory_mb,
            disk_mb: r.disk_mb_base * jobs + r.disk_mb_per_unit * units,
        }
    }

    /// The estimate of a plan as the API shows it: per job and in all.
    pub fn resource_estimate(&self, plan: &JobPlan) -> PlanEstimate {
        let per_job = self.estimate(plan.per_job);
        let total = self.estimate_plan(plan);
        PlanEstimate {
            cpu_seconds_per_job: per_job.cpu_seconds,
            cpu_hours_total: total.cpu_seconds / 3600.0,
            memory_mb: per_job.memory_mb,
            disk_mb_per_job: per_job.disk_mb,
            disk_gb_total: total.disk_mb / 1024.0,
        }
    }

    /// Template variables of one job: the parameters, the derived values and the job's own.
    pub fn job_variables(
        &self,
        parameters: &Value,
        production_id: &str,
        vo: &str,
        job: &PlannedJob,
        attempt: u32,
        output_dir: &str,
    ) -> BTreeMap<String, String> {
        let mut vars = self.parameter_variables(parameters);
        vars.insert("production_id".into(), production_id.into());
        vars.insert("vo".into(), vo.into());
        vars.insert("job_index".into(), job.index.to_string());
        vars.insert("run_number".into(), job.run_number.to_string());
        vars.insert("seed".into(), job.seed.to_string());
        vars.insert("job_units".into(), job.units.to_string());
        vars.insert("attempt".into(), attempt.to_string());
        vars.insert("output_dir".into(), output_dir.into());
        // Where the outputs go: the directory itself, unless the job runs
        // where that is not seen (the dispatcher then gives the URL on its
        // production's storage).
        vars.insert("output_url".into(), format!("file://{output_dir}"));
        vars.insert(
            "memory_mb".into(),
            self.file.resources.memory_mb.to_string(),
        );
        vars.insert(
            "run_group".into(),
            format!("{:03}xxx", job.run_number / 1000),
        );
        vars
    }
}

/// Fills `{name}` placeholders from `vars`; an unknown name is left as is (profiles are checked at load).
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        match rest[start..].find('}') {
            Some(end) => {
                let name = &rest[start + 1..start + end];
                match vars.get(name) {
                    Some(value) => out.push_str(value),
                    None => out.push_str(&rest[start..=start + end]),
                }
                rest = &rest[start + end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn check_template(template: &str, known: &BTreeSet<&str>) -> Result<(), String> {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            return Err(format!("unclosed placeholder in {template:?}"));
        };
        let name = &rest[start + 1..start + end];
        // `{software.corsika}` names a member of an object parameter.
        let head = name.split('.').next().unwrap_or(name);
        if !known.contains(name) && !known.contains(head) {
            return Err(format!("unknown placeholder {{{name}}} in {template:?}"));
        }
        rest = &rest[start + end + 1..];
    }
    Ok(())
}

/// A parameter as it appears in a command line or a name: arrays comma-joined,
/// integral numbers without a fraction.
fn render_value(value: &Value) -> String {
    match canonical(value) {
        Value::String(s) => s,
        Value::Array(items) => items.iter().map(render_value).collect::<Vec<_>>().join(","),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// JSON with integral floats written as integers, so `20` and `20.0` fingerprint alike.
/// (Object keys are already sorted: serde_json's map is ordered.)
fn canonical(value: &Value) -> Value {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => value.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), canonical(v))).collect())
        }
        other => other.clone(),
    }
}

/// `/energy/0` → `parameters.energy.0`.
fn pointer_to_field(pointer: &str) -> String {
    let mut field = String::from("parameters");
    for part in pointer.split('/').skip(1) {
        field.push('.');
        field.push_str(&part.replace("~1", "/").replace("~0", "~"));
    }
    field
}

fn check_rule(rule: &Rule, params: &Value) -> Option<Violation> {
    let num = |name: &str| params.get(name).and_then(Value::as_f64);
    match rule {
        Rule::LessThan { left, right } => {
            let (l, r) = (num(left)?, num(right)?);
            (l >= r).then(|| {
                Violation::new(
                    format!("parameters.{left}"),
                    format!("must be less than {right} ({l} >= {r})"),
                )
            })
        }
        Rule::AtMost { left, right } => {
            let (l, r) = (num(left)?, num(right)?);
            (l > r).then(|| {
                Violation::new(
                    format!("parameters.{left}"),
                    format!("must be at most {right} ({l} > {r})"),
                )
            })
        }
        Rule::PositiveWhen {
            field,
            when,
            values,
        } => {
            let selector = params.get(when)?;
            if !values.contains(selector) {
                return None;
            }
            let value = num(field)?;
            (value <= 0.0).then(|| {
                Violation::new(
                    format!("parameters.{field}"),
                    format!("must be greater than 0 when {when} is {selector}"),
                )
            })
        }
    }
}

/// A request's profile, the observation period it names (if any) and the
/// productions it becomes.
pub type Expanded<'a> = (&'a Profile, Option<&'a Period>, Vec<Expansion>);

/// The largest parameter document a request may carry.
pub const MAX_PARAMETERS_BYTES: usize = 1024 * 1024;

/// Every profile of a deployment, by name.
#[derive(Debug, Default)]
pub struct ProfileSet {
    profiles: BTreeMap<String, Profile>,
    /// Observation periods by name.
    periods: BTreeMap<String, Period>,
}

impl ProfileSet {
    /// Loads every `*.json` in `dir`; any broken file is an error naming it.
    pub fn load_dir(dir: &Path) -> Result<Self, ProfileError> {
        let io = |source| ProfileError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        let mut set = ProfileSet::default();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|source| ProfileError::Io {
                path: path.clone(),
                source,
            })?;
            let profile = Profile::from_json(&path, &text)?;
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            if stem != profile.name() {
                return Err(ProfileError::Invalid {
                    path,
                    reason: format!("name {:?} differs from the file name", profile.name()),
                });
            }
            set.profiles.insert(profile.name().to_string(), profile);
        }
        if set.profiles.is_empty() {
            return Err(ProfileError::Empty(dir.to_path_buf()));
        }
        Ok(set)
    }

    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }

    /// Adds the container templates of `dir` (one file per profile; a
    /// directory that does not exist holds none) to their profiles.
    pub fn with_templates(mut self, dir: &Path) -> Result<Self, TemplateError> {
        for (path, profile, templates) in crate::container::load_templates_dir(dir)? {
            let invalid = |reason: String| TemplateError::Invalid {
                path: path.clone(),
                reason,
            };
            let containers = self
                .profiles
                .get_mut(&profile)
                .ok_or_else(|| invalid(format!("unknown profile {profile:?}")))?
                .containers
                .as_mut()
                .ok_or_else(|| invalid(format!("profile {profile} runs no containers")))?;
            for template in templates {
                if !containers.policy.runtimes.contains_key(&template.runtime) {
                    return Err(invalid(format!(
                        "template {}: runtime {:?} is not one of profile {profile}'s ({})",
                        template.name,
                        template.runtime,
                        containers
                            .policy
                            .runtimes
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                containers.templates.insert(template.name.clone(), template);
            }
        }
        Ok(self)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }

    /// The violations of a whole request: the profile must exist and the parameters fit it.
    pub fn validate_request(
        &self,
        profile: &str,
        vo: &str,
        parameters_json: &str,
    ) -> Result<(&Profile, Value), Vec<Violation>> {
        let (profile, parameters, mut violations) =
            self.parse_request(profile, vo, parameters_json);
        if let (Some(profile), Some(parameters)) = (profile, parameters) {
            violations.extend(profile.validate(vo, &parameters));
            if violations.is_empty() {
                return Ok((profile, parameters));
            }
        }
        Err(violations)
    }

    /// The profile and the parameters of a request, as far as they can be
    /// read, and the violations found on the way.
    fn parse_request(
        &self,
        profile: &str,
        vo: &str,
        parameters_json: &str,
    ) -> (Option<&Profile>, Option<Value>, Vec<Violation>) {
        let mut violations = Vec::new();
        if vo.trim().is_empty() {
            violations.push(Violation::new("vo", "is required"));
        }
        let profile = match self.get(profile) {
            Some(p) => Some(p),
            None => {
                let known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
                let reason = if profile.is_empty() {
                    "is required".to_string()
                } else {
                    format!("unknown profile {profile:?}")
                };
                violations.push(Violation::new(
                    "profile",
                    format!("{reason}; known profiles: {}", known.join(", ")),
                ));
                None
            }
        };
        let parameters = if parameters_json.trim().is_empty() {
            violations.push(Violation::new("parameters", "is required"));
            None
        } else if parameters_json.len() > MAX_PARAMETERS_BYTES {
            violations.push(Violation::new(
                "parameters",
                format!(
                    "is {} bytes, more than the limit of {MAX_PARAMETERS_BYTES}",
                    parameters_json.len()
                ),
            ));
            None
        } else {
            match serde_json::from_str::<Value>(parameters_json) {
                Ok(v) => Some(v),
                Err(e) => {
                    violations.push(Violation::new(
                        "parameters",
                        format!("is not valid JSON: {e}"),
                    ));
                    None
                }
            }
        };
        (profile, parameters, violations)
    }

    /// Adds the observation periods of `dir` (one TOML file each; a
    /// directory that does not exist holds none) to their profiles.
    pub fn with_periods(mut self, dir: &Path) -> Result<Self, PeriodError> {
        for (path, period) in crate::period::load_dir(dir)? {
            let invalid = |reason: String| PeriodError::Invalid {
                path: path.clone(),
                reason,
            };
            let profile = self
                .profiles
                .get(&period.profile)
                .ok_or_else(|| invalid(format!("unknown profile {:?}", period.profile)))?;
            let directions = profile.directions().ok_or_else(|| {
                invalid(format!(
                    "profile {} takes no observation periods",
                    period.profile
                ))
            })?;
            if let Some(p) = period
                .pointings
                .iter()
                .find(|p| directions.name_of_azimuth(p.azimuth_deg).is_none())
            {
                return Err(invalid(format!(
                    "pointing {}: profile {}'s {} has no direction of that azimuth",
                    p.label(),
                    period.profile,
                    directions.parameter
                )));
            }
            // Each condition must pass the profile's schema as a request would give it.
            let sample: Value = serde_json::json!({
                "site": period.site, "array_layout": period.array_layout,
                "nsb_levels": period.nsb_levels, "atmosphere": period.atmosphere,
            });
            if let Some(v) = profile.validate("", &sample).into_iter().find(|v| {
                crate::period::CONDITIONS
                    .iter()
                    .any(|c| v.field == format!("parameters.{c}"))
            }) {
                return Err(invalid(format!("{}: {}", v.field, v.description)));
            }
            if self.periods.contains_key(&period.name) {
                return Err(invalid(format!(
                    "period {:?} is defined twice",
                    period.name
                )));
            }
            self.periods.insert(period.name.clone(), period);
        }
        Ok(self)
    }

    /// Every observation period, by name.
    pub fn periods(&self) -> impl Iterator<Item = &Period> {
        self.periods.values()
    }

    pub fn period(&self, name: &str) -> Option<&Period> {
        self.periods.get(name)
    }

    /// A request checked as [`ProfileSet::validate_request`] does, after a
    /// period it names has set its conditions: the productions it becomes,
    /// one per pointing of the period it selects, or one (its parameters as
    /// given) when it names no period. Every violation otherwise.
    pub fn expand_request(
        &self,
        profile: &str,
        vo: &str,
        parameters_json: &str,
    ) -> Result<Expanded<'_>, Vec<Violation>> {
        let (profile, parameters, mut violations) =
            self.parse_request(profile, vo, parameters_json);
        let (Some(profile), Some(parameters)) = (profile, parameters) else {
            return Err(violations);
        };
        let named = profile.file.periods.as_ref().and_then(|spec| {
            let name = parameters.get(&spec.parameter)?.as_str()?;
            Some((spec, name))
        });
        let Some((spec, name)) = named else {
            violations.extend(profile.validate(vo, &parameters));
            return match violations.is_empty() {
                true => Ok((
                    profile,
                    None,
                    vec![Expansion {
                        pointing: None,
                        parameters,
                    }],
                )),
                false => Err(violations),
            };
        };
        let Some(period) = self
            .periods
            .get(name)
            .filter(|p| p.profile == profile.name())
        else {
            let known: Vec<&str> = self
                .periods
                .values()
                .filter(|p| p.profile == profile.name())
                .map(|p| p.name.as_str())
                .collect();
            violations.push(Violation::new(
                format!("parameters.{}", spec.parameter),
                format!(
                    "unknown observation period {name:?}; this deployment has {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
            return Err(violations);
        };
        let directions = profile
            .directions()
            .expect("checked when the profile loaded");
        match crate::period::expand(spec, period, &directions, &parameters) {
            Ok(expansions) => {
                // The pointings differ only in zenith and direction: the
                // schema's verdict on one stands for all, and is given once.
                for e in &expansions {
                    for v in profile.validate(vo, &e.parameters) {
                        if !violations.contains(&v) {
                            violations.push(v);
                        }
                    }
                }
                match violations.is_empty() {
                    true => Ok((profile, Some(period), expansions)),
                    false => Err(violations),
                }
            }
            Err(found) => {
                violations.extend(found);
                Err(violations)
            }
        }
    }
}

impl Profile {
    /// Whether `parameters` name an observation period (of this profile's kind).
    pub fn names_period(&self, parameters: &Value) -> bool {
        self.file.periods.as_ref().is_some_and(|spec| {
            parameters
                .get(&spec.parameter)
                .is_some_and(Value::is_string)
        })
    }

    /// How this profile's requests name an observation period, if they can.
    pub fn period_spec(&self) -> Option<&PeriodSpec> {
        self.file.periods.as_ref()
    }

    /// The pointing directions (`North` → 180) a period's azimuths are
    /// named by, when the profile takes periods.
    pub fn directions(&self) -> Option<Directions> {
        let spec = self.file.periods.as_ref()?;
        let derived = self.file.derived.get(&spec.azimuth)?;
        Some(Directions {
            parameter: derived.from.clone(),
            by_name: derived
                .map
                .iter()
                .filter_map(|(name, v)| Some((name.clone(), v.as_f64()?)))
                .collect(),
        })
    }
}

// ---------------------------------------------------------------------------
// Catalogue metadata: the type of each output metadata key, and which keys
// make the identity of a simulation's files (the existence check).
// ---------------------------------------------------------------------------

/// The type of a metadata value: numbers are stored and compared as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetadataType {
    String,
    Integer,
    Float,
}

impl MetadataType {
    pub fn as_str(self) -> &'static str {
        match self {
            MetadataType::String => "string",
            MetadataType::Integer => "integer",
            MetadataType::Float => "float",
        }
    }

    pub fn is_numeric(self) -> bool {
        !matches!(self, MetadataType::String)
    }

    /// `text` as a JSON value of this type; integral floats are written as
    /// integers, so `20` and `20.0` are one value.
    pub fn parse(self, text: &str) -> Result<Value, String> {
        match self {
            MetadataType::String => Ok(Value::String(text.to_string())),
            MetadataType::Integer => text
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| format!("{text:?} is not an integer")),
            MetadataType::Float => match text.trim().parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(float_value(f)),
                _ => Err(format!("{text:?} is not a number")),
            },
        }
    }
}

/// A finite float as JSON, integral values as integers.
pub fn float_value(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        Value::from(f)
    }
}

/// The `catalog` section of a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSpec {
    /// The type of every key of `outputs.metadata`.
    pub keys: BTreeMap<String, MetadataType>,
    /// Identity keys every file of the simulation carries (the catalog
    /// narrows its search by them).
    #[serde(default)]
    pub required: Vec<String>,
    /// Identity keys compared when a file carries them: a file without one
    /// (catalogued elsewhere with less metadata) cannot be told apart.
    #[serde(default)]
    pub compared: Vec<String>,
    /// Numeric ranges of the identity (energy_min..energy_max): files
    /// overlap when the ranges intersect.
    #[serde(default)]
    pub ranges: Vec<Range>,
    /// The integer key numbering runs: an extension starts after the highest
    /// run the catalog holds of the same identity.
    #[serde(default)]
    pub run: Option<String>,
    /// Keys with one value per output file, from a list parameter (one file
    /// per NSB level): the existence check asks about each value alone.
    #[serde(default)]
    pub per_file: BTreeMap<String, PerFile>,
}

/// A key with one value per file: which list parameter gives the values a
/// request asks for, and where a file's name says its value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerFile {
    /// The parameter (a list or a single value) of the request.
    pub values: String,
    /// The value is the text of the file name after the last `after` ...
    pub after: String,
    /// ... up to the first `before` that follows.
    pub before: String,
}

impl PerFile {
    /// The value `file_name` carries, if it has one.
    pub fn value_in(&self, file_name: &str) -> Option<String> {
        let start = file_name.rfind(&self.after)? + self.after.len();
        let rest = &file_name[start..];
        let end = if self.before.is_empty() {
            rest.len()
        } else {
            rest.find(&self.before)?
        };
        (end > 0).then(|| rest[..end].to_string())
    }
}

/// One identity of a request's output files, as the catalog is asked about it.
#[derive(Debug, Clone)]
pub struct FileIdentity {
    /// The per-file values it stands for (`nsb 1`); empty when the request's
    /// files all share one identity.
    pub label: String,
    pub query: IdentityQuery,
}

/// An identity as the catalog is asked about it: files that match every
/// `metadata` pair, and each `if_present` pair where they carry the key (a
/// file without it cannot be told apart), whose ranges intersect `ranges`;
/// `run_key` names the integer key whose highest value the answer reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdentityQuery {
    pub metadata: std::collections::HashMap<String, String>,
    pub if_present: std::collections::HashMap<String, String>,
    pub ranges: Vec<MetadataRange>,
    /// Empty when the profile names no run key.
    pub run_key: String,
}

/// A range of values between two metadata keys (`energy_min`..`energy_max`).
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataRange {
    pub min_key: String,
    pub max_key: String,
    pub min: f64,
    pub max: f64,
}

/// `template` rendered, or `None` when a placeholder has no value (an
/// optional parameter left out).
pub(crate) fn render_known(template: &str, vars: &BTreeMap<String, String>) -> Option<String> {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}')?;
        if !vars.contains_key(&rest[start + 1..start + end]) {
            return None;
        }
        rest = &rest[start + end + 1..];
    }
    Some(render(template, vars))
}

fn check_catalog(
    catalog: &CatalogSpec,
    outputs: &OutputTemplate,
    properties: &BTreeSet<String>,
    parameter_vars: &BTreeSet<&str>,
) -> Result<(), String> {
    for key in outputs.metadata.keys() {
        if !catalog.keys.contains_key(key) {
            return Err(format!("output metadata key {key:?} has no type in keys"));
        }
    }
    for key in catalog.keys.keys() {
        if !outputs.metadata.contains_key(key) {
            return Err(format!("key {key:?} is not in outputs.metadata"));
        }
    }
    let typed = |key: &str| catalog.keys.get(key).copied();
    let identity_vars: BTreeSet<&str> = parameter_vars
        .iter()
        .copied()
        .chain(catalog.per_file.keys().map(String::as_str))
        .collect();
    let range_keys = catalog.ranges.iter().flat_map(|r| [&r.min, &r.max]);
    for key in catalog
        .required
        .iter()
        .chain(&catalog.compared)
        .chain(range_keys.clone())
    {
        if typed(key).is_none() {
            return Err(format!("identity key {key:?} is not in keys"));
        }
        check_template(&outputs.metadata[key], &identity_vars)
            .map_err(|e| format!("identity key {key:?} must depend on the parameters only: {e}"))?;
    }
    for key in range_keys {
        if !typed(key).is_some_and(MetadataType::is_numeric) {
            return Err(format!("range key {key:?} must be an integer or a float"));
        }
    }
    if let Some(run) = &catalog.run
        && typed(run) != Some(MetadataType::Integer)
    {
        return Err(format!("run key {run:?} must be an integer key"));
    }
    for (key, per_file) in &catalog.per_file {
        if typed(key).is_none() {
            return Err(format!("per_file key {key:?} is not in keys"));
        }
        if !properties.contains(&per_file.values) {
            return Err(format!(
                "per_file {key:?} takes its values from unknown parameter {:?}",
                per_file.values
            ));
        }
        if per_file.after.is_empty() {
            return Err(format!("per_file {key:?}: after must not be empty"));
        }
    }
    Ok(())
}

impl Profile {
    /// The `catalog` section, if the profile has one.
    pub fn catalog(&self) -> Option<&CatalogSpec> {
        self.file.catalog.as_ref()
    }

    /// The metadata of one output file: `vars` are the job's variables with
    /// `file_name`; per-file keys take their value from the file name.
    pub fn output_metadata(
        &self,
        vars: &BTreeMap<String, String>,
    ) -> std::collections::HashMap<String, String> {
        let mut extra = BTreeMap::new();
        if let (Some(catalog), Some(name)) = (&self.file.catalog, vars.get("file_name")) {
            for (key, per_file) in &catalog.per_file {
                if let Some(value) = per_file.value_in(name) {
                    extra.insert(key.clone(), value);
                }
            }
        }
        let with_file;
        let vars = if extra.is_empty() {
            vars
        } else {
            with_file = vars.clone().into_iter().chain(extra).collect();
            &with_file
        };
        self.file
            .outputs
            .metadata
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), render_known(v, vars)?)))
            .collect()
    }

    /// The identities of the files a request would write, one per
    /// combination of per-file values (one per NSB level), each as the
    /// catalog is asked about it; empty when the profile names no required
    /// identity keys.
    pub fn file_identities(&self, parameters: &Value) -> Vec<FileIdentity> {
        let Some(catalog) = &self.file.catalog else {
            return Vec::new();
        };
        if catalog.required.is_empty() {
            return Vec::new();
        }
        let base = self.parameter_variables(parameters);
        // Every combination of per-file values.
        let mut combinations: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for (key, per_file) in &catalog.per_file {
            let values: Vec<String> = match parameters.get(&per_file.values) {
                Some(Value::Array(items)) => items.iter().map(render_value).collect(),
                Some(v) => vec![render_value(v)],
                None => Vec::new(),
            };
            combinations = combinations
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((key.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        let metadata = &self.file.outputs.metadata;
        combinations
            .into_iter()
            .map(|combination| {
                let mut vars = base.clone();
                vars.extend(combination.iter().cloned());
                // A key over an optional parameter the request leaves out is not compared.
                let value =
                    |key: &String| Some((key.clone(), render_known(&metadata[key], &vars)?));
                let number = |key: &String| value(key)?.1.trim().parse::<f64>().ok();
                let query = IdentityQuery {
                    metadata: catalog.required.iter().filter_map(value).collect(),
                    if_present: catalog.compared.iter().filter_map(value).collect(),
                    ranges: catalog
                        .ranges
                        .iter()
                        .filter_map(|r| {
                            Some(MetadataRange {
                                min_key: r.min.clone(),
                                max_key: r.max.clone(),
                                min: number(&r.min)?,
                                max: number(&r.max)?,
                            })
                        })
                        .collect(),
                    run_key: catalog.run.clone().unwrap_or_default(),
                };
                let label = combination
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                FileIdentity { label, query }
            })
            .collect()
    }
}

impl Profile {
    /// Fingerprint of the identity without its statistics, ranges and the
    /// list parameters of per-file keys (`nsb_levels`): equal for productions
    /// whose files may share an identity (NSB 1+5 and NSB 1+19). `None` when
    /// the profile has no per-file key (the base fingerprint says it all).
    pub fn file_base_fingerprint(&self, parameters: &Value) -> Option<String> {
        let catalog = self.file.catalog.as_ref()?;
        if catalog.per_file.is_empty() {
            return None;
        }
        let varying: BTreeSet<&str> = self
            .file
            .statistics
            .iter()
            .chain(self.file.ranges.iter().flat_map(|r| [&r.min, &r.max]))
            .chain(catalog.per_file.values().map(|p| &p.values))
            .map(String::as_str)
            .collect();
        Some(self.identity_digest("file_base", &varying, parameters))
    }

    /// How the files of `mine` overlap those of `theirs`, two requests with
    /// the same file-base fingerprint: the per-file values they share
    /// (`nsb 1 (existing nsb 1, 5)`); `None` when they share none or a range
    /// is disjoint.
    pub fn per_file_overlap(&self, mine: &Value, theirs: &Value) -> Option<String> {
        let catalog = self.file.catalog.as_ref()?;
        let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
        for range in &self.file.ranges {
            let (a0, a1) = (num(mine, &range.min)?, num(mine, &range.max)?);
            let (b0, b1) = (num(theirs, &range.min)?, num(theirs, &range.max)?);
            if a0 >= b1 || b0 >= a1 {
                return None;
            }
        }
        let values = |v: &Value, name: &str| -> Vec<String> {
            match v.get(name) {
                Some(Value::Array(items)) => items.iter().map(render_value).collect(),
                Some(other) => vec![render_value(other)],
                None => Vec::new(),
            }
        };
        let mut parts = Vec::new();
        for (key, per_file) in &catalog.per_file {
            let (a, b) = (
                values(mine, &per_file.values),
                values(theirs, &per_file.values),
            );
            let common: Vec<&String> = a.iter().filter(|v| b.contains(v)).collect();
            if common.is_empty() {
                return None;
            }
            let list = |v: Vec<&String>| v.into_iter().cloned().collect::<Vec<_>>().join(", ");
            parts.push(format!(
                "{key} {} (existing {key} {})",
                list(common),
                list(b.iter().collect())
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

impl ProfileSet {
    /// The run keys the profiles name (`catalog.run`): the metadata whose
    /// value is each file's own; everything else a file carries it shares
    /// with the other files of its production and identity.
    pub fn run_keys(&self) -> std::collections::BTreeSet<String> {
        self.iter()
            .filter_map(|p| p.catalog().and_then(|c| c.run.clone()))
            .collect()
    }

    /// The type of every metadata key any profile declares; a key declared
    /// with two types is an error naming it.
    pub fn metadata_types(&self) -> Result<BTreeMap<String, MetadataType>, String> {
        let mut types: BTreeMap<String, (MetadataType, &str)> = BTreeMap::new();
        for profile in self.iter() {
            let Some(catalog) = profile.catalog() else {
                continue;
            };
            for (key, ty) in &catalog.keys {
                match types.get(key) {
                    Some((other, by)) if other != ty => {
                        return Err(format!(
                            "metadata key {key:?} is {} in profile {by} but {} in profile {}",
                            other.as_str(),
                            ty.as_str(),
                            profile.name()
                        ));
                    }
                    _ => {
                        types.insert(key.clone(), (*ty, profile.name()));
                    }
                }
            }
        }
        Ok(types.into_iter().map(|(k, (t, _))| (k, t)).collect())
    }
}

/// Whether `id` has the shape the checker gives production IDs (like
/// CTA-000042): a profile's prefix (upper-case letters, as profiles must
/// have), a dash and a number of six digits or more.
pub fn is_production_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(prefix, number)| {
        !prefix.is_empty()
            && prefix.bytes().all(|b| b.is_ascii_uppercase())
            && number.len() >= 6
            && number.bytes().all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profiles() -> ProfileSet {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles");
        ProfileSet::load_dir(&dir).expect("shipped profiles load")
    }

    #[test]
    fn production_ids_have_a_prefix_a_dash_and_a_number() {
        for id in ["CTA-000042", "LST-1234567", "A-000001"] {
            assert!(is_production_id(id), "{id}");
        }
        for not in [
            "",
            "CTA",
            "CTA-",
            "CTA-42",
            "-000042",
            "cta-000042",
            "CTA000042",
            "CTA-00004x",
            "CTA_000042",
            "alpha",
            "LaPalma",
            "CTA-000042-1",
        ] {
            assert!(!is_production_id(not), "{not}");
        }
    }

    fn cta_example() -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cta-irf-mc.json");
        let request: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        request["parameters"].clone()
    }

    #[test]
    fn an_output_directory_outside_the_job_directory_is_refused_at_load() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles/cta-irf-mc.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut file: Value = serde_json::from_str(&text).unwrap();
        assert!(Profile::from_json(&path, &file.to_string()).is_ok());
        for dir in ["../../etc", "/etc", "out/../..", ""] {
            file["outputs"]["dir"] = json!(dir);
            let error = Profile::from_json(&path, &file.to_string())
                .err()
                .unwrap_or_else(|| panic!("{dir:?} is refused"));
            assert!(error.to_string().contains("outputs.dir"), "{error}");
        }
    }

    #[test]
    fn shipped_example_is_valid_for_its_profile() {
        let set = profiles();
        let p = set.get("cta-irf-mc").unwrap();
        assert_eq!(p.validate("vo.cta.in2p3.fr", &cta_example()), vec![]);
    }

    #[test]
    fn violations_name_each_field() {
        let set = profiles();
        let p = set.get("cta-irf-mc").unwrap();
        let mut params = cta_example();
        let obj = params.as_object_mut().unwrap();
        obj.remove("site");
        obj.insert("zenith_deg".into(), json!("twenty"));
        obj.insert("n_showers".into(), json!(-5));
        obj.insert("colour".into(), json!("blue"));
        let fields: BTreeSet<String> = p
            .validate("vo.cta.in2p3.fr", &params)
            .into_iter()
            .map(|v| v.field)
            .collect();
        for expected in [
            "parameters.site",
            "parameters.zenith_deg",
            "parameters.n_showers",
            "parameters.colour",
        ] {
            assert!(
                fields.contains(expected),
                "{expected} missing from {fields:?}"
            );
        }
    }

    #[test]
    fn cross_field_rules_are_checked() {
        let set = profiles();
        let p = set.get("cta-irf-mc").unwrap();
        let mut params = cta_example();
        params["energy_min_tev"] = json!(500.0);
        params["energy_max_tev"] = json!(330.0);
        let v = p.validate("vo.cta.in2p3.fr", &params);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].field, "parameters.energy_min_tev");
    }

    #[test]
    fn fingerprint_ignores_number_spelling_and_non_identity_fields() {
        let set = profiles();
        let p = set.get("cta-irf-mc").unwrap();
        let a = cta_example();
        let mut b = a.clone();
        b["zenith_deg"] = json!(20.0);
        assert_eq!(p.fingerprint(&a), p.fingerprint(&b));
        b["zenith_deg"] = json!(40);
        assert_ne!(p.fingerprint(&a), p.fingerprint(&b));
    }

    #[test]
    fn plan_covers_every_unit_with_unique_runs_and_seeds() {
        let set = profiles();
        let p = set.get("cta-irf-mc").unwrap();
        let mut params = cta_example();
        params["n_showers"] = json!(1050);
        params["showers_per_job"] = json!(100);
        let plan = p.plan(&params, "fp", 1000).unwrap();
        assert_eq!(plan.job_count, 11);
        let jobs: Vec<PlannedJob> = plan.jobs().collect();
        assert_eq!(jobs.iter().map(|j| j.units).sum::<u64>(), 1050);
        assert_eq!(jobs.last().unwrap().units, 50);
        assert_eq!(jobs[0].run_number, 1001);
        let seeds: BTreeSet<u64> = jobs.iter().map(|j| j.seed).collect();
        assert_eq!(seeds.len(), jobs.len());
    }

    #[test]
    fn a_plan_over_the_smaller_of_the_profile_and_deployment_limits_is_named() {
        let set = profiles();
        let p = set.get("cta-irf-mc").unwrap();
        assert_eq!(p.max_jobs(), 1_000_000);
        let mut params = cta_example();
        params["n_showers"] = json!(100_000_000_000u64);
        params["showers_per_job"] = json!(1);
        let plan = p.plan(&params, "fp", 0).unwrap();
        let v = p.check_job_count(&plan, 1_000_000_000).unwrap();
        assert_eq!(v.field, "parameters.n_showers");
        assert_eq!(
            v.description,
            "gives 100000000000 jobs, more than the 1000000 this profile allows (max_jobs)"
        );
        params["n_showers"] = json!(1_000_000);
        let plan = p.plan(&params, "fp", 0).unwrap();
        assert_eq!(p.check_job_count(&plan, 1_000_000), None);
        let v = p.check_job_count(&plan, 999).unwrap();
        assert!(
            v.description.ends_with(
                "more than the 999 this deployment allows (dispatcher.max_jobs_per_production)"
            ),
            "{v:?}"
        );
    }

    #[test]
    fn statistics_and_intersecting_ranges_overlap_disjoint_ranges_do_not() {
        let set = profiles();
        let p = set.get("cta-irf-mc").unwrap();
        let base = cta_example();
        let mut more = base.clone();
        more["n_showers"] = json!(8000);
        assert_eq!(p.base_fingerprint(&base), p.base_fingerprint(&more));
        assert_ne!(p.fingerprint(&base), p.fingerprint(&more));
        let why = p.overlap(&more, &base).unwrap();
        assert_eq!(why, "n_showers 8000 (existing 4000)");
        let mut wider = base.clone();
        wider["energy_min_tev"] = json!(1);
        wider["energy_max_tev"] = json!(500);
        let why = p.overlap(&wider, &base).unwrap();
        assert!(why.contains("1..500 intersects 0.003..330"), "{why}");
        let mut disjoint = base.clone();
        disjoint["energy_min_tev"] = json!(330);
        disjoint["energy_max_tev"] = json!(600);
        assert_eq!(p.overlap(&disjoint, &base), None);
        let mut other_site = base.clone();
        other_site["site"] = json!("Paranal");
        assert_ne!(p.base_fingerprint(&base), p.base_fingerprint(&other_site));
    }

    /// The shipped profiles with the KM3NeT templates, their image pinned to `digest`.
    fn profiles_with_templates(digest: &str) -> ProfileSet {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let source = std::fs::read_to_string(
            root.join("deploy/local/images/km3net-toysim/templates.json.in"),
        )
        .unwrap();
        // One directory per call: tests of one process share a digest.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "prodsys-templates-{}-{}-{}",
            std::process::id(),
            &digest[..8],
            CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("km3net.json"),
            source.replace(
                "@IMAGE@",
                &format!("localhost/km3net/toysim@sha256:{digest}"),
            ),
        )
        .unwrap();
        let set = profiles().with_templates(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        set
    }

    #[test]
    fn destinations_are_the_profile_defaults_and_the_request_s_each_known_once() {
        let set = profiles();
        let km3 = set.get("km3net-container-sim").unwrap();
        let params = json!({ "output_storage": "km3-tmp" });
        let configured = ["km3-tmp".to_string(), "eos".to_string()];
        // KM3NeT's output_storage names its default destination.
        assert_eq!(
            km3.destinations(&params, &[], false, &configured).unwrap(),
            ["km3-tmp"]
        );
        assert_eq!(
            km3.destinations(
                &params,
                &["eos".into(), "km3-tmp".into()],
                false,
                &configured
            )
            .unwrap(),
            ["km3-tmp", "eos"]
        );
        assert_eq!(
            km3.destinations(&params, &["eos".into()], true, &configured)
                .unwrap(),
            ["eos"]
        );
        assert!(
            km3.destinations(&params, &[], true, &configured)
                .unwrap()
                .is_empty()
        );
        // An unknown name is a violation of the field that named it.
        let bad = json!({ "output_storage": "KM3NeT-TMP-DISK" });
        let v = km3
            .destinations(&bad, &["eos".into(), "nowhere".into()], false, &configured)
            .unwrap_err();
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["parameters.output_storage", "forward[1]"]);
        assert!(
            v[1].description.contains("eos, km3-tmp") || v[1].description.contains("km3-tmp, eos")
        );
        // With no destination configured the profile's defaults are ignored
        // (outputs stay where they are), but asking for one is refused.
        assert!(km3.destinations(&bad, &[], false, &[]).unwrap().is_empty());
        let v = km3
            .destinations(&bad, &["eos".into()], false, &[])
            .unwrap_err();
        assert_eq!(v[0].field, "forward[0]");
        assert!(
            v[0].description.contains("none is configured"),
            "{}",
            v[0].description
        );
    }

    fn km3net_example() -> Value {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/km3net-container-sim.json");
        let request: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        request["parameters"].clone()
    }

    #[test]
    fn km3net_example_derives_a_template_whose_parameters_reach_the_container() {
        let digest = "ab".repeat(32);
        let set = profiles_with_templates(&digest);
        let p = set.get("km3net-container-sim").unwrap();
        let params = km3net_example();
        assert_eq!(p.validate("km3net.org", &params), vec![]);
        assert_eq!(p.validate("vo.cta.in2p3.fr", &params)[0].field, "vo");
        let recorded: BTreeMap<String, ResolvedTemplate> = BTreeMap::new();
        let t = p
            .resolve_template("km3net.org", &params, Some(&recorded))
            .unwrap()
            .unwrap();
        assert_eq!(t.name, "gseagen-7.4.1-seawater-v2");
        assert_eq!(t.from, "gseagen-7.4.1");
        assert_eq!(t.digest, format!("sha256:{digest}"));
        assert!(
            t.version.starts_with("gseagen-7.4.1+abababababab+"),
            "{}",
            t.version
        );
        assert_eq!(t.parameters["seawater_model"], "v2");
        assert_eq!(t.parameters["photocathode"], "R12199");
        let with = p.with_template(params.clone(), &t);
        let plan = p.plan(&with, "fp", 0).unwrap();
        assert_eq!(plan.job_count, 4);
        let vars = p.job_variables(
            &with,
            "KM-000001",
            "km3net.org",
            &plan.job(0),
            1,
            "/w/output",
        );
        let JobCommand { program, args, env } = p.job_command(&with, &vars).unwrap();
        assert_eq!(program, "podman");
        assert!(
            env.is_empty(),
            "a container gets its environment on its command line"
        );
        let line = args.join(" ");
        for part in [
            "--runtime runc run --rm --network none",
            "--ulimit nofile=1024:1024 --ulimit nproc=1024:1024",
            "--memory 1024m --memory-swap 1024m -v /w/output:/output",
            "--env PRODSYS_PARAM_SEAWATER_MODEL=v2",
            "--env PRODSYS_PARAM_LIGHT_YIELD=0.95",
            "--env KM3NET_OUTPUT_STORAGE=KM3NeT-TMP-DISK",
            &format!(
                "localhost/km3net/toysim@sha256:{digest} /usr/local/bin/prodsys-toysim km3net --generator gSeaGen"
            ),
            "--events 5000 --run 1 --seed",
        ] {
            assert!(line.contains(part), "{part:?} not in {line}");
        }
        let metadata = p.output_metadata(&vars);
        assert_eq!(metadata["template"], "gseagen-7.4.1-seawater-v2");
        assert_eq!(metadata["template_version"], t.version);
        assert_eq!(metadata["image_digest"], t.digest);
        // Reused by name later: the same template, the same fingerprint.
        let mut recorded = BTreeMap::new();
        recorded.insert(t.name.clone(), t.clone());
        let mut again = params.clone();
        again.as_object_mut().unwrap().remove("derived_template");
        again["container_template"] = json!("gseagen-7.4.1-seawater-v2");
        let reused = p
            .resolve_template("km3net.org", &again, Some(&recorded))
            .unwrap()
            .unwrap();
        assert_eq!(reused, t);
        // A derivation of a derivation keeps what it derived from.
        let mut chained = again.clone();
        chained["derived_template"] =
            json!({"name": "chained", "parameters": {"light_yield": 1.5}});
        let c = p
            .resolve_template("km3net.org", &chained, Some(&recorded))
            .unwrap()
            .unwrap();
        assert_eq!(c.from, "gseagen-7.4.1");
        assert_eq!(c.parameters["seawater_model"], "v2");
        assert_eq!(c.parameters["light_yield"], 1.5);
        assert_ne!(c.version, t.version);
        assert_eq!(
            p.fingerprint(&p.with_template(again, &reused)),
            p.fingerprint(&with)
        );
        // The shipped template itself is another simulation.
        let mut plain = params.clone();
        plain.as_object_mut().unwrap().remove("derived_template");
        let shipped = p
            .resolve_template("km3net.org", &plain, Some(&recorded))
            .unwrap()
            .unwrap();
        assert!(!shipped.is_derived());
        assert_ne!(
            p.fingerprint(&p.with_template(plain, &shipped)),
            p.fingerprint(&with)
        );
    }

    #[test]
    fn km3net_refusals_name_the_field() {
        let set = profiles_with_templates(&"cd".repeat(32));
        let p = set.get("km3net-container-sim").unwrap();
        let recorded: BTreeMap<String, ResolvedTemplate> = BTreeMap::new();
        let refused = |params: &Value| -> Vec<Violation> {
            let mut v = p.validate("km3net.org", params);
            if v.is_empty() {
                v = p
                    .resolve_template("km3net.org", params, Some(&recorded))
                    .unwrap_err();
            }
            v
        };
        let mut outside = km3net_example();
        outside["derived_template"]["image"] =
            json!(format!("docker.io/evil/miner@sha256:{}", "ef".repeat(32)));
        let v = refused(&outside);
        assert_eq!(v[0].field, "parameters.derived_template.image", "{v:?}");
        assert!(
            v[0].description.contains("not an image km3net.org may run"),
            "{v:?}"
        );
        let mut unpinned = km3net_example();
        unpinned["derived_template"]["image"] = json!("localhost/km3net/toysim:latest");
        assert_eq!(
            refused(&unpinned)[0].field,
            "parameters.derived_template.image"
        );
        let mut unknown = km3net_example();
        unknown["container_template"] = json!("nosuch-1.0");
        // Intake cannot see recorded derivations: only the checker refuses it.
        assert_eq!(p.validate("km3net.org", &unknown), vec![]);
        let v = refused(&unknown);
        assert_eq!(v[0].field, "parameters.container_template", "{v:?}");
        let mut disallowed = km3net_example();
        disallowed["derived_template"]["parameters"]["photocathode"] = json!("other");
        let v = p.validate("km3net.org", &disallowed);
        assert_eq!(
            v[0].field, "parameters.derived_template.parameters.photocathode",
            "{v:?}"
        );
        assert!(
            v[0].description.contains("does not allow overriding"),
            "{v:?}"
        );
        let mut bad_value = km3net_example();
        bad_value["derived_template"]["parameters"]["seawater_model"] = json!("v9");
        let v = p.validate("km3net.org", &bad_value);
        assert_eq!(
            v[0].field, "parameters.derived_template.parameters.seawater_model",
            "{v:?}"
        );
        let mut taken = km3net_example();
        taken["derived_template"]["name"] = json!("mupage-4.3");
        assert_eq!(
            p.validate("km3net.org", &taken)[0].field,
            "parameters.derived_template.name"
        );
        // A name recorded for another derivation is not reused silently.
        let mut recorded = BTreeMap::new();
        let mut other = km3net_example();
        other["derived_template"]["parameters"]["seawater_model"] = json!("v1");
        let t = p
            .resolve_template("km3net.org", &other, Some(&BTreeMap::new()))
            .unwrap()
            .unwrap();
        recorded.insert(t.name.clone(), t);
        let v = p
            .resolve_template("km3net.org", &km3net_example(), Some(&recorded))
            .unwrap_err();
        assert_eq!(v[0].field, "parameters.derived_template.name", "{v:?}");
    }

    #[test]
    fn an_apptainer_template_renders_apptainer_exec() {
        let set = profiles_with_templates(&"01".repeat(32));
        let p = set.get("km3net-container-sim").unwrap();
        let params = km3net_example();
        let mut t = p
            .resolve_template("km3net.org", &params, None)
            .unwrap()
            .unwrap();
        t.runtime = "apptainer".into();
        t.image = "docker://km3net/gseagen@sha256:".to_string() + &"01".repeat(32);
        let with = p.with_template(params, &t);
        let plan = p.plan(&with, "fp", 0).unwrap();
        let vars = p.job_variables(
            &with,
            "KM-000001",
            "km3net.org",
            &plan.job(0),
            1,
            "/w/output",
        );
        let JobCommand { program, args, .. } = p.job_command(&with, &vars).unwrap();
        assert_eq!(program, "apptainer");
        assert_eq!(
            args[..6],
            [
                "exec",
                "--containall",
                "--no-home",
                "--bind",
                "/w/output:/output",
                "--env"
            ]
        );
    }

    #[test]
    fn templates_render_parameters_and_job_variables() {
        let mut vars = BTreeMap::new();
        vars.insert("run_number".to_string(), "42".to_string());
        assert_eq!(render("--run {run_number} {x}", &vars), "--run 42 {x}");
        assert_eq!(render_value(&json!([1, 5])), "1,5");
        assert_eq!(render_value(&json!(20.0)), "20");
    }

    #[test]
    fn broken_profiles_are_refused_with_the_reason() {
        let err = Profile::from_json(Path::new("x.json"), "{").unwrap_err();
        assert!(err.to_string().starts_with("profile file x.json:"), "{err}");
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles/cta-irf-mc.json"),
        )
        .unwrap();
        let broken = text.replacen("{run_number}", "{run_numbr}", 1);
        let err = Profile::from_json(Path::new("x.json"), &broken).unwrap_err();
        assert!(
            err.to_string().contains("unknown placeholder {run_numbr}"),
            "{err}"
        );
    }

    #[test]
    fn a_cta_request_has_one_file_identity_per_nsb_level() {
        let set = profiles();
        let p = set.get("cta-irf-mc").unwrap();
        let mut params = cta_example();
        params.as_object_mut().unwrap().remove("core_scatter_m");
        let ids = p.file_identities(&params);
        let labels: Vec<&str> = ids.iter().map(|i| i.label.as_str()).collect();
        assert_eq!(labels, ["nsb 1", "nsb 5"]);
        let q = &ids[1].query;
        assert_eq!(q.metadata["phiP"], "180");
        assert_eq!(q.metadata["site"], "LaPalma");
        assert_eq!(q.if_present["nsb"], "5");
        assert_eq!(q.if_present["tel_sim_prog_version"], "2024-02-05");
        // An optional parameter left out is not compared.
        assert!(!q.if_present.contains_key("core_scatter"), "{q:?}");
        assert_eq!(q.ranges.len(), 1);
        assert_eq!((q.ranges[0].min, q.ranges[0].max), (0.003, 330.0));
        assert_eq!(q.run_key, "run_number");
    }

    #[test]
    fn output_metadata_takes_per_file_values_from_the_file_name() {
        let set = profiles();
        let p = set.get("cta-irf-mc").unwrap();
        let params = cta_example();
        let plan = p.plan(&params, "fp", 0).unwrap();
        let mut vars = p.job_variables(
            &params,
            "CTA-000001",
            "vo.cta.in2p3.fr",
            &plan.job(1),
            1,
            "/w/output",
        );
        vars.insert(
            "file_name".into(),
            "gamma_20deg_180deg_run000002___Prod6-Hyperarray_nsb19.simtel".into(),
        );
        let m = p.output_metadata(&vars);
        assert_eq!(m["nsb"], "19");
        assert_eq!(m["run_number"], "2");
        assert_eq!(m["corsika_version"], "7.7550");
        assert_eq!(m["production_id"], "CTA-000001");
        assert_eq!(m["core_scatter"], "1500");
        let types = set.metadata_types().unwrap();
        for (key, value) in &m {
            assert!(types[key].parse(value).is_ok(), "{key}={value}");
        }
        assert_eq!(MetadataType::Float.parse("20.0").unwrap(), json!(20));
        assert!(MetadataType::Integer.parse("1.5").is_err());
    }

    #[test]
    fn km3net_identities_tell_interactions_and_templates_apart() {
        let set = profiles_with_templates(&"ab".repeat(32));
        let p = set.get("km3net-container-sim").unwrap();
        let params = km3net_example();
        let t = p
            .resolve_template("km3net.org", &params, None)
            .unwrap()
            .unwrap();
        let ids = p.file_identities(&p.with_template(params, &t));
        assert_eq!(ids.len(), 1);
        assert_eq!(ids[0].label, "");
        assert_eq!(ids[0].query.if_present["interaction"], "CC");
        assert_eq!(ids[0].query.if_present["template_version"], t.version);
        assert_eq!(ids[0].query.if_present["image_digest"], t.digest);
    }

    #[test]
    fn a_metadata_key_must_have_a_type() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles/cta-irf-mc.json"),
        )
        .unwrap();
        let broken = text.replacen("\"nsb\": \"integer\",", "", 1);
        let err = Profile::from_json(Path::new("x.json"), &broken).unwrap_err();
        assert!(err.to_string().contains("\"nsb\""), "{err}");
    }

    #[test]
    fn nsb_levels_in_common_overlap_disjoint_ones_do_not() {
        let set = profiles();
        let p = set.get("cta-irf-mc").unwrap();
        let base = cta_example();
        let mut other = base.clone();
        other["nsb_levels"] = json!([19, 1]);
        assert_ne!(p.base_fingerprint(&base), p.base_fingerprint(&other));
        assert_eq!(
            p.file_base_fingerprint(&base),
            p.file_base_fingerprint(&other)
        );
        assert_eq!(
            p.per_file_overlap(&other, &base).as_deref(),
            Some("nsb 1 (existing nsb 1, 5)")
        );
        other["nsb_levels"] = json!([19]);
        assert_eq!(p.per_file_overlap(&other, &base), None);
        other["nsb_levels"] = json!([1]);
        other["energy_min_tev"] = json!(330);
        other["energy_max_tev"] = json!(600);
        assert_eq!(p.per_file_overlap(&other, &base), None);
        other["software"]["sim_telarray"] = json!("2025-06-01");
        assert_ne!(
            p.file_base_fingerprint(&base),
            p.file_base_fingerprint(&other)
        );
        let km3net = set.get("km3net-container-sim").unwrap();
        assert_eq!(km3net.file_base_fingerprint(&json!({})), None);
    }
}

#[cfg(test)]
mod properties {
    //! Profile files are data an operator (or a package) ships: whatever
    //! their bytes, loading one answers a profile or an error, never a panic.
    use super::*;
    use proptest::prelude::*;

    fn shipped(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../profiles")
            .join(format!("{name}.json"));
        std::fs::read_to_string(path).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_text_as_a_profile_file(text in ".{0,256}") {
            let _ = Profile::from_json(Path::new("p.json"), &text);
        }

        #[test]
        fn a_profile_file_with_edits(
            edits in prop::collection::vec((any::<usize>(), any::<char>(), any::<bool>()), 1..8),
            which in 0usize..5,
        ) {
            let name = ["cta-irf-mc", "km3net-container-sim", "cta-dl1", "cta-irf", "km3net-reco"][which];
            let mut text: Vec<char> = shipped(name).chars().collect();
            for (at, c, insert) in edits {
                let at = at % (text.len() + 1);
                if insert || at == text.len() {
                    text.insert(at, c);
                } else {
                    text[at] = c;
                }
            }
            let text: String = text.into_iter().collect();
            let _ = Profile::from_json(Path::new("p.json"), &text);
        }
    }
}
