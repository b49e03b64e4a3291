//! The release metadata that software repositories (Zenodo, the ESCAPE OSSR)
//! read: LICENSE, CITATION.cff (validated by cffconvert) and codemeta.json,
//! kept in step with the workspace version.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    prodsys_testkit::repo_root()
}

/// A validator from the test command's own environment (var/venv/metadata), else from PATH.
fn tool(name: &str) -> PathBuf {
    let local = root().join("var/venv/metadata/bin").join(name);
    if local.is_file() {
        local
    } else {
        PathBuf::from(name)
    }
}

fn workspace_version() -> String {
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    manifest["workspace"]["package"]["version"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_licence_is_the_one_cargo_declares() {
    let licence = std::fs::read_to_string(root().join("LICENSE")).unwrap();
    assert!(licence.contains("Apache License") && licence.contains("Version 2.0"));
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"Apache-2.0\""));
}

#[test]
fn citation_cff_is_valid_and_names_the_workspace_version() {
    let output = Command::new(tool("cffconvert"))
        .args(["--validate", "-i"])
        .arg(root().join("CITATION.cff"))
        .output()
        .expect("cffconvert runs (deploy/local/test installs it)");
    assert!(
        output.status.success(),
        "cffconvert --validate: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let citation = std::fs::read_to_string(root().join("CITATION.cff")).unwrap();
    let version = citation
        .lines()
        .find_map(|l| l.strip_prefix("version:"))
        .map(|v| v.trim().trim_matches('"').to_string());
    assert_eq!(version, Some(workspace_version()));
    assert!(citation.contains("license: Apache-2.0"));
}

#[test]
fn codemeta_json_names_the_workspace_version_and_licence() {
    // codemetapy would read it back, but only after downloading its JSON-LD
    // contexts (w3id.org, schema.org), which a machine without a network
    // cannot; the terms OSSR and Zenodo read are checked here instead.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("codemeta.json")).unwrap())
            .expect("codemeta.json is JSON");
    assert_eq!(meta["@context"], "https://w3id.org/codemeta/3.0");
    assert_eq!(meta["@type"], "SoftwareSourceCode");
    assert_eq!(meta["name"], "prodsys");
    assert_eq!(meta["version"], workspace_version().as_str());
    assert_eq!(meta["license"], "https://spdx.org/licenses/Apache-2.0");
    assert_eq!(meta["programmingLanguage"], "Rust");
    assert!(meta["description"].as_str().is_some_and(|d| !d.is_empty()));
    assert!(meta["author"].as_array().is_some_and(|a| !a.is_empty()));
}
