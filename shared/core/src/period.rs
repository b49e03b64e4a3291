//! Observation periods: the conditions of a period of observations an IRF
//! production simulates, as data (one TOML file per period in the periods
//! directory). A period names its profile, site, array layout, the NSB
//! levels that occurred, the atmosphere model, its validity dates and its
//! pointings (a grid of zeniths × azimuths, or a list). A request that names
//! a period takes these as its parameters (overriding only what the
//! profile's `periods.overridable` allows) and becomes one production per
//! pointing it selects: all of the period's, or those its own zenith and
//! pointing pick out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Violation;

#[derive(Debug, thiserror::Error)]
pub enum PeriodError {
    #[error("period file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot read periods from {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How a profile's requests name a period and what they may change of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodSpec {
    /// The string parameter that names the period (`observation_period`).
    pub parameter: String,
    /// The parameter a pointing's zenith angle sets (`zenith_deg`).
    #[serde(default = "default_zenith")]
    pub zenith: String,
    /// The derived value a pointing's azimuth is (`azimuth_deg`, derived
    /// from `pointing`): a pointing sets the parameter it is derived from.
    #[serde(default = "default_azimuth")]
    pub azimuth: String,
    /// Condition parameters a request may give instead of the period's; a
    /// list must keep within the period's (a subset of its NSB levels).
    #[serde(default)]
    pub overridable: Vec<String>,
    /// The string parameter naming the nights a production is for
    /// (`observation_dates`): a date `YYYY-MM-DD` or a range
    /// `YYYY-MM-DD/YYYY-MM-DD`, within the period's validity.
    #[serde(default)]
    pub dates: Option<String>,
}

/// The first and last night `text` names: `YYYY-MM-DD`, or a range
/// `YYYY-MM-DD/YYYY-MM-DD` (ISO 8601) that does not end before it begins;
/// or why it does not.
pub fn parse_dates(text: &str) -> Result<(chrono::NaiveDate, chrono::NaiveDate), String> {
    let date = |part: &str| {
        chrono::NaiveDate::parse_from_str(part, "%Y-%m-%d")
            .ok()
            .filter(|_| part.len() == 10)
    };
    let (from, until) = match text.split_once('/') {
        Some((from, until)) => (date(from), date(until)),
        None => (date(text), date(text)),
    };
    match (from, until) {
        (Some(from), Some(until)) if from <= until => Ok((from, until)),
        (Some(from), Some(until)) => {
            Err(format!("{text:?} ends ({until}) before it begins ({from})"))
        }
        _ => Err(format!(
            "{text:?} is not a date or a range of dates (YYYY-MM-DD or YYYY-MM-DD/YYYY-MM-DD)"
        )),
    }
}

fn default_zenith() -> String {
    "zenith_deg".into()
}

fn default_azimuth() -> String {
    "azimuth_deg".into()
}

/// The condition parameters a period sets, in the order violations name them.
pub const CONDITIONS: &[&str] = &["site", "array_layout", "nsb_levels", "atmosphere"];

/// One telescope pointing of a period.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pointing {
    pub zenith_deg: f64,
    pub azimuth_deg: f64,
}

impl Pointing {
    /// `zenith 20 deg, azimuth 180 deg`.
    pub fn label(&self) -> String {
        format!(
            "zenith {} deg, azimuth {} deg",
            number(self.zenith_deg),
            number(self.azimuth_deg)
        )
    }
}

/// A number as people write it: 20, not 20.0.
fn number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

fn number_value(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        Value::from(f)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeriodFile {
    name: String,
    profile: String,
    #[serde(default)]
    description: String,
    site: String,
    array_layout: String,
    nsb_levels: Vec<u32>,
    atmosphere: String,
    valid_from: DateText,
    valid_until: DateText,
    pointings: PointingsFile,
}

/// A date as TOML writes it (`2026-11-01`) or as a string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DateText {
    Text(String),
    Date(toml::value::Datetime),
}

