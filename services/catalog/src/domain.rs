//! The catalog's decisions over plain types: how metadata is typed, what a
//! file from elsewhere must look like, and how file and identity queries
//! become SQL parameters (containment for equalities, SQL/JSON paths for the
//! rest). No SQL execution, no broker, no gRPC.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prodsys_core::Violation;
use prodsys_core::profile::MetadataType;
use serde_json::{Map, Value};

pub mod record;

/// Most identities one FindExistingMany call may ask about.
pub const MAX_EXISTING_QUERIES: usize = 1000;

/// Most files in one page (and one streamed message).
pub const MAX_PAGE: u32 = 10_000;

/// The page size to answer with: `requested`, at most [`MAX_PAGE`], or
/// `default` when none was asked for.
pub fn page_size(requested: u32, default: u32) -> u32 {
    match requested {
        0 => default,
        n => n.min(MAX_PAGE),
    }
}

/// The type of every metadata key the profiles declare, and the keys whose
/// value is a file's own (the profiles' run keys): every other value a
/// file carries it shares with the other files of its class.
pub struct KeyTypes(pub BTreeMap<String, MetadataType>, pub BTreeSet<String>);

impl KeyTypes {
    /// Whether `key`'s value is a file's own rather than its class's.
    pub fn per_file(&self, key: &str) -> bool {
        self.1.contains(key)
    }

    /// Stored metadata as its class's part and the file's own part.
    pub fn split(&self, metadata: Map<String, Value>) -> (Map<String, Value>, Map<String, Value>) {
        metadata.into_iter().partition(|(k, _)| !self.per_file(k))
    }

    /// `value` of `key` as its declared type; `Ok(None)` for a key no
    /// profile declares.
    fn typed(&self, key: &str, value: &str) -> Result<Option<Value>, String> {
        match self.0.get(key) {
            Some(t) => t.parse(value).map(Some),
            None => Ok(None),
        }
    }

    /// Metadata as stored: declared keys typed, a value that is not of its
    /// key's type (or a key no profile declares) kept as a string.
    pub fn lenient(&self, metadata: &HashMap<String, String>) -> Map<String, Value> {
        metadata
            .iter()
            .map(|(k, v)| {
                let value = self
                    .typed(k, v)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| Value::String(v.clone()));
                (k.clone(), value)
            })
            .collect()
    }

    /// Metadata typed strictly: a violation per value not of its key's type.
    pub fn strict(
        &self,
        field: &str,
        metadata: &HashMap<String, String>,
        violations: &mut Vec<Violation>,
    ) -> Map<String, Value> {
        let mut typed = Map::new();
        for (k, v) in metadata {
            match self.typed(k, v) {
                Ok(value) => {
                    typed.insert(k.clone(), value.unwrap_or_else(|| Value::String(v.clone())));
                }
                Err(e) => violations.push(Violation::new(
                    format!("{field}.{k}"),
                    format!("{e}; {k} is a {} key", self.0[k].as_str()),
                )),
            }
        }
        typed
    }

    /// A query's value: the key must be declared and the value of its type.
    pub fn condition_value(&self, field: &str, key: &str, value: &str) -> Result<Value, Violation> {
        match self.0.get(key) {
            None => Err(Violation::new(
                field,
                format!(
                    "no profile declares metadata key {key:?}; known keys: {}",
                    self.0.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )),
            Some(t) => t
                .parse(value)
                .map_err(|e| Violation::new(field, format!("{e}; {key} is a {} key", t.as_str()))),
        }
    }
}

/// The run of a file from its own values: the highest integer among them
/// (the profiles name one run key each; a file from elsewhere may carry
/// several).
pub fn run_of(own: &Map<String, Value>) -> Option<i64> {
    own.values().filter_map(Value::as_i64).max()
}

/// Why a file from elsewhere cannot be registered, by field.
pub fn check_file(index: usize, lfn: &str, adler32: &str, url: &str) -> Vec<Violation> {
    let field = |name: &str| format!("files[{index}].{name}");
    let mut violations = Vec::new();
    if !lfn.starts_with('/') || lfn.len() > 1024 {
        violations.push(Violation::new(
            field("lfn"),
            "must be an absolute path of at most 1024 characters",
        ));
    }
    if adler32.len() != 8
        || !adler32
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        violations.push(Violation::new(
            field("adler32"),
            "must be 8 lowercase hex digits",
        ));
    }
    if url.is_empty() {
        violations.push(Violation::new(field("url"), "is required"));
    }
    violations
}

/// A SQL/JSON path literal for `key`'s value: `$."key"`.
pub fn path_key(key: &str) -> String {
    format!("$.{}", Value::String(key.to_string()))
}

