//! The simulator as the local executor runs it: a real process, real files.

use std::process::Command;

fn toysim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_prodsys-toysim"))
}

#[test]
fn writes_one_file_per_nsb_level_and_exits_zero() {
    let dir = std::env::temp_dir().join(format!("toysim-cli-{}", std::process::id()));
    let status = toysim()
        .args([
            "--run",
            "7",
            "--seed",
            "11",
            "--showers",
            "10",
            "--nsb",
            "1,19",
            "--site",
            "Paranal",
            "--particle",
            "proton",
            "--zenith",
            "40",
            "--azimuth",
            "0",
            "--layout",
            "Alpha",
            "--output-dir",
        ])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "proton_40deg_0deg_run000007___Alpha_nsb1.simtel",
            "proton_40deg_0deg_run000007___Alpha_nsb19.simtel"
        ]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_arguments_exit_two_and_failure_exits_three() {
    let bad = toysim().args(["--run", "x"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--run"));
    let dir = std::env::temp_dir().join(format!("toysim-fail-{}", std::process::id()));
    let failed = toysim()
        .args([
            "--run",
            "1",
            "--seed",
            "1",
            "--showers",
            "1",
            "--nsb",
            "1",
            "--site",
            "LaPalma",
            "--particle",
            "gamma",
            "--zenith",
            "20",
            "--azimuth",
            "180",
            "--layout",
            "L",
            "--fail",
            "--output-dir",
        ])
        .arg(&dir)
        .status()
        .unwrap();
    assert_eq!(failed.code(), Some(3));
    assert!(!dir.exists());
}
