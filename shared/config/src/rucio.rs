//! Settings of a `rucio` forwarding destination: a Rucio server on which
//! every forwarded file is registered as a replica on an RSE (its PFN on the
//! storage destination the copy landed on), attached to its production's
//! dataset, given its catalog metadata, and optionally ruled.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::{expose, expose_optional};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RucioSettings {
    /// Base URL of the Rucio server (`https://rucio.example.org`).
    pub url: String,
    /// The Rucio account prodsys acts as (`X-Rucio-Account`; rules are
    /// owned by it).
    pub account: String,
    /// Multi-VO servers: the VO (`X-Rucio-VO`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vo: Option<String>,
    pub auth: RucioAuth,
    /// The scope of the files and datasets.
    pub scope: String,
    /// The RSE the replicas are registered on; its protocol must describe
    /// the storage destination (scheme, host, port, prefix).
    pub rse: String,
    /// The `xroot` or `posix` destination the files are copied to first;
    /// their URL there is the registered PFN.
    pub storage: String,
    /// The dataset name each production's files are attached to, in the
    /// scope: `{production_id}` and any of the file's metadata keys
    /// (`{MCCampaign}`) are replaced.
    #[serde(default = "default_dataset")]
    pub dataset: String,
    /// A replication rule added on each dataset, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RucioRule>,
    /// Files per bulk call (Rucio takes at most 1,000 per attachment).
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Longest a single call to the server may take.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

/// How prodsys authenticates to Rucio.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RucioAuth {
    /// `GET /auth/userpass` (`X-Rucio-Username`, `X-Rucio-Password`); the
    /// token is asked for again before it expires.
    Userpass {
        username: String,
        #[serde(serialize_with = "expose")]
        password: SecretString,
    },
    /// A bearer token issued elsewhere (an OIDC agent, a cron job), sent as
    /// `X-Rucio-Auth-Token`: read from `file` (again whenever the server
    /// refuses it) or from the environment variable `env`.
    Token {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        env: Option<String>,
        /// A fixed token (tests, short jobs).
        #[serde(
            default,
            serialize_with = "expose_optional",
            skip_serializing_if = "Option::is_none"
        )]
        token: Option<SecretString>,
    },
}

/// A replication rule on every dataset the destination creates.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RucioRule {
    pub rse_expression: String,
    #[serde(default = "default_copies")]
    pub copies: u32,
    /// Seconds; the rule never expires when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_s: Option<u64>,
}

fn default_dataset() -> String {
    "{production_id}".into()
}

fn default_batch() -> usize {
    500
}

fn default_timeout() -> u64 {
    60
}

fn default_copies() -> u32 {
    1
}

#[cfg(test)]
mod tests {
    use crate::{DestinationSettings, Settings};

    #[test]
    fn a_rucio_destination_comes_from_the_file() {
        let dir = std::env::temp_dir().join(format!("prodsys-config-r-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.toml");
        std::fs::write(
            &path,
            r#"
[forwarding.destinations.eos]
kind = "xroot"
url = "root://eos.example.org:1094//eos/cta"

[forwarding.destinations.rucio-cta]
kind = "rucio"
url = "https://rucio.example.org"
account = "prodsys"
vo = "cta"
scope = "cta"
rse = "EOS-CTA"
storage = "eos"
auth = { kind = "userpass", username = "prodsys", password = "hunter2" }
rule = { rse_expression = "tier=1", copies = 2, lifetime_s = 86400 }

[forwarding.destinations.rucio-token]
kind = "rucio"
url = "https://rucio.example.org"
account = "prodsys"
scope = "cta"
rse = "EOS-CTA"
storage = "eos"
dataset = "{MCCampaign}.{production_id}"
auth = { kind = "token", file = "/run/secrets/rucio-token" }
"#,
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        let DestinationSettings::Rucio(r) = &s.forwarding.destinations["rucio-cta"] else {
            panic!("not rucio");
        };
        assert_eq!((r.scope.as_str(), r.rse.as_str()), ("cta", "EOS-CTA"));
        assert_eq!(r.dataset, "{production_id}", "the default dataset name");
        assert_eq!(r.vo.as_deref(), Some("cta"));
        let rule = r.rule.as_ref().unwrap();
        assert_eq!((rule.copies, rule.lifetime_s), (2, Some(86400)));
        assert!(
            !format!("{s:?}").contains("hunter2"),
            "the password never prints"
        );
        let DestinationSettings::Rucio(t) = &s.forwarding.destinations["rucio-token"] else {
            panic!("not rucio");
        };
        assert!(matches!(
            &t.auth,
            super::RucioAuth::Token {
                file: Some(_),
                env: None,
                token: None
            }
        ));
        assert!(t.rule.is_none());
        // An unknown key is refused, naming it.
        std::fs::write(
            &path,
            "[forwarding.destinations.r]\nkind = \"rucio\"\nurl = \"https://r\"\naccount = \"a\"\n\
             scope = \"s\"\nrse = \"R\"\nstorage = \"x\"\nauth = { kind = \"token\", env = \"T\" }\nrse_expr = \"x\"\n",
        )
        .unwrap();
        let err = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("rse_expr"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_commented_destinations_of_the_example_file_load() {
        let example = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prodsys.toml"),
        )
        .unwrap();
        let start = example
            .find("# [forwarding.destinations.")
            .expect("deploy/prodsys.toml shows forwarding destinations");
        let uncommented: String = example[start..]
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect();
        let path =
            std::env::temp_dir().join(format!("prodsys-config-x-{}.toml", std::process::id()));
        std::fs::write(&path, uncommented).unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            &s.forwarding.destinations["rucio-cta"],
            DestinationSettings::Rucio(r) if r.storage == "eos-cta" && r.rule.is_some()
        ));
        assert!(s.forwarding.destinations.contains_key("eos-cta"));
    }
}