/// The keys of an index definition of the form
/// `… USING btree (((metadata -> 'a'::text)), ((metadata -> 'b'::text)), min_lfn)`
/// (one key or more, then a class's first LFN), if it is one.
pub fn ordered_key(indexdef: &str) -> Option<Vec<String>> {
    let columns = indexdef.split_once(" USING btree (")?.1.strip_suffix(')')?;
    let keys = columns.strip_suffix(", min_lfn")?;
    keys.split(", ")
        .map(|column| {
            let key = column
                .strip_prefix("((metadata -> '")?
                .strip_suffix("'::text))")?;
            (!key.is_empty() && !key.contains('\'')).then(|| key.to_string())
        })
        .collect()
}

/// A condition's operator; `None` is one the caller left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Eq,
    Ne,
    In,
    Lt,
    Le,
    Gt,
    Ge,
}

/// One condition of a file query, as asked.
pub struct Condition<'a> {
    pub key: &'a str,
    pub operator: Option<Operator>,
    pub values: &'a [String],
}

/// What a FindFiles call asks for.
pub struct FileFilter<'a> {
    pub production_id: &'a str,
    pub dataset: &'a str,
    pub lfn_prefix: &'a str,
    pub metadata: &'a HashMap<String, String>,
    pub conditions: Vec<Condition<'a>>,
}

/// A file query as SQL parameters. On classes (what files share):
/// containment for equalities (the GIN index), a SQL/JSON path predicate
/// for everything else, and the `=` conditions on the keys of an index of
/// their values and the first LFN (`ordered`: keys and values, in the
/// index's order), which reads classes in LFN order. On each file's own
/// values (its run): `file_equal` and `file_path` the same way.
#[derive(Debug, Clone, PartialEq)]
pub struct FileQuery {
    pub production_id: String,
    pub equal: Value,
    pub path: Option<String>,
    pub lfn_prefix: String,
    pub ordered: Vec<(String, Value)>,
    pub file_equal: Value,
    pub file_path: Option<String>,
}

impl FileQuery {
    /// Whether the query selects classes (a production or a condition on
    /// what files share); otherwise it is answered from files by LFN.
    pub fn selects_classes(&self) -> bool {
        !self.production_id.is_empty()
            || self.equal.as_object().is_some_and(|m| !m.is_empty())
            || self.path.is_some()
            || !self.ordered.is_empty()
    }
}

