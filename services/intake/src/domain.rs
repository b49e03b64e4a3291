//! Intake's decisions over plain types: what makes a request acceptable at
//! the door, what a stored request looks like, how a repeated idempotency key
//! is answered and how the checker's verdicts are gathered. No SQL, no
//! broker, no gRPC; IDs and times are passed in.

use prodsys_core::{ProfileSet, Violation};
use serde_json::Value;
use uuid::Uuid;

/// Longest backend, submitter or idempotency key.
pub const MAX_NAME: usize = 128;

/// Dispatch priorities a request may ask for.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

/// The backend a request that names none runs on.
pub const DEFAULT_BACKEND: &str = "local";

pub fn check_priority(priority: i32, violations: &mut Vec<Violation>) {
    if !PRIORITY_RANGE.contains(&priority) {
        violations.push(Violation::new(
            "priority",
            format!(
                "{priority} is outside {}..{}",
                PRIORITY_RANGE.start(),
                PRIORITY_RANGE.end()
            ),
        ));
    }
}

/// Most destinations a request may name in `forward`.
pub const MAX_FORWARD: usize = 16;

pub fn check_forward(forward: &[String], violations: &mut Vec<Violation>) {
    if forward.len() > MAX_FORWARD {
        violations.push(Violation::new(
            "forward",
            format!(
                "names {} destinations, more than {MAX_FORWARD}",
                forward.len()
            ),
        ));
    }
    for (i, name) in forward.iter().enumerate() {
        if name.is_empty() {
            violations.push(Violation::new(format!("forward[{i}]"), "is empty"));
        } else {
            check_name(&format!("forward[{i}]"), name, violations);
        }
    }
}

pub fn check_name(field: &str, value: &str, violations: &mut Vec<Violation>) {
    if value.len() > MAX_NAME {
        violations.push(Violation::new(
            field,
            format!("is longer than {MAX_NAME} characters"),
        ));
    } else if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c))
    {
        violations.push(Violation::new(
            field,
            "may hold only letters, digits and - _ . : / @",
        ));
    }
}

/// Every key and string of `value` can be stored: PostgreSQL's text and
/// jsonb hold no NUL character (`\0`), so one is a violation naming
/// where it is, not a database error.
pub fn check_storable(path: &str, value: &Value, violations: &mut Vec<Violation>) {
    const NUL: &str = "holds a NUL character (\\0), which cannot be stored";
    match value {
        Value::String(text) if text.contains('\0') => {
            violations.push(Violation::new(path, NUL));
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_storable(&format!("{path}[{i}]"), item, violations);
            }
        }
        Value::Object(fields) => {
            for (key, item) in fields {
                if key.contains('\0') {
                    violations.push(Violation::new(
                        format!("{path}.{}", key.escape_debug()),
                        NUL,
                    ));
                } else {
                    check_storable(&format!("{path}.{key}"), item, violations);
                }
            }
        }
        _ => {}
    }
}

/// `backend`, or the default when it names none.
pub fn backend_or_default(backend: &str) -> &str {
    if backend.is_empty() {
        DEFAULT_BACKEND
    } else {
        backend
    }
}

/// A SubmitRequest as it arrives, before it is checked.
pub struct Proposal<'a> {
    pub profile: &'a str,
    pub vo: &'a str,
    pub parameters_json: &'a str,
    pub backend: &'a str,
    pub submitter: &'a str,
    pub priority: i32,
    pub idempotency_key: &'a str,
    pub forward: &'a [String],
}

