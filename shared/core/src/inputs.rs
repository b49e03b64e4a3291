//! Chained productions: a profile whose jobs take other productions' output
//! files as their input. The profile's `inputs` section says where the files
//! come from (the production a parameter names, or every production of a
//! profile: a catalogue query), which of their files qualify (metadata
//! conditions), and how they are grouped into jobs (`group_size` files per
//! job, or one job per value of a metadata key). The rules here are pure:
//! the dispatcher keeps which file went to which job.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::ProductionState;

/// A profile's `inputs` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// A string parameter naming the production whose outputs are the
    /// inputs (`input_production`).
    #[serde(default)]
    pub production: Option<String>,
    /// The profile the parent productions are of. Without `production`,
    /// every production of this profile the dispatcher knows when the
    /// chained one is recorded is a parent (a catalogue query, narrowed by
    /// `metadata`).
    #[serde(default)]
    pub profile: Option<String>,
    /// Conditions on the input files' metadata: a file qualifies when each
    /// key holds exactly this value. Values are templates over the
    /// parameters (`{particle}`).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Input files per job; the last job of a production takes what is left
    /// once every parent ended.
    #[serde(default = "one")]
    pub group_size: u64,
    /// Instead of `group_size`: one job per value of this metadata key of
    /// the input files (made once every parent ended; a file without the
    /// key goes with the empty value).
    #[serde(default)]
    pub group_by: Option<String>,
    /// Name of the file list written in each job's directory (one input a
    /// line), which the command reaches as `{input_list}`.
    #[serde(default = "default_list_file")]
    pub list_file: String,
}

fn one() -> u64 {
    1
}

fn default_list_file() -> String {
    "inputs.txt".into()
}

/// Variables a chained profile's job templates may use: `{input_files}`
/// (the inputs' paths, or URLs where they are not local files, separated by
/// spaces; a command element that is exactly `{input_files}` becomes one
/// argument per file), `{input_list}` (path of the list file) and
/// `{input_count}`.
pub const INPUT_VARIABLES: &[&str] = &["input_files", "input_list", "input_count"];

/// One input file waiting for a job, as the dispatcher holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInput {
    pub lfn: String,
    pub metadata: BTreeMap<String, String>,
}

impl InputSpec {
    /// Why the section cannot be used, against the profile's parameter names.
    pub fn check(&self, is_parameter: impl Fn(&str) -> bool) -> Result<(), String> {
        if self.production.is_none() && self.profile.is_none() {
            return Err("inputs needs `production` (a parameter naming the parent production) or `profile` (a catalogue query)".into());
        }
        if let Some(p) = &self.production
            && !is_parameter(p)
        {
            return Err(format!("inputs.production {p:?} is not a parameter"));
        }
        if self.group_size == 0 {
            return Err("inputs.group_size must be at least 1".into());
        }
        if self.group_by.is_some() && self.group_size != 1 {
            return Err("inputs.group_by and inputs.group_size exclude each other".into());
        }
        if self.group_by.as_deref() == Some("") {
            return Err("inputs.group_by is empty".into());
        }
        let name = &self.list_file;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(format!(
                "inputs.list_file {name:?} must be a plain file name"
            ));
        }
        Ok(())
    }

    /// The parent production a request names, if the section takes one.
    pub fn parent(&self, parameters: &Value) -> Option<String> {
        let key = self.production.as_ref()?;
        parameters.get(key)?.as_str().map(str::to_string)
    }

    /// The metadata conditions of a production, rendered from its
    /// parameters' template variables; a condition over a parameter the
    /// request left out is dropped.
    pub fn conditions(&self, vars: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        self.metadata
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), crate::profile::render_known(v, vars)?)))
            .collect()
    }

    /// The jobs to make of `pending` (in arrival order), each as indexes into
    /// it: full groups of `group_size`, and once every parent ended
    /// (`parents_ended`) the rest as a last job; with `group_by`, nothing
    /// until every parent ended, then one job per value, in value order.
    pub fn group(&self, pending: &[PendingInput], parents_ended: bool) -> Vec<Vec<usize>> {
        if let Some(key) = &self.group_by {
            if !parents_ended {
                return Vec::new();
            }
            let mut by_value: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for (i, input) in pending.iter().enumerate() {
                let value = input.metadata.get(key).map_or("", String::as_str);
                by_value.entry(value).or_default().push(i);
            }
            return by_value.into_values().collect();
        }
        let size = self.group_size.max(1) as usize;
        let mut groups: Vec<Vec<usize>> = (0..pending.len())
            .collect::<Vec<_>>()
            .chunks(size)
            .map(<[usize]>::to_vec)
            .collect();
        if !parents_ended && groups.last().is_some_and(|g| g.len() < size) {
            groups.pop();
        }
        groups
    }
}