/// Checks a file filter and turns it into a query, or every reason it
/// cannot be answered, by field.
///
/// `ordered_keys` are the keys of the indexes of metadata values and the
/// LFN: of those whose every key has an `=` condition, the one of most keys
/// is chosen, and its conditions are left out of the path and asked as
/// expressions that index answers in LFN order. (The LFNs group files by
/// campaign, site and particle, so the files of one particle can lie behind
/// millions of others in LFN order; and a condition asked twice, as an
/// expression and in the path, would have the planner count its
/// selectivity twice.)
pub fn file_query(
    types: &KeyTypes,
    r: &FileFilter<'_>,
    ordered_keys: &[Vec<String>],
) -> Result<FileQuery, Vec<Violation>> {
    let mut violations = Vec::new();
    let mut equal = Map::new();
    let mut file_equal = Map::new();
    // Each term with the key and value of an `=` condition, if it is one.
    let mut terms_of: Vec<(String, Option<(&str, Value)>)> = Vec::new();
    let mut file_terms: Vec<String> = Vec::new();
    for (key, value) in r.metadata {
        match types.condition_value(&format!("metadata.{key}"), key, value) {
            Ok(v) if types.per_file(key) => {
                file_equal.insert(key.clone(), v);
            }
            Ok(v) => {
                equal.insert(key.clone(), v);
            }
            Err(v) => violations.push(v),
        }
    }
    if !r.dataset.is_empty() {
        match types.condition_value("dataset", "dataset", r.dataset) {
            Ok(v) => {
                equal.insert("dataset".into(), v);
            }
            Err(v) => violations.push(v),
        }
    }
    for (i, c) in r.conditions.iter().enumerate() {
        let field = |name: &str| format!("conditions[{i}].{name}");
        let Some(operator) = c.operator else {
            violations.push(Violation::new(
                field("operator"),
                "give one of =, !=, in, <, <=, >, >=",
            ));
            continue;
        };
        let symbol = match operator {
            Operator::Eq | Operator::In => "==",
            Operator::Ne => "!=",
            Operator::Lt => "<",
            Operator::Le => "<=",
            Operator::Gt => ">",
            Operator::Ge => ">=",
        };
        let several = operator == Operator::In;
        if c.values.is_empty() || (!several && c.values.len() != 1) {
            violations.push(Violation::new(
                field("values"),
                if several {
                    "give at least one value".to_string()
                } else {
                    format!("give exactly one value, not {}", c.values.len())
                },
            ));
            continue;
        }
        let mut terms = Vec::new();
        let mut typed = None;
        for (j, text) in c.values.iter().enumerate() {
            let which = if several {
                format!("conditions[{i}].values[{j}]")
            } else {
                field("values")
            };
            let which = if types.0.contains_key(c.key) {
                which
            } else {
                field("key")
            };
            match types.condition_value(&which, c.key, text) {
                Ok(v) => {
                    terms.push(format!("{} {symbol} {v}", path_key(c.key)));
                    typed = Some(v);
                }
                Err(v) => {
                    violations.push(v);
                    break;
                }
            }
        }
        if terms.len() == c.values.len() {
            let term = format!("({})", terms.join(" || "));
            if types.per_file(c.key) {
                file_terms.push(term);
                continue;
            }
            match typed {
                Some(value) if operator == Operator::Eq => {
                    terms_of.push((term, Some((c.key, value))));
                }
                _ => terms_of.push((term, None)),
            }
        }
    }
    let equalities: Vec<&str> = terms_of
        .iter()
        .filter_map(|(_, eq)| eq.as_ref().map(|(k, _)| *k))
        .collect();
    let index = ordered_keys
        .iter()
        .filter(|keys| keys.iter().all(|k| equalities.contains(&k.as_str())))
        .max_by_key(|keys| keys.len());
    let mut ordered = Vec::new();
    let mut path = Vec::new();
    for (term, eq) in terms_of {
        match eq {
            Some((key, value))
                if index.is_some_and(|keys| keys.iter().any(|k| k == key))
                    && !ordered.iter().any(|(k, _): &(String, Value)| k == key) =>
            {
                ordered.push((key.to_string(), value));
            }
            _ => path.push(term),
        }
    }
    if let Some(keys) = index {
        ordered.sort_by_key(|(k, _)| keys.iter().position(|i| i == k));
    }
    if r.production_id.is_empty()
        && r.lfn_prefix.is_empty()
        && equal.is_empty()
        && path.is_empty()
        && ordered.is_empty()
        && file_equal.is_empty()
        && file_terms.is_empty()
        && violations.is_empty()
    {
        violations.push(Violation::new(
            "production_id",
            "give a production ID, a dataset, an LFN prefix or at least one metadata condition",
        ));
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(FileQuery {
        production_id: r.production_id.to_string(),
        equal: Value::Object(equal),
        path: (!path.is_empty()).then(|| path.join(" && ")),
        lfn_prefix: r.lfn_prefix.to_string(),
        ordered,
        file_equal: Value::Object(file_equal),
        file_path: (!file_terms.is_empty()).then(|| file_terms.join(" && ")),
    })
}

/// A range an identity's files must overlap (when they carry both keys).
pub struct Range<'a> {
    pub min_key: &'a str,
    pub max_key: &'a str,
    pub min: f64,
    pub max: f64,
}

/// One identity FindExisting asks about.
pub struct Identity<'a> {
    pub metadata: &'a HashMap<String, String>,
    pub if_present: &'a HashMap<String, String>,
    pub ranges: Vec<Range<'a>>,
    pub run_key: &'a str,
}

/// An identity as the existence check compares it: its values typed as
/// the catalog stores them.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedIdentity {
    /// Keys every class of the identity holds with these values.
    pub required: Map<String, Value>,
    /// Keys a class may lack, but not hold with another value.
    pub if_present: Map<String, Value>,
    pub ranges: Vec<TypedRange>,
    /// The profile's run key (empty: none), whose largest value is told.
    pub run_key: String,
}

/// A numeric range an identity covers: a class whose `[min_key, max_key]`
/// overlaps `(min, max)` is the same simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedRange {
    pub min_key: String,
    pub max_key: String,
    pub min: f64,
    pub max: f64,
}