/// Checks a submitted request against its profile and the API's rules;
/// its parameters as JSON when it passes, every violation otherwise.
pub fn check_proposal(profiles: &ProfileSet, p: &Proposal<'_>) -> Result<Value, Vec<Violation>> {
    // Text that cannot be stored (NUL) is refused as such before anything
    // reads it: a period or template looked up by it would only say unknown.
    let mut unstorable = Vec::new();
    if let Ok(raw) = serde_json::from_str::<Value>(p.parameters_json) {
        check_storable("parameters", &raw, &mut unstorable);
    }
    // A request naming an observation period leaves to the period what it
    // sets (site, layout, pointings...): it is checked once the period is
    // applied, and stored as given.
    let checked = if names_period(profiles, p) {
        profiles
            .expand_request(p.profile, p.vo, p.parameters_json)
            .and_then(|(profile, _, _)| {
                let parameters = serde_json::from_str(p.parameters_json)
                    .map_err(|e| vec![Violation::new("parameters", e.to_string())])?;
                Ok((profile, parameters))
            })
    } else {
        profiles.validate_request(p.profile, p.vo, p.parameters_json)
    };
    let mut violations = Vec::new();
    check_name("backend", p.backend, &mut violations);
    check_name("submitter", p.submitter, &mut violations);
    check_priority(p.priority, &mut violations);
    check_forward(p.forward, &mut violations);
    if p.idempotency_key.len() > MAX_NAME {
        violations.push(Violation::new(
            "idempotency_key",
            format!("is longer than {MAX_NAME} characters"),
        ));
    } else if p.idempotency_key.chars().any(char::is_control) {
        violations.push(Violation::new(
            "idempotency_key",
            "holds a control character (NUL, newline, …)",
        ));
    }
    if !unstorable.is_empty() {
        violations.extend(unstorable);
        return Err(violations);
    }
    if let Ok((_, parameters)) = &checked {
        check_storable("parameters", parameters, &mut violations);
    }
    match checked {
        Ok((_, parameters)) if violations.is_empty() => Ok(parameters),
        Ok(_) => Err(violations),
        Err(mut found) => {
            found.extend(violations);
            Err(found)
        }
    }
}

/// Whether the proposal names an observation period its profile takes.
fn names_period(profiles: &ProfileSet, p: &Proposal<'_>) -> bool {
    let Some(profile) = profiles.get(p.profile) else {
        return false;
    };
    serde_json::from_str::<Value>(p.parameters_json).is_ok_and(|v| profile.names_period(&v))
}

/// What a VO has admitted and not yet finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VoLoad {
    pub productions: u64,
    pub jobs: u64,
}

/// The jobs a checked request plans, as its profile splits it (0 when it
/// splits by inputs, or a period decides later).
pub fn planned_jobs(profile: &prodsys_core::Profile, parameters: &Value) -> u64 {
    profile
        .plan(parameters, "", 0)
        .map_or(0, |plan| plan.job_count)
}

/// Why `vo`, with `load` admitted already, may not take a request of
/// `jobs` more jobs under `limits`.
pub fn over_limits(
    vo: &str,
    limits: &prodsys_config::VoLimits,
    load: VoLoad,
    jobs: u64,
) -> Vec<Violation> {
    let mut found = Vec::new();
    if let Some(max) = limits.max_productions_waiting
        && load.productions >= max
    {
        found.push(Violation::new(
            "vo",
            format!(
                "{vo} has {} productions waiting or in flight, its limit is {max}: wait for some to end",
                load.productions
            ),
        ));
    }
    if let Some(max) = limits.max_jobs_in_flight
        && load.jobs.saturating_add(jobs) > max
    {
        found.push(Violation::new(
            "vo",
            format!(
                "{vo} has {} jobs in flight and this request plans {jobs} more, over its limit of {max}",
                load.jobs
            ),
        ));
    }
    found
}

/// A checked SubmitRequest waiting for the next group commit.
pub struct Submission {
    /// Empty when the caller gave none.
    pub idempotency_key: String,
    pub profile: String,
    pub vo: String,
    pub parameters: Value,
    /// Never empty: [`backend_or_default`] was applied.
    pub backend: String,
    pub submitter: String,
    /// The token's issuer and subject (with tokens on): who may cancel
    /// the request's productions besides the VO's production managers.
    pub owner: Option<String>,
    pub extend: bool,
    pub reuse_existing: bool,
    pub priority: i32,
    pub forward: Vec<String>,
    pub forward_replace: bool,
}

/// What a stored (or replayed) submission is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub request_id: Uuid,
    /// The idempotency key was known: this is the earlier request.
    pub replayed: bool,
}

/// A request to store, from gRPC or from an event.
pub struct NewRequest<'a> {
    pub request_id: Uuid,
    pub idempotency_key: Option<&'a str>,
    pub profile: &'a str,
    pub vo: &'a str,
    pub parameters: &'a Value,
    pub backend: &'a str,
    pub submitter: &'a str,
    pub owner: Option<&'a str>,
    pub extend: bool,
    pub reuse_existing: bool,
    pub priority: i32,
    pub forward: &'a [String],
    pub forward_replace: bool,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    /// Refused at the door: stored as REJECTED with these reasons.
    pub violations: &'a [Violation],
}