/// Why a production of `child` (with `child_parameters`) cannot take its
/// inputs from one of `parent` (with `parent_parameters`), as DIRAC's
/// ProdValidator checks production steps: the files must come from the
/// profile it takes from, and carry every metadata key it selects or groups
/// by, with the value it selects where the parent's parameters fix it.
/// Each violation is on `field` (where the child names its parent) and
/// names the keys.
pub fn connection_violations(
    field: &str,
    child: &crate::Profile,
    child_parameters: &Value,
    parent_id: &str,
    parent: &crate::Profile,
    parent_parameters: &Value,
) -> Vec<crate::Violation> {
    let Some(inputs) = child.inputs() else {
        return Vec::new();
    };
    let mut violations = Vec::new();
    if let Some(wanted) = &inputs.profile
        && wanted != parent.name()
    {
        violations.push(crate::Violation::new(
            field,
            format!(
                "{parent_id} is a production of profile {}; profile {} takes the outputs of {wanted}",
                parent.name(),
                child.name()
            ),
        ));
        return violations;
    }
    let carried = parent.output_metadata_of(parent_parameters);
    let mut missing = Vec::new();
    let mut differing = Vec::new();
    for (key, wanted) in child.input_conditions(child_parameters) {
        match carried.get(&key) {
            None => missing.push(key),
            Some(Some(value)) if *value != wanted => {
                differing.push(format!("{key}={value} (it selects {key}={wanted})"))
            }
            Some(_) => {}
        }
    }
    if let Some(key) = &inputs.group_by
        && !carried.contains_key(key)
    {
        missing.push(key.clone());
    }
    if !missing.is_empty() {
        violations.push(crate::Violation::new(
            field,
            format!(
                "the files of {parent_id} (profile {}) carry no metadata key {}, which profile {} selects its inputs by",
                parent.name(),
                missing.join(", "),
                child.name()
            ),
        ));
    }
    if !differing.is_empty() {
        violations.push(crate::Violation::new(
            field,
            format!(
                "the files of {parent_id} (profile {}) carry {}: none would be an input of profile {}",
                parent.name(),
                differing.join(", "),
                child.name()
            ),
        ));
    }
    violations
}

/// Where a job finds an input: the path of a `file://` URL, any other URL
/// (`root://`) as it is.
pub fn input_location(url: &str) -> &str {
    url.strip_prefix("file://").unwrap_or(url)
}