/// Checks the identities and types their values, or every reason they
/// cannot be answered, by field.
pub fn typed_identities(
    types: &KeyTypes,
    queries: &[Identity<'_>],
) -> Result<Vec<TypedIdentity>, Vec<Violation>> {
    let mut violations = Vec::new();
    let mut typed = Vec::with_capacity(queries.len());
    for (i, q) in queries.iter().enumerate() {
        let required = types.strict(
            &format!("queries[{i}].metadata"),
            q.metadata,
            &mut violations,
        );
        let if_present = types.strict(
            &format!("queries[{i}].if_present"),
            q.if_present,
            &mut violations,
        );
        for (field, map) in [("metadata", q.metadata), ("if_present", q.if_present)] {
            for key in map.keys().filter(|k| types.per_file(k)) {
                violations.push(Violation::new(
                    format!("queries[{i}].{field}.{key}"),
                    format!(
                        "{key} is each file's own value (its run), not part of a simulation's \
                         identity; FindFiles selects files by it"
                    ),
                ));
            }
        }
        let mut ranges = Vec::new();
        for (j, r) in q.ranges.iter().enumerate() {
            if !(r.min.is_finite() && r.max.is_finite()) {
                violations.push(Violation::new(
                    format!("queries[{i}].ranges[{j}]"),
                    "min and max must be numbers",
                ));
                continue;
            }
            ranges.push(TypedRange {
                min_key: r.min_key.to_string(),
                max_key: r.max_key.to_string(),
                min: r.min,
                max: r.max,
            });
        }
        typed.push(TypedIdentity {
            required,
            if_present,
            ranges,
            run_key: q.run_key.to_string(),
        });
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(typed)
}

/// A class of files that holds an identity's required metadata: what the
/// existence check weighs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CandidateClass {
    pub production_id: String,
    pub file_count: u64,
    pub total_bytes: u64,
    pub max_run: Option<i64>,
    /// Its first LFNs (three at most, in LFN order).
    pub first_lfns: Vec<String>,
    /// Its metadata beyond the identity's required pairs (which it holds).
    pub metadata: Map<String, Value>,
}

/// What the catalog holds of one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existence {
    /// Files and bytes of the classes that are the same simulation.
    pub file_count: u64,
    pub total_bytes: u64,
    /// Their productions (in ID order).
    pub production_ids: Vec<String>,
    /// Keys the identity names that those classes lack (in name order).
    pub missing_keys: Vec<String>,
    /// The largest run of those classes (0: none, or no run key).
    pub last_run: u64,
    /// Productions of classes with the required metadata that differ in an
    /// optional key or a range, and those keys (both in order).
    pub differing_production_ids: Vec<String>,
    pub differing_keys: Vec<String>,
    /// The first three LFNs of the matching classes.
    pub example_lfns: Vec<String>,
}

/// Two metadata values equal as the catalog compares them: numbers by
/// value, text by text; `None` when their types differ (no answer).
fn same_value(a: &Value, b: &Value) -> Option<bool> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => Some(x.as_f64() == y.as_f64()),
        (Value::String(x), Value::String(y)) => Some(x == y),
        (Value::Bool(x), Value::Bool(y)) => Some(x == y),
        _ => None,
    }
}

/// Whether `class` is the same simulation as `identity` (it holds the
/// required metadata already): each optional key absent or equal, each
/// range absent or overlapping. A comparison of values of different types
/// has no answer, and then the class is not the same.
fn same_simulation(identity: &TypedIdentity, class: &Map<String, Value>) -> bool {
    let optional = identity.if_present.iter().all(|(key, value)| {
        class
            .get(key)
            .is_none_or(|held| same_value(held, value) == Some(true))
    });
    optional
        && identity
            .ranges
            .iter()
            .all(|r| match (class.get(&r.min_key), class.get(&r.max_key)) {
                (Some(lo), Some(hi)) => match (lo.as_f64(), hi.as_f64()) {
                    (Some(lo), Some(hi)) => lo < r.max && hi > r.min,
                    _ => false,
                },
                _ => true,
            })
}

/// The keys in which a class with the required metadata differs from the
/// identity: optional keys it holds with another value, and ranges (named
/// `min_key..max_key`) both of whose keys are numbers that do not overlap.
fn differing_keys(identity: &TypedIdentity, class: &Map<String, Value>) -> Vec<String> {
    let mut keys: Vec<String> = identity
        .if_present
        .iter()
        .filter(|(key, value)| {
            class
                .get(*key)
                .is_some_and(|held| same_value(held, value) != Some(true))
        })
        .map(|(key, _)| key.clone())
        .collect();
    for r in &identity.ranges {
        let lo = class.get(&r.min_key).and_then(Value::as_f64);
        let hi = class.get(&r.max_key).and_then(Value::as_f64);
        if let (Some(lo), Some(hi)) = (lo, hi)
            && !(lo < r.max && r.min < hi)
        {
            keys.push(format!("{}..{}", r.min_key, r.max_key));
        }
    }
    keys
}