impl DateText {
    fn text(&self) -> String {
        match self {
            DateText::Text(s) => s.clone(),
            DateText::Date(d) => d.to_string(),
        }
    }
}

/// A grid (every zenith with every azimuth) or a list of pointings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PointingsFile {
    #[serde(default)]
    zenith_deg: Vec<f64>,
    #[serde(default)]
    azimuth_deg: Vec<f64>,
    #[serde(default)]
    list: Vec<Pointing>,
}

/// A loaded, checked observation period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Period {
    pub name: String,
    pub profile: String,
    pub description: String,
    pub site: String,
    pub array_layout: String,
    pub nsb_levels: Vec<u32>,
    pub atmosphere: String,
    /// `YYYY-MM-DD`.
    pub valid_from: String,
    pub valid_until: String,
    /// In the file's order: a grid zenith by zenith, each with every azimuth.
    pub pointings: Vec<Pointing>,
}

impl Period {
    /// Parses and checks a period file; `path` only names it in errors.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, PeriodError> {
        let invalid = |reason: String| PeriodError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let file: PeriodFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let name_ok = !file.name.is_empty()
            && file.name.len() <= 64
            && file
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !name_ok {
            return Err(invalid(format!(
                "name {:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
                file.name
            )));
        }
        let date = |label: &str, d: &DateText| {
            let text = d.text();
            chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d")
                .map(|_| text.clone())
                .map_err(|e| invalid(format!("{label} {text:?} is not a date (YYYY-MM-DD): {e}")))
        };
        let valid_from = date("valid_from", &file.valid_from)?;
        let valid_until = date("valid_until", &file.valid_until)?;
        if valid_from > valid_until {
            return Err(invalid(format!(
                "valid_from {valid_from} is after valid_until {valid_until}"
            )));
        }
        if file.nsb_levels.is_empty() {
            return Err(invalid("nsb_levels is empty".into()));
        }
        let grid = &file.pointings;
        let pointings: Vec<Pointing> = match (
            grid.list.is_empty(),
            grid.zenith_deg.is_empty() && grid.azimuth_deg.is_empty(),
        ) {
            (true, false) => {
                if grid.zenith_deg.is_empty() || grid.azimuth_deg.is_empty() {
                    return Err(invalid(
                        "pointings: a grid needs zenith_deg and azimuth_deg".into(),
                    ));
                }
                grid.zenith_deg
                    .iter()
                    .flat_map(|&zenith_deg| {
                        grid.azimuth_deg.iter().map(move |&azimuth_deg| Pointing {
                            zenith_deg,
                            azimuth_deg,
                        })
                    })
                    .collect()
            }
            (false, true) => grid.list.clone(),
            (true, true) => {
                return Err(invalid(
                    "pointings: give a grid (zenith_deg, azimuth_deg) or a list".into(),
                ));
            }
            (false, false) => {
                return Err(invalid(
                    "pointings: a grid (zenith_deg, azimuth_deg) or a list, not both".into(),
                ));
            }
        };
        for (i, p) in pointings.iter().enumerate() {
            if !(0.0..=90.0).contains(&p.zenith_deg) || !(0.0..360.0).contains(&p.azimuth_deg) {
                return Err(invalid(format!(
                    "pointing {}: zenith must be 0..90 and azimuth 0..360",
                    p.label()
                )));
            }
            if pointings[..i].contains(p) {
                return Err(invalid(format!("pointing {} is given twice", p.label())));
            }
        }
        Ok(Period {
            name: file.name,
            profile: file.profile,
            description: file.description,
            site: file.site,
            array_layout: file.array_layout,
            nsb_levels: file.nsb_levels,
            atmosphere: file.atmosphere,
            valid_from,
            valid_until,
            pointings,
        })
    }

    /// The value the period gives a condition parameter.
    fn condition(&self, name: &str) -> Option<Value> {
        match name {
            "site" => Some(Value::String(self.site.clone())),
            "array_layout" => Some(Value::String(self.array_layout.clone())),
            "nsb_levels" => Some(Value::from(self.nsb_levels.clone())),
            "atmosphere" => Some(Value::String(self.atmosphere.clone())),
            _ => None,
        }
    }
}