impl<'a> NewRequest<'a> {
    /// A checked submission, stored under `request_id`.
    pub fn from_submission(s: &'a Submission, request_id: Uuid) -> Self {
        Self {
            request_id,
            idempotency_key: (!s.idempotency_key.is_empty()).then_some(s.idempotency_key.as_str()),
            profile: &s.profile,
            vo: &s.vo,
            parameters: &s.parameters,
            backend: &s.backend,
            submitter: &s.submitter,
            owner: s.owner.as_deref(),
            extend: s.extend,
            reuse_existing: s.reuse_existing,
            priority: s.priority,
            forward: &s.forward,
            forward_replace: s.forward_replace,
            correlation_id: None,
            reply_to: None,
            violations: &[],
        }
    }

    /// The state it is stored in.
    pub fn state(&self) -> &'static str {
        if self.violations.is_empty() {
            "RECEIVED"
        } else {
            "REJECTED"
        }
    }
}

/// The request stored earlier under a submission's idempotency key.
pub struct Earlier {
    pub request_id: Uuid,
    pub profile: String,
    pub parameters: Value,
}

/// The answer to a submission whose idempotency key was used before: the
/// earlier request when it is the same one, a conflict otherwise.
pub fn replay(s: &Submission, earlier: &Earlier) -> Result<Stored, String> {
    if earlier.profile != s.profile || earlier.parameters != s.parameters {
        Err(format!(
            "idempotency key {:?} was used for a different request ({})",
            s.idempotency_key, earlier.request_id
        ))
    } else {
        Ok(Stored {
            request_id: earlier.request_id,
            replayed: true,
        })
    }
}

/// The checker's verdicts in one batch, column by column for one update.
#[derive(Default)]
pub struct Verdicts<'a> {
    pub request_ids: Vec<Uuid>,
    pub outcomes: Vec<&'static str>,
    pub production_ids: Vec<&'a str>,
    pub existing: Vec<&'a str>,
    pub violations: Vec<Vec<Violation>>,
    /// Per verdict, the pointings of a period's request and what became
    /// of each (a JSON array; empty without a period).
    pub productions: Vec<Value>,
}

/// What became of one pointing of a request that named an observation
/// period, as the request keeps it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PointingOutcome {
    pub pointing: String,
    pub zenith_deg: f64,
    pub azimuth_deg: f64,
    pub production_id: String,
    pub fingerprint: String,
    pub existing_production_id: String,
    pub violations: Vec<Violation>,
}

impl<'a> Verdicts<'a> {
    /// Adds a verdict (`outcome` "accepted" or "rejected"); a second one
    /// for the same request is ignored, as the database would (the request
    /// is no longer RECEIVED).
    pub fn push(
        &mut self,
        request_id: Uuid,
        outcome: &'static str,
        production_id: &'a str,
        existing: &'a str,
        violations: Vec<Violation>,
    ) {
        self.push_grouped(
            request_id,
            outcome,
            production_id,
            existing,
            violations,
            Value::Array(Vec::new()),
        );
    }

    /// [`Verdicts::push`] for a request that named an observation period,
    /// with every pointing's outcome.
    pub fn push_grouped(
        &mut self,
        request_id: Uuid,
        outcome: &'static str,
        production_id: &'a str,
        existing: &'a str,
        violations: Vec<Violation>,
        productions: Value,
    ) {
        if self.request_ids.contains(&request_id) {
            return;
        }
        self.request_ids.push(request_id);
        self.outcomes.push(outcome);
        self.production_ids.push(production_id);
        self.existing.push(existing);
        self.violations.push(violations);
        self.productions.push(productions);
    }

    pub fn is_empty(&self) -> bool {
        self.request_ids.is_empty()
    }

    /// The state each verdict leaves its request in.
    pub fn states(&self) -> Vec<&'static str> {
        self.outcomes.iter().map(|o| verdict_state(o)).collect()
    }

    /// Where the verdict on `request_id` is.
    pub fn position(&self, request_id: Uuid) -> Option<usize> {
        self.request_ids.iter().position(|id| *id == request_id)
    }
}

/// The state a verdict's outcome leaves a request in.
pub fn verdict_state(outcome: &str) -> &'static str {
    if outcome == "accepted" {
        "ACCEPTED"
    } else {
        "REJECTED"
    }
}