/// What the catalog holds of `identity`, from the classes holding its
/// required metadata: those that are the same simulation counted (files,
/// bytes, productions, largest run, first LFNs, the keys it names that they
/// lack), the others named with the keys they differ in.
pub fn existence(identity: &TypedIdentity, classes: &[CandidateClass]) -> Existence {
    let mut same = Existence::default();
    let mut productions = BTreeSet::new();
    let mut missing = BTreeSet::new();
    let mut differing = BTreeSet::new();
    let mut differing_keys_all = BTreeSet::new();
    let mut lfns = BTreeSet::new();
    let mut last_run: Option<i64> = None;
    let named: Vec<&str> = identity
        .if_present
        .keys()
        .map(String::as_str)
        .chain(
            identity
                .ranges
                .iter()
                .flat_map(|r| [r.min_key.as_str(), r.max_key.as_str()]),
        )
        .collect();
    for class in classes.iter().filter(|c| c.file_count > 0) {
        if same_simulation(identity, &class.metadata) {
            same.file_count += class.file_count;
            same.total_bytes += class.total_bytes;
            productions.insert(class.production_id.clone());
            missing.extend(
                named
                    .iter()
                    .filter(|k| !class.metadata.contains_key(**k))
                    .map(|k| k.to_string()),
            );
            if !identity.run_key.is_empty()
                && let Some(run) = class.max_run
            {
                last_run = Some(last_run.map_or(run, |l| l.max(run)));
            }
            lfns.extend(class.first_lfns.iter().take(3).cloned());
        } else {
            differing.insert(class.production_id.clone());
            differing_keys_all.extend(differing_keys(identity, &class.metadata));
        }
    }
    same.production_ids = productions.into_iter().collect();
    same.missing_keys = missing.into_iter().collect();
    same.last_run = last_run.unwrap_or(0).max(0) as u64;
    same.differing_production_ids = differing.into_iter().collect();
    same.differing_keys = differing_keys_all.into_iter().collect();
    same.example_lfns = lfns.into_iter().take(3).collect();
    same
}

/// Why a FindExistingMany call cannot be answered: identities without
/// metadata (by index, from `metadata_empty`) and too many of them.
pub fn check_existing_many(
    metadata_empty: impl Iterator<Item = bool>,
    count: usize,
) -> Vec<Violation> {
    let mut violations: Vec<Violation> = metadata_empty
        .enumerate()
        .filter(|(_, empty)| *empty)
        .map(|(i, _)| Violation::new(format!("queries[{i}].metadata"), "give at least one pair"))
        .collect();
    if count > MAX_EXISTING_QUERIES {
        violations.push(Violation::new(
            "queries",
            format!("{count} queries; at most {MAX_EXISTING_QUERIES} in one call"),
        ));
    }
    violations
}

/// Stored metadata as the API shows it: every value as text.
pub fn as_text(metadata: Value) -> HashMap<String, String> {
    match metadata {
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect(),
        _ => HashMap::new(),
    }
}

/// A replica state as stored, in the API's words.
pub fn replica_state(state: &str) -> prodsys_proto::ReplicaState {
    use prodsys_proto::ReplicaState as S;
    match state {
        "pending" => S::Pending,
        "copying" => S::Copying,
        "verified" => S::Verified,
        "registered" => S::Registered,
        "failed" => S::Failed,
        _ => S::Unspecified,
    }
}

