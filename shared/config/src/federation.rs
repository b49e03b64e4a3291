//! Federated resources: groups of WMS installations a request may name as
//! its `backend` (or `any`, every installation its VO may use), the share
//! each installation gets of a group's jobs, the VOs an installation serves,
//! and whether a failed job's retry may move to another installation.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The `backend` a request names to let prodsys choose among every
/// installation its VO may use.
pub const ANY: &str = "any";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationSettings {
    /// Named groups of installations (`cta-grid = ["dirac-cta", "slurm-desy"]`).
    pub groups: BTreeMap<String, Vec<String>>,
    /// Weight of an installation when a group's jobs are placed (1 when not
    /// given): among installations with free room, jobs go to the one with
    /// the fewest jobs in flight per share.
    pub shares: BTreeMap<String, f64>,
    /// The VOs an installation serves; an installation not listed serves every VO.
    pub vos: BTreeMap<String, Vec<String>>,
    /// Whether a failed job's retry may be placed on another installation of
    /// its group (else it waits for the installation it failed on).
    pub retry_elsewhere: bool,
    /// Seconds an installation may fail before its federated jobs in flight
    /// are given up and placed elsewhere (they are cancelled there once it
    /// answers again); 0 never gives them up.
    pub abandon_after_s: u64,
}

impl Default for FederationSettings {
    fn default() -> Self {
        Self {
            groups: BTreeMap::new(),
            shares: BTreeMap::new(),
            vos: BTreeMap::new(),
            retry_elsewhere: true,
            abandon_after_s: 600,
        }
    }
}

impl FederationSettings {
    /// Why these settings do not fit `installations` (the names configured),
    /// if they do not: a group of unknown or no installations, a group named
    /// like an installation or `any`, a share or VO list of an unknown
    /// installation, a share that is not a positive number.
    pub fn check(&self, installations: &BTreeSet<String>) -> Result<(), String> {
        for (group, members) in &self.groups {
            if group == ANY || installations.contains(group) {
                return Err(format!(
                    "federation.groups.{group}: a group cannot be named like an installation or {ANY:?}"
                ));
            }
            if members.is_empty() {
                return Err(format!("federation.groups.{group}: no installations"));
            }
            if let Some(unknown) = members.iter().find(|m| !installations.contains(*m)) {
                return Err(format!(
                    "federation.groups.{group}: unknown installation {unknown:?}"
                ));
            }
        }
        for (name, share) in &self.shares {
            if !installations.contains(name) {
                return Err(format!("federation.shares.{name}: unknown installation"));
            }
            if !(share.is_finite() && *share > 0.0) {
                return Err(format!(
                    "federation.shares.{name}: must be a positive number, not {share}"
                ));
            }
        }
        if let Some(name) = self.vos.keys().find(|n| !installations.contains(*n)) {
            return Err(format!("federation.vos.{name}: unknown installation"));
        }
        Ok(())
    }

    /// Whether `backend` names a group or `any` (and not one installation).
    pub fn is_federated(&self, backend: &str) -> bool {
        backend == ANY || self.groups.contains_key(backend)
    }

    /// The share of an installation (1 unless configured).
    pub fn share(&self, installation: &str) -> f64 {
        self.shares.get(installation).copied().unwrap_or(1.0)
    }

    /// Whether `installation` serves `vo`.
    pub fn serves(&self, installation: &str, vo: &str) -> bool {
        self.vos
            .get(installation)
            .is_none_or(|vos| vos.iter().any(|v| v == vo))
    }

    /// The installations a request of `vo` naming `backend` may run on, in
    /// name order; or why it may not name it (a field violation's reason).
    pub fn members(
        &self,
        backend: &str,
        vo: &str,
        installations: &BTreeSet<String>,
    ) -> Result<Vec<String>, String> {
        let known = || {
            let mut names: Vec<&str> = installations.iter().map(String::as_str).collect();
            names.extend(self.groups.keys().map(String::as_str));
            names.push(ANY);
            names.join(", ")
        };
        let candidates: Vec<String> = if installations.contains(backend) {
            vec![backend.to_string()]
        } else if backend == ANY {
            installations.iter().cloned().collect()
        } else if let Some(members) = self.groups.get(backend) {
            let set: BTreeSet<&String> = members.iter().collect();
            set.into_iter().cloned().collect()
        } else {
            return Err(format!(
                "unknown WMS installation or group {backend:?}; this deployment has {}",
                known()
            ));
        };
        let allowed: Vec<String> = candidates
            .into_iter()
            .filter(|i| self.serves(i, vo))
            .collect();
        if allowed.is_empty() {
            return Err(format!("no installation of {backend:?} serves VO {vo:?}"));
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn federation() -> FederationSettings {
        FederationSettings {
            groups: [(
                "cta-grid".to_string(),
                vec!["slurm-desy".to_string(), "dirac-cta".to_string()],
            )]
            .into(),
            shares: [("slurm-desy".to_string(), 2.0)].into(),
            vos: [("dirac-cta".to_string(), vec!["cta".to_string()])].into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_group_an_installation_and_any_resolve_to_installations_serving_the_vo() {
        let all = names(&["dirac-cta", "local", "slurm-desy"]);
        let f = federation();
        assert_eq!(
            f.members("cta-grid", "cta", &all).unwrap(),
            ["dirac-cta", "slurm-desy"]
        );
        assert_eq!(
            f.members("cta-grid", "km3net", &all).unwrap(),
            ["slurm-desy"]
        );
        assert_eq!(f.members("local", "cta", &all).unwrap(), ["local"]);
        assert_eq!(
            f.members(ANY, "km3net", &all).unwrap(),
            ["local", "slurm-desy"]
        );
        assert_eq!(f.members(ANY, "cta", &all).unwrap().len(), 3);
        let unknown = f.members("elsewhere", "cta", &all).unwrap_err();
        assert!(
            unknown.contains("\"elsewhere\"") && unknown.contains("cta-grid"),
            "{unknown}"
        );
        let refused = f.members("dirac-cta", "km3net", &all).unwrap_err();
        assert!(refused.contains("km3net"), "{refused}");
        assert!(f.is_federated("cta-grid") && f.is_federated(ANY) && !f.is_federated("local"));
        assert_eq!(f.share("slurm-desy"), 2.0);
        assert_eq!(f.share("local"), 1.0);
    }

    #[test]
    fn groups_of_unknown_installations_and_bad_shares_are_refused() {
        let all = names(&["dirac-cta", "local", "slurm-desy"]);
        assert!(federation().check(&all).is_ok());
        let mut f = federation();
        f.groups.insert("g".into(), vec!["nowhere".into()]);
        assert!(f.check(&all).unwrap_err().contains("nowhere"));
        let mut f = federation();
        f.groups.insert("local".into(), vec!["local".into()]);
        assert!(f.check(&all).is_err());
        let mut f = federation();
        f.shares.insert("local".into(), 0.0);
        assert!(f.check(&all).unwrap_err().contains("positive"));
        let mut f = federation();
        f.vos.insert("x".into(), vec![]);
        assert!(f.check(&all).is_err());
    }
}