/// What a chained production says of its inputs once every parent ended:
/// empty when every parent COMPLETED, else which did not and how it ended
/// (`None`: never recorded).
pub fn inputs_note(parents: &[(String, Option<ProductionState>)]) -> String {
    let short: Vec<String> = parents
        .iter()
        .filter(|(_, state)| *state != Some(ProductionState::Completed))
        .map(|(id, state)| match state {
            Some(state) => format!("{id} ended {state}"),
            None => format!("{id} is unknown"),
        })
        .collect();
    if short.is_empty() {
        String::new()
    } else {
        format!(
            "processed the outputs that exist: parent {}",
            short.join(", parent ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> InputSpec {
        serde_json::from_str(json).unwrap()
    }

    fn inputs(values: &[&str]) -> Vec<PendingInput> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| PendingInput {
                lfn: format!("/f{i}"),
                metadata: BTreeMap::from([("run".to_string(), v.to_string())]),
            })
            .collect()
    }

    #[test]
    fn full_groups_go_at_once_and_the_rest_once_every_parent_ended() {
        let s = spec(r#"{"production": "input_production", "group_size": 2}"#);
        let five = inputs(&["1", "2", "3", "4", "5"]);
        assert_eq!(s.group(&five, false), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(s.group(&five, true), vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert!(s.group(&five[..1], false).is_empty());
        assert!(s.group(&[], true).is_empty());
        let single = spec(r#"{"production": "input_production"}"#);
        assert_eq!(single.group(&five[..2], false), vec![vec![0], vec![1]]);
    }

    #[test]
    fn grouping_by_a_key_waits_for_the_end_then_makes_one_job_per_value() {
        let s = spec(r#"{"profile": "p", "group_by": "run"}"#);
        let files = inputs(&["7", "3", "7", "3", "9"]);
        assert!(s.group(&files, false).is_empty());
        assert_eq!(s.group(&files, true), vec![vec![1, 3], vec![0, 2], vec![4]]);
    }

    #[test]
    fn a_bad_section_is_refused_with_the_reason() {
        let is_param = |p: &str| p == "input_production";
        assert!(spec(r#"{}"#).check(is_param).is_err());
        let unknown = spec(r#"{"production": "parent"}"#).check(is_param);
        assert!(unknown.unwrap_err().contains("inputs.production"));
        let both = spec(r#"{"profile": "p", "group_by": "run", "group_size": 3}"#);
        assert!(both.check(is_param).unwrap_err().contains("exclude"));
        let zero = spec(r#"{"profile": "p", "group_size": 0}"#);
        assert!(zero.check(is_param).is_err());
        let path = spec(r#"{"profile": "p", "list_file": "../x"}"#);
        assert!(path.check(is_param).unwrap_err().contains("list_file"));
        assert!(
            spec(r#"{"production": "input_production"}"#)
                .check(is_param)
                .is_ok()
        );
    }

    #[test]
    fn conditions_render_from_the_parameters_and_the_parent_comes_from_its_parameter() {
        let s = spec(
            r#"{"production": "input_production", "metadata": {"data_level": "DL0", "particle": "{particle}", "site": "{site}"}}"#,
        );
        let vars = BTreeMap::from([("particle".to_string(), "gamma".to_string())]);
        let c = s.conditions(&vars);
        assert_eq!(c["data_level"], "DL0");
        assert_eq!(c["particle"], "gamma");
        assert!(!c.contains_key("site"));
        let parameters = serde_json::json!({"input_production": "CTA-000007"});
        assert_eq!(s.parent(&parameters).as_deref(), Some("CTA-000007"));
        assert_eq!(input_location("file:///w/a.simtel"), "/w/a.simtel");
        assert_eq!(input_location("root://se//a"), "root://se//a");
    }

    fn shipped(name: &str) -> (crate::ProfileSet, String) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles");
        let text = std::fs::read_to_string(root.join(format!("{name}.json"))).unwrap();
        (crate::ProfileSet::load_dir(&root).unwrap(), text)
    }

    #[test]
    fn a_chained_job_gets_one_argument_per_input_and_its_list() {
        let (set, _) = shipped("cta-dl1");
        let p = set.get("cta-dl1").unwrap();
        assert!(p.plan(&serde_json::json!({}), "f", 0).is_none());
        let parameters = serde_json::json!({
            "input_production": "CTA-000001", "image_cleaning": "mars",
            "campaign": "PROD6", "software": {"ctapipe": "0.23.0"}
        });
        assert!(p.validate("vo.cta.in2p3.fr", &parameters).is_empty());
        assert_eq!(
            p.inputs().unwrap().parent(&parameters).as_deref(),
            Some("CTA-000001")
        );
        assert_eq!(p.input_conditions(&parameters)["data_level"], "DL0");
        let job = crate::profile::input_job("f", 0, 3, 2);
        assert_eq!((job.index, job.run_number, job.units), (3, 4, 2));
        let mut vars = p.job_variables(&parameters, "CTADL-000001", "vo", &job, 1, "/w/out");
        vars.insert("input_files".into(), "/a.simtel /b.simtel".into());
        vars.insert("input_list".into(), "/w/inputs.txt".into());
        vars.insert("input_count".into(), "2".into());
        let command = p.job_command(&parameters, &vars).unwrap();
        assert_eq!(command.program, "prodsys-toysim");
        assert_eq!(
            &command.args[command.args.len() - 4..],
            ["--input-list", "/w/inputs.txt", "/a.simtel", "/b.simtel"]
        );
        assert!(
            command
                .env
                .contains(&("PRODSYS_INPUT_COUNT".into(), "2".into()))
        );
    }

    #[test]
    fn a_profile_splits_by_units_or_by_inputs_not_both_nor_neither() {
        let (_, text) = shipped("cta-dl1");
        let mut file: serde_json::Value = serde_json::from_str(&text).unwrap();
        let path = std::path::Path::new("cta-dl1.json");
        file["split"] = serde_json::json!({"total": "campaign", "per_job": "campaign"});
        let both = crate::Profile::from_json(path, &file.to_string()).unwrap_err();
        assert!(both.to_string().contains("exclude each other"), "{both}");
        let mut neither = file.clone();
        neither.as_object_mut().unwrap().remove("split");
        neither.as_object_mut().unwrap().remove("inputs");
        let error = crate::Profile::from_json(path, &neither.to_string()).unwrap_err();
        assert!(error.to_string().contains("split"), "{error}");
        let mut unknown = neither.clone();
        unknown["inputs"] =
            serde_json::json!({"production": "input_production", "metadata": {"x": "{nope}"}});
        let error = crate::Profile::from_json(path, &unknown.to_string()).unwrap_err();
        assert!(error.to_string().contains("inputs.metadata"), "{error}");
        // The IRF step makes one job of every file: grouped by production.
        let (set, _) = shipped("cta-irf-mc");
        assert!(
            set.get("cta-irf")
                .unwrap()
                .inputs()
                .unwrap()
                .group_by
                .is_some()
        );
    }

    #[test]
    fn steps_connect_when_the_parent_s_files_carry_what_the_child_selects() {
        let (set, _) = shipped("cta-irf-mc");
        let sim = set.get("cta-irf-mc").unwrap();
        let dl1 = set.get("cta-dl1").unwrap();
        let irf = set.get("cta-irf").unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let example = |name: &str| -> Value {
            let text = std::fs::read_to_string(root.join(name)).unwrap();
            serde_json::from_str::<Value>(&text).unwrap()["parameters"].clone()
        };
        let (sim_p, dl1_p, irf_p) = (
            example("cta-irf-mc.json"),
            example("cta-dl1.json"),
            example("cta-irf.json"),
        );
        let f = "parameters.input_production";
        assert!(connection_violations(f, dl1, &dl1_p, "CTA-1", sim, &sim_p).is_empty());
        assert!(connection_violations(f, irf, &irf_p, "CTADL-1", dl1, &dl1_p).is_empty());
        // The IRF step on simulation files: another profile.
        let wrong = connection_violations(f, irf, &irf_p, "CTA-1", sim, &sim_p);
        assert!(
            wrong[0]
                .description
                .contains("takes the outputs of cta-dl1"),
            "{wrong:?}"
        );
        // A DL1 step selecting a data level the simulation never writes,
        // and a key it does not carry.
        let mut text: Value = serde_json::from_str(&shipped("cta-dl1").1).unwrap();
        text["inputs"]["metadata"] = serde_json::json!({"data_level": "DL2", "telescope": "LST"});
        let picky =
            crate::Profile::from_json(std::path::Path::new("p.json"), &text.to_string()).unwrap();
        let v = connection_violations(f, &picky, &dl1_p, "CTA-1", sim, &sim_p);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v[0].description.contains("no metadata key telescope"),
            "{v:?}"
        );
        assert!(
            v[1].description
                .contains("data_level=DL0 (it selects data_level=DL2)"),
            "{v:?}"
        );
        assert!(v.iter().all(|v| v.field == f));
    }

    #[test]
    fn the_km3net_reconstruction_takes_the_simulation_of_its_detector() {
        let (set, _) = shipped("km3net-reco");
        let sim = set.get("km3net-container-sim").unwrap();
        let reco = set.get("km3net-reco").unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let read = |name: &str| -> Value {
            let text = std::fs::read_to_string(root.join(name)).unwrap();
            serde_json::from_str::<Value>(&text).unwrap()["parameters"].clone()
        };
        let (sim_p, mut reco_p) = (read("km3net-container-sim.json"), read("km3net-reco.json"));
        assert!(reco.validate("km3net.org", &reco_p).is_empty());
        let f = "parameters.input_production";
        assert!(connection_violations(f, reco, &reco_p, "KM-1", sim, &sim_p).is_empty());
        reco_p["detector"] = "ARCA21".into();
        let v = connection_violations(f, reco, &reco_p, "KM-1", sim, &sim_p);
        assert!(
            v[0].description
                .contains("detector=ORCA10 (it selects detector=ARCA21)"),
            "{v:?}"
        );
    }

    #[test]
    fn a_note_names_each_parent_that_did_not_complete() {
        use ProductionState::*;
        let all = [("A-1".to_string(), Some(Completed))];
        assert_eq!(inputs_note(&all), "");
        let some = [
            ("A-1".to_string(), Some(Completed)),
            ("A-2".to_string(), Some(PartiallyCompleted)),
            ("A-3".to_string(), None),
        ];
        let note = inputs_note(&some);
        assert!(note.contains("A-2 ended PARTIALLY_COMPLETED"), "{note}");
        assert!(note.contains("A-3 is unknown"), "{note}");
        assert!(!note.contains("A-1"), "{note}");
    }
}