/// The PostgreSQL advisory lock key that orders a production's forwarding
/// plan and its registrations (FNV-1a, stable across processes).
pub fn forwarding_lock_key(production_id: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("prodsys.catalog.forward.{production_id}").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// How long a replica waits after its `attempts`-th failed copy: the
/// workspace's backoff (doubling from `min` up to `max`), placed in its step
/// by `jitter`, a number in [0, 1] the caller draws (0: half the step, 1: all
/// of it), so replicas that failed together do not retry together.
pub fn retry_wait_jittered(
    attempts: u32,
    min: std::time::Duration,
    max: std::time::Duration,
    jitter: f64,
) -> std::time::Duration {
    let mut backoff = prodsys_messaging::Backoff::new(min, max);
    let mut wait = backoff.next_wait_with(jitter);
    for _ in 1..attempts.clamp(1, 32) {
        wait = backoff.next_wait_with(jitter);
    }
    wait
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn retries_wait_longer_each_time_up_to_the_cap() {
        let ms = std::time::Duration::from_millis;
        let (min, max) = (ms(100), ms(1600));
        // The first step is `min`; the jitter places the wait in its upper half.
        assert_eq!(retry_wait_jittered(0, min, max, 0.0), ms(50));
        assert_eq!(retry_wait_jittered(1, min, max, 0.0), ms(50));
        assert_eq!(retry_wait_jittered(1, min, max, 1.0), ms(100));
        // The fourth doubles three times.
        assert_eq!(retry_wait_jittered(4, min, max, 0.0), ms(400));
        assert_eq!(retry_wait_jittered(4, min, max, 0.5), ms(600));
        // Then the cap.
        assert_eq!(retry_wait_jittered(6, min, max, 1.0), ms(1600));
        assert_eq!(retry_wait_jittered(1000, min, max, 0.25), ms(1000));
        // Drawn, the jitter stays within the step.
        let drawn = retry_wait_jittered(4, min, max, prodsys_messaging::backoff::unit_random());
        assert!(drawn >= ms(400) && drawn <= ms(800), "{drawn:?}");
    }

    #[test]
    fn replica_states_and_lock_keys() {
        assert_eq!(
            replica_state("verified"),
            prodsys_proto::ReplicaState::Verified
        );
        assert_eq!(
            replica_state("nonsense"),
            prodsys_proto::ReplicaState::Unspecified
        );
        assert_eq!(
            forwarding_lock_key("CTA-000001"),
            forwarding_lock_key("CTA-000001")
        );
        assert_ne!(
            forwarding_lock_key("CTA-000001"),
            forwarding_lock_key("CTA-000002")
        );
    }

    fn types() -> KeyTypes {
        KeyTypes(
            BTreeMap::from([
                ("run_number".to_string(), MetadataType::Integer),
                ("thetaP".to_string(), MetadataType::Float),
                ("site".to_string(), MetadataType::String),
                ("dataset".to_string(), MetadataType::String),
                ("nsb".to_string(), MetadataType::Integer),
            ]),
            BTreeSet::from(["run_number".to_string()]),
        )
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn metadata_is_typed_leniently_for_storage_and_strictly_for_queries() {
        let t = types();
        let stored = t.lenient(&map(&[
            ("run_number", "7"),
            ("thetaP", "x"),
            ("other", "1"),
        ]));
        assert_eq!(stored["run_number"], serde_json::json!(7));
        assert_eq!(stored["thetaP"], serde_json::json!("x"));
        assert_eq!(stored["other"], serde_json::json!("1"));
        let mut violations = Vec::new();
        let strict = t.strict(
            "m",
            &map(&[("run_number", "seven"), ("site", "Paranal")]),
            &mut violations,
        );
        assert_eq!(strict.len(), 1);
        assert_eq!(violations[0].field, "m.run_number");
        assert!(
            violations[0]
                .description
                .contains("run_number is a integer key")
        );
        assert!(t.condition_value("f", "nope", "1").is_err());
    }

    #[test]
    fn files_from_elsewhere_need_an_absolute_lfn_a_checksum_and_a_url() {
        assert!(check_file(0, "/a/b", "0123abcd", "file:///a/b").is_empty());
        let fields: Vec<String> = check_file(3, "a/b", "0123ABCD", "")
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["files[3].lfn", "files[3].adler32", "files[3].url"]);
    }

    #[test]
    fn a_file_filter_becomes_containment_and_a_path() {
        let t = types();
        let metadata = map(&[("site", "Paranal")]);
        let values = vec!["1".to_string(), "2".to_string()];
        let below = vec!["30".to_string()];
        let q = file_query(
            &t,
            &FileFilter {
                production_id: "",
                dataset: "",
                lfn_prefix: "",
                metadata: &metadata,
                conditions: vec![
                    Condition {
                        key: "run_number",
                        operator: Some(Operator::In),
                        values: &values,
                    },
                    Condition {
                        key: "thetaP",
                        operator: Some(Operator::Lt),
                        values: &below,
                    },
                ],
            },
            &[],
        )
        .expect("a valid filter");
        assert_eq!(q.equal, serde_json::json!({"site": "Paranal"}));
        // The run is each file's own: asked of files, the rest of classes.
        assert_eq!(q.path.as_deref(), Some(r#"($."thetaP" < 30)"#));
        assert_eq!(
            q.file_path.as_deref(),
            Some(r#"($."run_number" == 1 || $."run_number" == 2)"#)
        );
        assert!(q.selects_classes());
        let (class, own) = t.split(t.lenient(&map(&[("run_number", "7"), ("site", "x")])));
        assert_eq!(Value::Object(class), serde_json::json!({"site": "x"}));
        assert_eq!(Value::Object(own), serde_json::json!({"run_number": 7}));

        let empty = HashMap::new();
        let bad = file_query(
            &t,
            &FileFilter {
                production_id: "",
                dataset: "",
                lfn_prefix: "",
                metadata: &empty,
                conditions: vec![
                    Condition {
                        key: "thetaP",
                        operator: Some(Operator::Lt),
                        values: &values,
                    },
                    Condition {
                        key: "x",
                        operator: None,
                        values: &below,
                    },
                    Condition {
                        key: "nope",
                        operator: Some(Operator::Eq),
                        values: &below,
                    },
                ],
            },
            &[],
        )
        .expect_err("three bad conditions");
        let fields: Vec<&str> = bad.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "conditions[0].values",
                "conditions[1].operator",
                "conditions[2].key"
            ]
        );
        let nothing = file_query(
            &t,
            &FileFilter {
                production_id: "",
                dataset: "",
                lfn_prefix: "",
                metadata: &empty,
                conditions: Vec::new(),
            },
            &[],
        )
        .expect_err("no condition at all");
        assert_eq!(nothing[0].field, "production_id");
    }

    #[test]
    fn ordered_keys_are_read_from_index_definitions() {
        assert_eq!(
            ordered_key(
                "CREATE INDEX file_classes_particle_lfn ON cat.file_classes USING btree (((metadata -> 'particle'::text)), min_lfn)"
            ),
            Some(vec!["particle".to_string()])
        );
        assert_eq!(
            ordered_key(
                "CREATE INDEX file_classes_particle_nsb_lfn ON cat.file_classes USING btree (((metadata -> 'particle'::text)), ((metadata -> 'nsb'::text)), min_lfn)"
            ),
            Some(vec!["particle".to_string(), "nsb".to_string()])
        );
        assert_eq!(
            ordered_key(
                "CREATE INDEX files_cta_identity ON cat.files USING btree (((metadata -> 'site'::text)), ((metadata -> 'thetaP'::text)))"
            ),
            None
        );
        assert_eq!(
            ordered_key(
                "CREATE INDEX file_classes_production ON cat.file_classes USING btree (production_id, min_lfn)"
            ),
            None
        );
        assert_eq!(
            ordered_key(
                "CREATE INDEX files_particle_lfn ON cat.files USING btree (((metadata -> 'particle'::text)), lfn)"
            ),
            None
        );
        assert_eq!(
            ordered_key(
                "CREATE INDEX files_metadata ON cat.files USING gin (metadata jsonb_path_ops)"
            ),
            None
        );
    }

    #[test]
    fn an_equality_on_a_key_indexed_with_the_lfn_leaves_the_path() {
        let t = types();
        let empty = HashMap::new();
        let site = vec!["Paranal".to_string()];
        let below = vec!["30".to_string()];
        let conditions = || {
            vec![
                Condition {
                    key: "thetaP",
                    operator: Some(Operator::Lt),
                    values: &below,
                },
                Condition {
                    key: "site",
                    operator: Some(Operator::Eq),
                    values: &site,
                },
            ]
        };
        let filter = |conditions| FileFilter {
            production_id: "",
            dataset: "",
            lfn_prefix: "",
            metadata: &empty,
            conditions,
        };
        let q = file_query(&t, &filter(conditions()), &[vec!["site".to_string()]]).unwrap();
        assert_eq!(
            q.ordered,
            vec![("site".to_string(), serde_json::json!("Paranal"))]
        );
        assert_eq!(q.path.as_deref(), Some(r#"($."thetaP" < 30)"#));
        let plain = file_query(&t, &filter(conditions()), &[]).unwrap();
        assert!(plain.ordered.is_empty());
        assert_eq!(
            plain.path.as_deref(),
            Some(r#"($."thetaP" < 30) && ($."site" == "Paranal")"#)
        );
        // Alone, it is still a query.
        let only = file_query(
            &t,
            &filter(conditions().split_off(1)),
            &[vec!["site".to_string()]],
        )
        .unwrap();
        assert_eq!(only.path, None);
        assert!(!only.ordered.is_empty());
    }

    #[test]
    fn the_index_of_most_keys_that_the_equalities_cover_is_chosen() {
        let t = types();
        let empty = HashMap::new();
        let (site, nsb, below) = (
            vec!["Paranal".to_string()],
            vec!["5".to_string()],
            vec!["30".to_string()],
        );
        let conditions = vec![
            Condition {
                key: "nsb",
                operator: Some(Operator::Eq),
                values: &nsb,
            },
            Condition {
                key: "thetaP",
                operator: Some(Operator::Lt),
                values: &below,
            },
            Condition {
                key: "site",
                operator: Some(Operator::Eq),
                values: &site,
            },
        ];
        let filter = FileFilter {
            production_id: "",
            dataset: "",
            lfn_prefix: "",
            metadata: &empty,
            conditions,
        };
        let indexes = [
            vec!["site".to_string()],
            vec!["site".to_string(), "nsb".to_string()],
            // Not covered: no condition on particle.
            vec![
                "site".to_string(),
                "nsb".to_string(),
                "particle".to_string(),
            ],
        ];
        let q = file_query(&t, &filter, &indexes).unwrap();
        // In the index's order, whatever the order asked.
        assert_eq!(
            q.ordered,
            vec![
                ("site".to_string(), serde_json::json!("Paranal")),
                ("nsb".to_string(), serde_json::json!(5)),
            ]
        );
        assert_eq!(q.path.as_deref(), Some(r#"($."thetaP" < 30)"#));
    }

    #[test]
    fn identities_are_typed_and_bounds_must_be_numbers() {
        let t = types();
        let metadata = map(&[("site", "Paranal")]);
        let if_present = map(&[("thetaP", "20")]);
        let typed = typed_identities(
            &t,
            &[Identity {
                metadata: &metadata,
                if_present: &if_present,
                ranges: vec![Range {
                    min_key: "emin",
                    max_key: "emax",
                    min: 0.1,
                    max: 10.0,
                }],
                run_key: "run_number",
            }],
        )
        .expect("valid identities");
        assert_eq!(
            Value::Object(typed[0].required.clone()),
            json!({"site": "Paranal"})
        );
        assert_eq!(
            Value::Object(typed[0].if_present.clone()),
            json!({"thetaP": 20})
        );
        assert_eq!(typed[0].ranges[0].min_key, "emin");
        assert_eq!(typed[0].run_key, "run_number");
        let infinite = typed_identities(
            &t,
            &[Identity {
                metadata: &metadata,
                if_present: &HashMap::new(),
                ranges: vec![Range {
                    min_key: "a",
                    max_key: "b",
                    min: f64::NAN,
                    max: 1.0,
                }],
                run_key: "",
            }],
        )
        .expect_err("NaN is no bound");
        assert_eq!(infinite[0].field, "queries[0].ranges[0]");
        let too_many = check_existing_many([false, true].into_iter(), MAX_EXISTING_QUERIES + 1);
        let fields: Vec<&str> = too_many.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["queries[1].metadata", "queries"]);
        assert_eq!(page_size(0, 1000), 1000);
        assert_eq!(page_size(20_000, 1000), MAX_PAGE);
        assert_eq!(
            as_text(serde_json::json!({"n": 1.5, "s": "x"})),
            map(&[("n", "1.5"), ("s", "x")])
        );
    }

    fn class(
        production: &str,
        files: u64,
        max_run: i64,
        lfns: &[&str],
        metadata: Value,
    ) -> CandidateClass {
        CandidateClass {
            production_id: production.into(),
            file_count: files,
            total_bytes: files * 10,
            max_run: Some(max_run),
            first_lfns: lfns.iter().map(|l| l.to_string()).collect(),
            metadata: match metadata {
                Value::Object(map) => map,
                _ => unreachable!(),
            },
        }
    }

    #[test]
    fn the_same_simulation_is_counted_and_another_named_with_the_keys_it_differs_in() {
        let identity = TypedIdentity {
            required: Map::new(),
            if_present: json!({"nsb": 5, "thetaP": 20.0})
                .as_object()
                .unwrap()
                .clone(),
            ranges: vec![TypedRange {
                min_key: "emin".into(),
                max_key: "emax".into(),
                min: 1.0,
                max: 10.0,
            }],
            run_key: "run_number".into(),
        };
        let classes = [
            // The same: equal values (a number by value), an overlapping range.
            class(
                "P1",
                100,
                40,
                &["/b3", "/b1", "/b2"],
                json!({"nsb": 5, "thetaP": 20, "emin": 5.0, "emax": 50.0}),
            ),
            // The same, lacking the optional key and the range: said missing.
            class("P2", 10, 7, &["/a1"], json!({"thetaP": 20.0})),
            // Another NSB level: differs in nsb.
            class(
                "P3",
                100,
                90,
                &["/c1"],
                json!({"nsb": 19, "thetaP": 20.0, "emin": 5.0, "emax": 50.0}),
            ),
            // Another energy range: differs in emin..emax.
            class(
                "P4",
                100,
                90,
                &["/d1"],
                json!({"nsb": 5, "thetaP": 20.0, "emin": 10.0, "emax": 50.0}),
            ),
            // A value of another type has no answer: not the same, named.
            class("P5", 100, 90, &["/e1"], json!({"nsb": "5", "thetaP": 20.0})),
            // No files: not weighed at all.
            class("P6", 0, 0, &[], json!({"nsb": 19})),
        ];
        let e = existence(&identity, &classes);
        assert_eq!(e.file_count, 110);
        assert_eq!(e.total_bytes, 1100);
        assert_eq!(e.production_ids, ["P1", "P2"]);
        assert_eq!(e.missing_keys, ["emax", "emin", "nsb"]);
        assert_eq!(e.last_run, 40);
        assert_eq!(e.example_lfns, ["/a1", "/b1", "/b2"]);
        assert_eq!(e.differing_production_ids, ["P3", "P4", "P5"]);
        assert_eq!(e.differing_keys, ["emin..emax", "nsb"]);
        // Without a run key, no last run; nothing held, nothing said.
        let no_run = TypedIdentity {
            run_key: String::new(),
            ..identity.clone()
        };
        assert_eq!(existence(&no_run, &classes[..2]).last_run, 0);
        assert_eq!(existence(&identity, &[]), Existence::default());
    }
}