/// Every `*.toml` in `dir`, sorted by name; a directory that does not exist holds none.
pub fn load_dir(dir: &Path) -> Result<Vec<(PathBuf, Period)>, PeriodError> {
    let io = |path: &Path, source| PeriodError::Io {
        path: path.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir, e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut periods = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        let period = Period::from_toml(&path, &text)?;
        periods.push((path, period));
    }
    Ok(periods)
}

/// One production a request becomes: the pointing it simulates (none when
/// the request names no period) and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Expansion {
    pub pointing: Option<Pointing>,
    pub parameters: Value,
}

/// The pointing names of a profile (`North`) by azimuth: the map of the
/// derived value a pointing's azimuth is, and the parameter it derives from.
pub struct Directions {
    pub parameter: String,
    pub by_name: BTreeMap<String, f64>,
}

impl Directions {
    pub fn name_of_azimuth(&self, azimuth: f64) -> Option<&str> {
        self.by_name
            .iter()
            .find(|(_, a)| (**a - azimuth).abs() < 1e-9)
            .map(|(name, _)| name.as_str())
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => items.iter().map(show).collect::<Vec<_>>().join(", "),
        Value::Number(n) => n.as_f64().map(number).unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

/// The productions a request for `period` becomes: its parameters with the
/// period's conditions, once per pointing it selects (every pointing, or
/// those its own zenith and pointing name pick out). A condition the
/// request contradicts, or a pointing off the period's, is a violation.
pub fn expand(
    spec: &PeriodSpec,
    period: &Period,
    directions: &Directions,
    parameters: &Value,
) -> Result<Vec<Expansion>, Vec<Violation>> {
    let mut violations = Vec::new();
    let mut resolved = parameters.clone();
    let Some(object) = resolved.as_object_mut() else {
        return Err(vec![Violation::new("parameters", "must be a JSON object")]);
    };
    let of = format!("observation period {}", period.name);
    for name in CONDITIONS {
        let Some(theirs) = period.condition(name) else {
            continue;
        };
        match object.get(*name) {
            None => {
                object.insert(name.to_string(), theirs);
            }
            Some(mine) if same(mine, &theirs) => {}
            Some(mine) if spec.overridable.iter().any(|o| o == name) => {
                // A list may choose among the period's values, not add to them.
                if let (Value::Array(mine), Value::Array(allowed)) = (mine, &theirs) {
                    for item in mine {
                        if !allowed.iter().any(|a| same(a, item)) {
                            violations.push(Violation::new(
                                format!("parameters.{name}"),
                                format!(
                                    "{} is not among the {name} of {} ({})",
                                    show(item),
                                    of,
                                    show(&theirs)
                                ),
                            ));
                        }
                    }
                }
            }
            Some(mine) => violations.push(Violation::new(
                format!("parameters.{name}"),
                format!(
                    "{} contradicts {}, whose {name} is {}",
                    show(mine),
                    of,
                    show(&theirs)
                ),
            )),
        }
    }
    // The nights it is for must be nights of the period.
    if let Some(dates) = &spec.dates
        && let Some(value) = object.get(dates)
    {
        let field = format!("parameters.{dates}");
        let parsed = value
            .as_str()
            .ok_or_else(|| "must be a string (YYYY-MM-DD or YYYY-MM-DD/YYYY-MM-DD)".to_string())
            .and_then(parse_dates);
        match parsed {
            Err(reason) => violations.push(Violation::new(&field, reason)),
            Ok((from, until)) => {
                let bounds = (
                    parse_dates(&period.valid_from),
                    parse_dates(&period.valid_until),
                );
                if let (Ok((valid_from, _)), Ok((valid_until, _))) = bounds
                    && (from < valid_from || until > valid_until)
                {
                    let outside = if from < valid_from { from } else { until };
                    violations.push(Violation::new(
                        &field,
                        format!(
                            "{outside} is outside {of}, valid from {valid_from} to {valid_until}"
                        ),
                    ));
                }
            }
        }
    }
    // The pointings the request selects.
    let zenith_field = format!("parameters.{}", spec.zenith);
    let direction_field = format!("parameters.{}", directions.parameter);
    let zenith = match object.get(&spec.zenith) {
        None => None,
        Some(v) => match v.as_f64() {
            Some(z) => Some(z),
            None => {
                violations.push(Violation::new(&zenith_field, "must be a number"));
                return Err(violations);
            }
        },
    };
    let azimuth = match object.get(&directions.parameter) {
        None => None,
        Some(v) => match v.as_str().and_then(|n| directions.by_name.get(n)) {
            Some(a) => Some(*a),
            None => {
                let names: Vec<&str> = directions.by_name.keys().map(String::as_str).collect();
                violations.push(Violation::new(
                    &direction_field,
                    format!("{} is not one of {}", show(v), names.join(", ")),
                ));
                return Err(violations);
            }
        },
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    let list = |values: Vec<f64>| -> String {
        let mut shown: Vec<String> = Vec::new();
        for v in values {
            let v = number(v);
            if !shown.contains(&v) {
                shown.push(v);
            }
        }
        shown.join(", ")
    };
    let zeniths = || list(period.pointings.iter().map(|p| p.zenith_deg).collect());
    let azimuths = || list(period.pointings.iter().map(|p| p.azimuth_deg).collect());
    if let Some(z) = zenith
        && !period.pointings.iter().any(|p| close(p.zenith_deg, z))
    {
        violations.push(Violation::new(
            &zenith_field,
            format!(
                "{} is not a zenith angle of {} ({})",
                number(z),
                of,
                zeniths()
            ),
        ));
    }
    if let Some(a) = azimuth
        && !period.pointings.iter().any(|p| close(p.azimuth_deg, a))
    {
        violations.push(Violation::new(
            &direction_field,
            format!(
                "{} (azimuth {}) is not a pointing of {} (azimuths {})",
                show(&object[&directions.parameter]),
                number(a),
                of,
                azimuths()
            ),
        ));
    }
    let selected: Vec<Pointing> = period
        .pointings
        .iter()
        .filter(|p| zenith.is_none_or(|z| close(p.zenith_deg, z)))
        .filter(|p| azimuth.is_none_or(|a| close(p.azimuth_deg, a)))
        .copied()
        .collect();
    if selected.is_empty() && violations.is_empty() {
        // Both exist in the period, but not together (a list of pointings).
        violations.push(Violation::new(
            &zenith_field,
            format!(
                "zenith {} with azimuth {} is not a pointing of {}",
                number(zenith.unwrap_or_default()),
                number(azimuth.unwrap_or_default()),
                of
            ),
        ));
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    let mut expansions = Vec::with_capacity(selected.len());
    for pointing in selected {
        let Some(direction) = directions.name_of_azimuth(pointing.azimuth_deg) else {
            // Checked when the periods are loaded.
            return Err(vec![Violation::new(
                &direction_field,
                format!("azimuth {} has no name", number(pointing.azimuth_deg)),
            )]);
        };
        let mut parameters = resolved.clone();
        if let Some(object) = parameters.as_object_mut() {
            object.insert(spec.zenith.clone(), number_value(pointing.zenith_deg));
            object.insert(
                directions.parameter.clone(),
                Value::String(direction.to_string()),
            );
        }
        expansions.push(Expansion {
            pointing: Some(pointing),
            parameters,
        });
    }
    Ok(expansions)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn winter() -> Period {
        Period::from_toml(
            Path::new("winter.toml"),
            r#"
            name = "lapalma-winter"
            profile = "cta-irf-mc"
            site = "LaPalma"
            array_layout = "Prod6-Hyperarray"
            nsb_levels = [1, 5, 19]
            atmosphere = "LaPalma-winter"
            valid_from = 2026-11-01
            valid_until = "2027-02-28"
            [pointings]
            zenith_deg = [20, 40, 60]
            azimuth_deg = [180, 0]
            "#,
        )
        .unwrap()
    }

    fn spec() -> PeriodSpec {
        PeriodSpec {
            parameter: "observation_period".into(),
            zenith: default_zenith(),
            azimuth: default_azimuth(),
            overridable: vec!["nsb_levels".into()],
            dates: Some("observation_dates".into()),
        }
    }

    fn directions() -> Directions {
        Directions {
            parameter: "pointing".into(),
            by_name: [("North", 180.0), ("South", 0.0), ("East", 90.0)]
                .into_iter()
                .map(|(n, a)| (n.to_string(), a))
                .collect(),
        }
    }

    fn fields(violations: &[Violation]) -> Vec<&str> {
        violations.iter().map(|v| v.field.as_str()).collect()
    }

    #[test]
    fn a_grid_is_every_zenith_with_every_azimuth_and_dates_read_both_ways() {
        let p = winter();
        assert_eq!(p.pointings.len(), 6);
        assert_eq!(
            p.pointings[1],
            Pointing {
                zenith_deg: 20.0,
                azimuth_deg: 0.0
            }
        );
        assert_eq!(
            (p.valid_from.as_str(), p.valid_until.as_str()),
            ("2026-11-01", "2027-02-28")
        );
        assert_eq!(p.pointings[0].label(), "zenith 20 deg, azimuth 180 deg");
    }

    #[test]
    fn a_period_file_that_says_too_little_or_too_much_is_refused() {
        let base = r#"
            name = "x"
            profile = "cta-irf-mc"
            site = "LaPalma"
            array_layout = "A"
            nsb_levels = [1]
            atmosphere = "m"
            valid_from = 2026-01-01
            valid_until = 2026-02-01
        "#;
        let refused = |tail: &str| {
            Period::from_toml(Path::new("x.toml"), &format!("{base}{tail}"))
                .unwrap_err()
                .to_string()
        };
        assert!(
            refused("[pointings]\nzenith_deg = [20]\n")
                .contains("needs zenith_deg and azimuth_deg")
        );
        assert!(
            refused("[pointings]\nzenith_deg = [20]\nazimuth_deg = [0]\nlist = [{ zenith_deg = 20, azimuth_deg = 0 }]\n")
                .contains("not both")
        );
        assert!(refused("[pointings]\nlist = [{ zenith_deg = 20, azimuth_deg = 0 }, { zenith_deg = 20, azimuth_deg = 0 }]\n").contains("twice"));
        assert!(refused("[pointings]\nzenith_deg = [95]\nazimuth_deg = [0]\n").contains("0..90"));
        let late = base.replace("valid_until = 2026-02-01", "valid_until = 2025-02-01");
        assert!(
            Period::from_toml(
                Path::new("x.toml"),
                &format!("{late}[pointings]\nzenith_deg = [20]\nazimuth_deg = [0]\n")
            )
            .unwrap_err()
            .to_string()
            .contains("is after")
        );
    }

    #[test]
    fn a_request_without_a_pointing_becomes_one_production_per_pointing_with_the_periods_conditions()
     {
        let request = json!({ "observation_period": "lapalma-winter", "particle": "gamma" });
        let expanded = expand(&spec(), &winter(), &directions(), &request).unwrap();
        assert_eq!(expanded.len(), 6);
        let pointings: Vec<(Value, Value)> = expanded
            .iter()
            .map(|e| {
                (
                    e.parameters["zenith_deg"].clone(),
                    e.parameters["pointing"].clone(),
                )
            })
            .collect();
        assert_eq!(
            pointings,
            vec![
                (json!(20), json!("North")),
                (json!(20), json!("South")),
                (json!(40), json!("North")),
                (json!(40), json!("South")),
                (json!(60), json!("North")),
                (json!(60), json!("South")),
            ]
        );
        for e in &expanded {
            assert_eq!(e.parameters["site"], "LaPalma");
            assert_eq!(e.parameters["array_layout"], "Prod6-Hyperarray");
            assert_eq!(e.parameters["nsb_levels"], json!([1, 5, 19]));
            assert_eq!(e.parameters["atmosphere"], "LaPalma-winter");
            assert_eq!(e.parameters["particle"], "gamma");
        }
    }

    #[test]
    fn a_zenith_or_a_pointing_selects_among_the_periods_pointings() {
        let one_zenith = json!({ "observation_period": "lapalma-winter", "zenith_deg": 40.0 });
        let expanded = expand(&spec(), &winter(), &directions(), &one_zenith).unwrap();
        assert_eq!(expanded.len(), 2);
        assert!(
            expanded
                .iter()
                .all(|e| e.parameters["zenith_deg"] == json!(40))
        );
        let one = json!({ "observation_period": "lapalma-winter", "zenith_deg": 60, "pointing": "South" });
        let expanded = expand(&spec(), &winter(), &directions(), &one).unwrap();
        assert_eq!(
            expanded.iter().map(|e| e.pointing).collect::<Vec<_>>(),
            vec![Some(Pointing {
                zenith_deg: 60.0,
                azimuth_deg: 0.0
            })]
        );
    }

    #[test]
    fn an_off_grid_pointing_or_a_contradicted_condition_is_a_field_violation() {
        let off =
            json!({ "observation_period": "lapalma-winter", "zenith_deg": 45, "pointing": "East" });
        let violations = expand(&spec(), &winter(), &directions(), &off).unwrap_err();
        assert_eq!(
            fields(&violations),
            ["parameters.zenith_deg", "parameters.pointing"]
        );
        assert!(
            violations[0].description.contains(
                "45 is not a zenith angle of observation period lapalma-winter (20, 40, 60)"
            ),
            "{violations:?}"
        );
        assert!(
            violations[1].description.contains("azimuths 180, 0"),
            "{violations:?}"
        );
        let contradicting = json!({
            "observation_period": "lapalma-winter", "site": "Paranal", "array_layout": "Alpha",
            "atmosphere": "LaPalma-winter"
        });
        let violations = expand(&spec(), &winter(), &directions(), &contradicting).unwrap_err();
        assert_eq!(
            fields(&violations),
            ["parameters.site", "parameters.array_layout"]
        );
        assert_eq!(
            violations[0].description,
            "\"Paranal\" contradicts observation period lapalma-winter, whose site is \"LaPalma\""
        );
    }

    #[test]
    fn the_nights_a_request_is_for_must_be_within_the_period_s_validity() {
        let asking = |dates: Value| {
            json!({ "observation_period": "lapalma-winter", "observation_dates": dates,
                    "zenith_deg": 20, "pointing": "North" })
        };
        // Within: a night, or a range of nights up to the last valid one.
        for within in ["2026-11-01", "2026-12-01/2027-02-28"] {
            let expanded = expand(&spec(), &winter(), &directions(), &asking(json!(within)));
            assert!(expanded.is_ok(), "{within}: {expanded:?}");
        }
        let refused = |dates: Value| {
            let violations = expand(&spec(), &winter(), &directions(), &asking(dates)).unwrap_err();
            assert_eq!(fields(&violations), ["parameters.observation_dates"]);
            violations[0].description.clone()
        };
        assert_eq!(
            refused(json!("2026-10-31")),
            "2026-10-31 is outside observation period lapalma-winter, valid from 2026-11-01 to 2027-02-28"
        );
        assert_eq!(
            refused(json!("2027-02-01/2027-03-15")),
            "2027-03-15 is outside observation period lapalma-winter, valid from 2026-11-01 to 2027-02-28"
        );
        assert_eq!(
            refused(json!("2027-01-10/2027-01-02")),
            "\"2027-01-10/2027-01-02\" ends (2027-01-02) before it begins (2027-01-10)"
        );
        for bad in ["2026-13-01", "01/12/2026", "2026-12-1", "2026-12-01/"] {
            assert!(
                refused(json!(bad)).contains("is not a date or a range of dates (YYYY-MM-DD"),
                "{bad}"
            );
        }
        assert!(refused(json!(20261201)).starts_with("must be a string"));
        // A profile whose periods name no dates parameter checks none.
        let no_dates = PeriodSpec {
            dates: None,
            ..spec()
        };
        assert!(
            expand(
                &no_dates,
                &winter(),
                &directions(),
                &asking(json!("1999-01-01"))
            )
            .is_ok()
        );
    }

    #[test]
    fn an_overridable_list_chooses_among_the_periods_values() {
        let dark = json!({ "observation_period": "lapalma-winter", "nsb_levels": [1], "zenith_deg": 20, "pointing": "North" });
        let expanded = expand(&spec(), &winter(), &directions(), &dark).unwrap();
        assert_eq!(expanded[0].parameters["nsb_levels"], json!([1]));
        let more = json!({ "observation_period": "lapalma-winter", "nsb_levels": [1, 7] });
        let violations = expand(&spec(), &winter(), &directions(), &more).unwrap_err();
        assert_eq!(fields(&violations), ["parameters.nsb_levels"]);
        assert!(
            violations[0]
                .description
                .starts_with("7 is not among the nsb_levels")
        );
        // Not overridable: the same list is fine, another is a contradiction.
        let mut fixed = spec();
        fixed.overridable.clear();
        assert!(expand(&fixed, &winter(), &directions(), &dark).is_err());
        let same = json!({ "observation_period": "lapalma-winter", "nsb_levels": [1, 5, 19.0] });
        assert_eq!(
            expand(&fixed, &winter(), &directions(), &same)
                .unwrap()
                .len(),
            6
        );
    }

    #[test]
    fn a_list_of_pointings_refuses_a_pair_it_does_not_hold() {
        let period = Period::from_toml(
            Path::new("x.toml"),
            r#"
            name = "x"
            profile = "cta-irf-mc"
            site = "LaPalma"
            array_layout = "A"
            nsb_levels = [1]
            atmosphere = "m"
            valid_from = 2026-01-01
            valid_until = 2026-02-01
            [pointings]
            list = [{ zenith_deg = 20, azimuth_deg = 180 }, { zenith_deg = 40, azimuth_deg = 0 }]
            "#,
        )
        .unwrap();
        let pair = json!({ "observation_period": "x", "zenith_deg": 20, "pointing": "South" });
        let violations = expand(&spec(), &period, &directions(), &pair).unwrap_err();
        assert_eq!(fields(&violations), ["parameters.zenith_deg"]);
        assert!(
            violations[0]
                .description
                .contains("zenith 20 with azimuth 0 is not a pointing")
        );
    }

    fn shipped() -> (crate::ProfileSet, std::path::PathBuf) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let set = crate::ProfileSet::load_dir(&root.join("profiles"))
            .unwrap()
            .with_periods(&root.join("periods"))
            .unwrap();
        (set, root)
    }

    fn example(root: &Path, name: &str) -> Value {
        let text = std::fs::read_to_string(root.join("examples").join(name)).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["parameters"].clone()
    }

    #[test]
    fn the_shipped_periods_load_and_the_period_example_becomes_six_productions_that_pass_the_profile()
     {
        let (set, root) = shipped();
        let names: Vec<&str> = set.periods().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"lapalma-2026-winter"), "{names:?}");
        assert!(names.len() >= 2, "{names:?}");
        let parameters = example(&root, "cta-irf-mc-period.json");
        let (profile, period, expansions) = set
            .expand_request("cta-irf-mc", "vo.cta.in2p3.fr", &parameters.to_string())
            .unwrap();
        assert_eq!(period.unwrap().name, "lapalma-2026-winter");
        assert_eq!(expansions.len(), 6);
        for e in &expansions {
            assert!(
                profile
                    .validate("vo.cta.in2p3.fr", &e.parameters)
                    .is_empty()
            );
        }
        let fingerprints: std::collections::BTreeSet<String> = expansions
            .iter()
            .map(|e| profile.fingerprint(&e.parameters))
            .collect();
        assert_eq!(fingerprints.len(), 6, "each pointing its own simulation");
    }

    #[test]
    fn a_request_without_a_period_is_itself_with_the_fingerprint_it_always_had() {
        use sha2::Digest;
        let (set, root) = shipped();
        let parameters = example(&root, "cta-irf-mc.json");
        let (profile, period, expansions) = set
            .expand_request("cta-irf-mc", "vo.cta.in2p3.fr", &parameters.to_string())
            .unwrap();
        assert!(period.is_none());
        assert_eq!(
            expansions,
            vec![Expansion {
                pointing: None,
                parameters: parameters.clone()
            }]
        );
        // The identity as it was before the atmosphere could join it.
        let mut identity = serde_json::Map::new();
        for key in profile.identity() {
            identity.insert(key.clone(), parameters[key.as_str()].clone());
        }
        // Integral floats as integers (the canonical form).
        identity.insert("spectral_index".into(), json!(-2));
        let doc = json!({ "identity": identity, "profile": "cta-irf-mc" });
        let expected = hex::encode(sha2::Sha256::digest(doc.to_string().as_bytes()));
        assert_eq!(profile.fingerprint(&parameters), expected);
        let mut with_atmosphere = parameters.clone();
        with_atmosphere["atmosphere"] = json!("LaPalma-winter-ATM62");
        assert_ne!(profile.fingerprint(&with_atmosphere), expected);
    }

    #[test]
    fn dates_without_a_period_are_a_violation() {
        let (set, root) = shipped();
        let mut parameters = example(&root, "cta-irf-mc.json");
        parameters["observation_dates"] = json!("2026-12-01");
        let violations = set
            .expand_request("cta-irf-mc", "vo.cta.in2p3.fr", &parameters.to_string())
            .unwrap_err();
        assert_eq!(fields(&violations), ["parameters.observation_dates"]);
        assert!(
            violations[0]
                .description
                .contains("parameters.observation_period"),
            "{violations:?}"
        );
        // The shipped period example, for nights of its period and not.
        let mut parameters = example(&root, "cta-irf-mc-period.json");
        parameters["observation_dates"] = json!("2026-12-20/2027-01-10");
        assert!(
            set.expand_request("cta-irf-mc", "vo.cta.in2p3.fr", &parameters.to_string())
                .is_ok()
        );
        parameters["observation_dates"] = json!("2027-05-01");
        let violations = set
            .expand_request("cta-irf-mc", "vo.cta.in2p3.fr", &parameters.to_string())
            .unwrap_err();
        assert_eq!(fields(&violations), ["parameters.observation_dates"]);
    }

    #[test]
    fn an_unknown_period_is_a_violation_naming_the_known_ones() {
        let (set, root) = shipped();
        let mut parameters = example(&root, "cta-irf-mc-period.json");
        parameters["observation_period"] = json!("2019-never");
        let violations = set
            .expand_request("cta-irf-mc", "vo.cta.in2p3.fr", &parameters.to_string())
            .unwrap_err();
        assert_eq!(fields(&violations), ["parameters.observation_period"]);
        assert!(
            violations[0].description.starts_with("unknown observation period \"2019-never\"; this deployment has lapalma-2026-summer, lapalma-2026-winter"),
            "{violations:?}"
        );
    }
}