/// The JSON answer to a publisher that named a `reply_to` queue.
pub fn reply_body(
    request_id: Uuid,
    correlation_id: &str,
    outcome: &str,
    production_id: &str,
    existing_production_id: &str,
    violations: &[Violation],
    productions: &Value,
) -> Value {
    let mut body = serde_json::json!({
        "request_id": request_id.to_string(),
        "correlation_id": correlation_id,
        "outcome": outcome,
        "production_id": production_id,
        "existing_production_id": existing_production_id,
        "violations": violations,
    });
    // A request that named an observation period: what became of each pointing.
    if productions.as_array().is_some_and(|p| !p.is_empty()) {
        body["productions"] = productions.clone();
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(violations: &[Violation]) -> Vec<&str> {
        violations.iter().map(|v| v.field.as_str()).collect()
    }

    #[test]
    fn nul_characters_anywhere_in_the_parameters_are_named() {
        let parameters = serde_json::json!({
            "fine": "text",
            "period": "2026\0winter",
            "levels": [1, "a\0"],
            "nested": { "k\0": 1, "ok": { "deep": "\0" } },
        });
        let mut v = Vec::new();
        check_storable("parameters", &parameters, &mut v);
        let mut found = fields(&v);
        found.sort();
        assert_eq!(
            found,
            [
                "parameters.levels[1]",
                "parameters.nested.k\\0",
                "parameters.nested.ok.deep",
                "parameters.period"
            ]
        );
        assert!(v[0].description.contains("NUL"), "{v:?}");
        let mut none = Vec::new();
        check_storable(
            "parameters",
            &serde_json::json!({"a": ["b", 1, null]}),
            &mut none,
        );
        assert!(none.is_empty());
    }

    #[test]
    fn names_priorities_and_keys_are_checked() {
        let mut v = Vec::new();
        check_name("backend", "slurm-cluster_1.a:b/c@d", &mut v);
        check_priority(1000, &mut v);
        check_priority(-1000, &mut v);
        assert!(v.is_empty(), "{v:?}");
        check_name("backend", "has space", &mut v);
        check_name("submitter", &"x".repeat(MAX_NAME + 1), &mut v);
        check_priority(1001, &mut v);
        assert_eq!(fields(&v), ["backend", "submitter", "priority"]);
        assert!(v[2].description.contains("1001 is outside -1000..1000"));

        let profiles = ProfileSet::default();
        let p = Proposal {
            profile: "none",
            vo: "vo",
            parameters_json: "{}",
            backend: "bad backend",
            submitter: "",
            priority: 0,
            idempotency_key: &"k".repeat(MAX_NAME + 1),
            forward: &["".into(), "a b".into()],
        };
        let found = check_proposal(&profiles, &p).expect_err("unknown profile");
        let found = fields(&found);
        assert!(found.contains(&"backend") && found.contains(&"idempotency_key"));
        assert!(found.contains(&"forward[0]") && found.contains(&"forward[1]"));
        assert!(found.len() >= 3, "{found:?}: the profile is unknown too");
    }

    #[test]
    fn a_period_request_is_checked_with_the_period_applied_and_stored_as_given() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let profiles = ProfileSet::load_dir(&root.join("profiles"))
            .unwrap()
            .with_periods(&root.join("periods"))
            .unwrap();
        let example: Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("examples/cta-irf-mc-period.json")).unwrap(),
        )
        .unwrap();
        let proposal = |parameters: &Value| -> Result<Value, Vec<Violation>> {
            let json = parameters.to_string();
            check_proposal(
                &profiles,
                &Proposal {
                    profile: "cta-irf-mc",
                    vo: "vo.cta.in2p3.fr",
                    parameters_json: &json,
                    backend: "local",
                    submitter: "",
                    priority: 0,
                    idempotency_key: "",
                    forward: &[],
                },
            )
        };
        // No site, layout, zenith, pointing or NSB levels: the period has them.
        let parameters = example["parameters"].clone();
        assert_eq!(proposal(&parameters).unwrap(), parameters);
        let mut off = parameters.clone();
        off["zenith_deg"] = 45.into();
        assert_eq!(
            fields(&proposal(&off).unwrap_err()),
            ["parameters.zenith_deg"]
        );
        let mut unknown = parameters.clone();
        unknown["observation_period"] = "nowhere".into();
        assert_eq!(
            fields(&proposal(&unknown).unwrap_err()),
            ["parameters.observation_period"]
        );
    }

    #[test]
    fn a_vo_over_its_limits_is_refused_on_vo() {
        let limits = prodsys_config::VoLimits {
            max_jobs_in_flight: Some(100),
            max_productions_waiting: Some(3),
        };
        let load = VoLoad {
            productions: 2,
            jobs: 60,
        };
        assert!(over_limits("cta", &limits, load, 40).is_empty());
        let over = over_limits("cta", &limits, load, 41);
        assert_eq!(fields(&over), ["vo"]);
        assert!(over[0].description.contains("limit of 100"), "{over:?}");
        let full = VoLoad {
            productions: 3,
            jobs: 0,
        };
        assert_eq!(fields(&over_limits("cta", &limits, full, 1)), ["vo"]);
        assert!(over_limits("cta", &Default::default(), full, u64::MAX).is_empty());
    }

    #[test]
    fn backend_defaults() {
        assert_eq!(backend_or_default(""), "local");
        assert_eq!(backend_or_default("slurm"), "slurm");
    }

    fn submission(profile: &str, parameters: Value) -> Submission {
        Submission {
            idempotency_key: "key-1".into(),
            profile: profile.into(),
            vo: "vo".into(),
            parameters,
            backend: "local".into(),
            submitter: String::new(),
            owner: None,
            extend: false,
            reuse_existing: false,
            priority: 0,
            forward: Vec::new(),
            forward_replace: false,
        }
    }

    #[test]
    fn a_known_key_replays_the_same_request_and_refuses_another() {
        let earlier = Earlier {
            request_id: Uuid::from_u128(7),
            profile: "cta".into(),
            parameters: serde_json::json!({"a": 1}),
        };
        let same = submission("cta", serde_json::json!({"a": 1}));
        assert_eq!(
            replay(&same, &earlier),
            Ok(Stored {
                request_id: Uuid::from_u128(7),
                replayed: true
            })
        );
        let other = submission("cta", serde_json::json!({"a": 2}));
        let conflict = replay(&other, &earlier).expect_err("different parameters");
        assert!(conflict.contains("\"key-1\" was used for a different request"));
        assert!(replay(&submission("lst", serde_json::json!({"a": 1})), &earlier).is_err());
    }

    #[test]
    fn a_new_request_is_received_unless_refused_at_the_door() {
        let s = submission("cta", serde_json::json!({}));
        let mut new = NewRequest::from_submission(&s, Uuid::from_u128(1));
        assert_eq!(new.idempotency_key, Some("key-1"));
        assert_eq!(new.state(), "RECEIVED");
        let refused = [Violation::new("energy", "too high")];
        new.violations = &refused;
        assert_eq!(new.state(), "REJECTED");
        let keyless = Submission {
            idempotency_key: String::new(),
            ..submission("cta", serde_json::json!({}))
        };
        assert_eq!(
            NewRequest::from_submission(&keyless, Uuid::from_u128(2)).idempotency_key,
            None
        );
    }

    #[test]
    fn one_verdict_per_request_in_a_batch() {
        let mut verdicts = Verdicts::default();
        assert!(verdicts.is_empty());
        verdicts.push(Uuid::from_u128(1), "accepted", "CTA-000001", "", Vec::new());
        verdicts.push(Uuid::from_u128(1), "rejected", "", "", Vec::new());
        verdicts.push(
            Uuid::from_u128(2),
            "rejected",
            "",
            "CTA-000001",
            vec![Violation::new("x", "y")],
        );
        assert_eq!(verdicts.request_ids.len(), 2);
        assert_eq!(verdicts.states(), ["ACCEPTED", "REJECTED"]);
        assert_eq!(verdicts.position(Uuid::from_u128(2)), Some(1));
        assert_eq!(verdicts.position(Uuid::from_u128(3)), None);
        let body = reply_body(
            Uuid::from_u128(2),
            "c-1",
            "rejected",
            "",
            "CTA-000001",
            &verdicts.violations[1],
            &verdicts.productions[1],
        );
        assert_eq!(body["outcome"], "rejected");
        assert_eq!(body["existing_production_id"], "CTA-000001");
        assert_eq!(body["violations"][0]["field"], "x");
        // Only a period's request says what became of each pointing.
        assert!(body.get("productions").is_none());
        let pointings = serde_json::json!([{ "pointing": "zenith 20 deg, azimuth 180 deg" }]);
        let body = reply_body(
            Uuid::from_u128(3),
            "c-2",
            "accepted",
            "CTA-000002",
            "",
            &[],
            &pointings,
        );
        assert_eq!(body["productions"], pointings);
    }
}
