//! Container templates: the images a profile's jobs may run, and how.
//!
//! A profile with a `containers` section runs its jobs in containers. The
//! section is policy, reviewed with the profile: the command line of each
//! runtime (`podman`, `docker`, `apptainer`) and the images each VO may run
//! (registry/repository patterns or digests). The templates themselves are
//! deployment data, in a templates directory, because their images are pinned
//! by the digest of an image the deployment built or pulled: a template names
//! its image by digest, a runtime, an entrypoint, default parameters and which
//! of them a request may override (each with a JSON Schema).
//!
//! A request picks a template (`container_template`) and may derive a new one
//! (`derived_template`: a name, another image, other parameters). The
//! derivation is versioned by its root template, its image digest and the
//! hash of its parameters, recorded by the checker under its name, and
//! reusable by that name later. The resolved template travels with the
//! production's parameters (under [`TEMPLATE_KEY`]) so every backend renders
//! the same container command from it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::Violation;

/// The parameter under which a production carries its resolved template.
pub const TEMPLATE_KEY: &str = "template";
/// Prefix of the environment variable each template parameter becomes in the job.
pub const PARAMETER_ENV_PREFIX: &str = "PRODSYS_PARAM_";
/// Where a job's outputs are bound inside its container.
pub const CONTAINER_OUTPUT_DIR: &str = "/output";

/// The `containers` section of a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerPolicy {
    /// Runtime name → the command line up to the image (placeholders
    /// `{output_dir}`, `{memory_mb}` and the job variables are filled per job).
    pub runtimes: BTreeMap<String, Vec<String>>,
    /// VO → the images its requests may derive templates from: `registry/repo`
    /// patterns where `*` matches any text, or `sha256:<hex>` digests.
    #[serde(default)]
    pub allowed_images: BTreeMap<String, Vec<String>>,
}

impl ContainerPolicy {
    /// Whether `vo` may run `image` (a reference pinned by digest).
    pub fn allows(&self, vo: &str, image: &str) -> bool {
        let Some(patterns) = self.allowed_images.get(vo) else {
            return false;
        };
        let repository = image.split('@').next().unwrap_or(image);
        let digest = image_digest(image);
        patterns.iter().any(|pattern| {
            if pattern.starts_with("sha256:") {
                digest.as_deref() == Some(pattern.as_str())
            } else {
                glob(pattern, repository)
            }
        })
    }
}

/// `*` matches any run of characters; everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut remaining) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = rest.split('*').collect();
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            return remaining.ends_with(part);
        }
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// The `sha256:<64 hex>` an image reference is pinned to, if it is.
pub fn image_digest(image: &str) -> Option<String> {
    let hex = image.rsplit_once("@sha256:")?.1;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| format!("sha256:{hex}"))
}

/// A template as its file gives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateSpec {
    #[serde(default)]
    description: String,
    image: String,
    runtime: String,
    entrypoint: Vec<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    /// Parameter → the JSON Schema a request's value must satisfy.
    #[serde(default)]
    overridable: BTreeMap<String, Value>,
}

/// One file of the templates directory: the templates of one profile.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplatesFile {
    profile: String,
    templates: BTreeMap<String, TemplateSpec>,
}

/// A shipped template, checked.
#[derive(Debug)]
pub struct Template {
    pub name: String,
    pub description: String,
    pub image: String,
    pub runtime: String,
    pub entrypoint: Vec<String>,
    pub parameters: Map<String, Value>,
    pub overridable: BTreeMap<String, Value>,
    validators: BTreeMap<String, jsonschema::Validator>,
}

impl Template {
    /// The template as a job runs it.
    pub fn resolved(&self) -> ResolvedTemplate {
        ResolvedTemplate::new(
            &self.name,
            &self.name,
            &self.image,
            &self.runtime,
            &self.entrypoint,
            self.parameters.clone(),
        )
    }

    /// Why `value` may not override parameter `name`, if it may not.
    fn check_override(&self, name: &str, value: &Value) -> Option<String> {
        let Some(validator) = self.validators.get(name) else {
            let allowed: Vec<&str> = self.overridable.keys().map(String::as_str).collect();
            return Some(format!(
                "template {} does not allow overriding {name:?} (it allows: {})",
                self.name,
                if allowed.is_empty() {
                    "nothing".to_string()
                } else {
                    allowed.join(", ")
                }
            ));
        };
        validator
            .iter_errors(value)
            .next()
            .map(|error| format!("{value} is not allowed: {error}"))
    }
}

/// A template as a production runs it: shipped, or derived by a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedTemplate {
    /// The template's name (a derivation's own name).
    pub name: String,
    /// The shipped template it comes from (itself when not derived).
    pub from: String,
    /// `<from>+<image digest, 12 hex>+<parameters hash, 12 hex>`.
    pub version: String,
    pub image: String,
    pub digest: String,
    pub runtime: String,
    pub entrypoint: Vec<String>,
    pub parameters: Map<String, Value>,
}

impl ResolvedTemplate {
    fn new(
        name: &str,
        from: &str,
        image: &str,
        runtime: &str,
        entrypoint: &[String],
        parameters: Map<String, Value>,
    ) -> Self {
        let digest = image_digest(image).unwrap_or_default();
        let parameters_hash = hex::encode(Sha256::digest(
            Value::Object(parameters.clone()).to_string(),
        ));
        let short = digest.trim_start_matches("sha256:");
        let version = format!(
            "{from}+{}+{}",
            &short[..short.len().min(12)],
            &parameters_hash[..12]
        );
        Self {
            name: name.to_string(),
            from: from.to_string(),
            version,
            image: image.to_string(),
            digest,
            runtime: runtime.to_string(),
            entrypoint: entrypoint.to_vec(),
            parameters,
        }
    }

    /// Whether a request derived it (it is not a shipped template itself).
    pub fn is_derived(&self) -> bool {
        self.name != self.from
    }

    /// The environment each parameter becomes in the job (`PRODSYS_PARAM_SEAWATER_MODEL`),
    /// with the template's name, version and image.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("PRODSYS_TEMPLATE".to_string(), self.name.clone()),
            ("PRODSYS_TEMPLATE_VERSION".to_string(), self.version.clone()),
            ("PRODSYS_IMAGE".to_string(), self.image.clone()),
        ];
        for (key, value) in &self.parameters {
            let name: String = key
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            env.push((format!("{PARAMETER_ENV_PREFIX}{name}"), value));
        }
        env
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("templates file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot read templates from {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads every `*.json` of `dir`: profile name → its templates by name.
/// A directory that does not exist holds no templates.
pub(crate) fn load_templates_dir(
    dir: &Path,
) -> Result<Vec<(PathBuf, String, Vec<Template>)>, TemplateError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TemplateError::Io { path, source }
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let invalid = |reason: String| TemplateError::Invalid {
            path: path.clone(),
            reason,
        };
        let file: TemplatesFile =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let mut templates = Vec::new();
        for (name, spec) in file.templates {
            templates.push(check_template(name, spec).map_err(invalid)?);
        }
        files.push((path, file.profile, templates));
    }
    Ok(files)
}

/// Template names: what a request may spell, and a file name or a label can hold.
pub fn is_template_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

fn check_template(name: String, spec: TemplateSpec) -> Result<Template, String> {
    if !is_template_name(&name) {
        return Err(format!(
            "template name {name:?} must be lower-case letters, digits, '.', '_' or '-'"
        ));
    }
    if image_digest(&spec.image).is_none() {
        return Err(format!(
            "template {name}: image {:?} is not pinned by digest (<name>@sha256:<64 hex>)",
            spec.image
        ));
    }
    if spec.entrypoint.is_empty() {
        return Err(format!("template {name}: entrypoint is empty"));
    }
    let mut validators = BTreeMap::new();
    for (parameter, schema) in &spec.overridable {
        let validator = jsonschema::validator_for(schema).map_err(|e| {
            format!("template {name}: overridable {parameter:?} is not a valid JSON Schema: {e}")
        })?;
        if let Some(default) = spec.parameters.get(parameter)
            && let Some(error) = validator.iter_errors(default).next()
        {
            return Err(format!(
                "template {name}: default {parameter:?} does not satisfy its own schema: {error}"
            ));
        }
        validators.insert(parameter.clone(), validator);
    }
    Ok(Template {
        name,
        description: spec.description,
        image: spec.image,
        runtime: spec.runtime,
        entrypoint: spec.entrypoint,
        parameters: spec.parameters,
        overridable: spec.overridable,
        validators,
    })
}

/// A profile's containers: its policy and the templates the deployment ships.
#[derive(Debug)]
pub struct Containers {
    pub policy: ContainerPolicy,
    pub templates: BTreeMap<String, Template>,
}

/// The templates recorded earlier (derivations), as the caller can look them up.
pub trait RecordedTemplates {
    fn recorded(&self, name: &str) -> Option<ResolvedTemplate>;
}

impl RecordedTemplates for BTreeMap<String, ResolvedTemplate> {
    fn recorded(&self, name: &str) -> Option<ResolvedTemplate> {
        self.get(name).cloned()
    }
}

impl Containers {
    /// Resolves a request's template: `container_template`, possibly derived
    /// by `derived_template`. With `recorded` `None` (a caller that cannot
    /// see recorded derivations) a name that is not shipped is not judged
    /// and the answer is `Ok(None)`.
    pub fn resolve(
        &self,
        vo: &str,
        parameters: &Value,
        recorded: Option<&dyn RecordedTemplates>,
    ) -> Result<Option<ResolvedTemplate>, Vec<Violation>> {
        let mut violations = Vec::new();
        let name = parameters
            .get("container_template")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let derived = parameters.get("derived_template");
        // The template named, as shipped or as recorded.
        let base = match self.templates.get(name) {
            Some(t) => Some(t.resolved()),
            None => match recorded {
                None => None,
                Some(r) => match r.recorded(name) {
                    Some(t) => Some(t),
                    None => {
                        let known: Vec<&str> = self.templates.keys().map(String::as_str).collect();
                        violations.push(Violation::new(
                            "parameters.container_template",
                            format!(
                                "unknown template {name:?}; shipped templates: {} (or a template derived earlier)",
                                known.join(", ")
                            ),
                        ));
                        None
                    }
                },
            },
        };
        if let Some(image) = derived.and_then(|d| d.get("image")).and_then(Value::as_str) {
            if image_digest(image).is_none() {
                violations.push(Violation::new(
                    "parameters.derived_template.image",
                    format!("{image:?} is not pinned by digest (<name>@sha256:<64 hex>)"),
                ));
            } else if !self.policy.allows(vo, image) {
                let allowed = self
                    .policy
                    .allowed_images
                    .get(vo)
                    .map(|p| p.join(", "))
                    .unwrap_or_else(|| "none".into());
                violations.push(Violation::new(
                    "parameters.derived_template.image",
                    format!("{image} is not an image {vo} may run (allowed: {allowed})"),
                ));
            }
        }
        let derived_name = derived.and_then(|d| d.get("name")).and_then(Value::as_str);
        if let Some(new_name) = derived_name
            && self.templates.contains_key(new_name)
        {
            violations.push(Violation::new(
                "parameters.derived_template.name",
                format!("{new_name:?} is a shipped template; a derivation needs a name of its own"),
            ));
        }
        let Some(base) = base else {
            return if violations.is_empty() {
                Ok(None)
            } else {
                Err(violations)
            };
        };
        let Some(root) = self.templates.get(&base.from) else {
            violations.push(Violation::new(
                "parameters.container_template",
                format!(
                    "template {name:?} derives from {:?}, which this deployment no longer ships",
                    base.from
                ),
            ));
            return Err(violations);
        };
        let Some(derived) = derived else {
            return if violations.is_empty() {
                Ok(Some(base))
            } else {
                Err(violations)
            };
        };
        let mut merged = base.parameters.clone();
        if let Some(overrides) = derived.get("parameters").and_then(Value::as_object) {
            for (key, value) in overrides {
                match root.check_override(key, value) {
                    Some(reason) => violations.push(Violation::new(
                        format!("parameters.derived_template.parameters.{key}"),
                        reason,
                    )),
                    None => {
                        merged.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        if !violations.is_empty() {
            return Err(violations);
        }
        let image = derived
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or(&base.image);
        let resolved = ResolvedTemplate::new(
            derived_name.unwrap_or_default(),
            &root.name,
            image,
            &root.runtime,
            &root.entrypoint,
            merged,
        );
        if let (Some(new_name), Some(r)) = (derived_name, recorded)
            && let Some(existing) = r.recorded(new_name)
            && existing.version != resolved.version
        {
            return Err(vec![Violation::new(
                "parameters.derived_template.name",
                format!(
                    "{new_name:?} already names another derivation (version {}); choose another name or use it as container_template",
                    existing.version
                ),
            )]);
        }
        Ok(Some(resolved))
    }

    /// The command of a container job: the runtime's command line, the job's
    /// environment as `--env` flags, the image, the entrypoint and `args`.
    pub fn command(
        &self,
        template: &ResolvedTemplate,
        vars: &BTreeMap<String, String>,
        env: &[(String, String)],
        args: Vec<String>,
    ) -> Result<Vec<String>, String> {
        let runtime = self.policy.runtimes.get(&template.runtime).ok_or_else(|| {
            format!(
                "template {} wants runtime {:?}, which the profile does not describe",
                template.name, template.runtime
            )
        })?;
        let mut command: Vec<String> = runtime
            .iter()
            .map(|t| crate::profile::render(t, vars))
            .collect();
        for (key, value) in env.iter().cloned().chain(template.env()) {
            command.push("--env".into());
            command.push(format!("{key}={value}"));
        }
        command.push(template.image.clone());
        command.extend(template.entrypoint.iter().cloned());
        command.extend(args);
        Ok(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_repositories() {
        assert!(glob("localhost/km3net/*", "localhost/km3net/toysim"));
        assert!(!glob("localhost/km3net/*", "localhost/other/toysim"));
        assert!(glob("*/km3net/*", "docker.io/km3net/gseagen"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
    }

    #[test]
    fn digests_are_read_from_pinned_references_only() {
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(
            image_digest(&format!("localhost/x@sha256:{hex}")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(image_digest("localhost/x:latest"), None);
        assert_eq!(image_digest("localhost/x@sha256:abc"), None);
    }
}
