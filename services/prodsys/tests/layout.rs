//! The layout every service keeps: all of a service's SQL is in its
//! `store.rs` (or `store/` folder), so its statements can be read, reviewed
//! and tuned in one place, and nothing else talks to the database.

use std::path::{Path, PathBuf};

/// Files outside a store that may hold SQL, each with why. A file listed
/// here must still hold SQL: once it does not, its line goes.
const ALLOWED: &[(&str, &str)] = &[(
    "services/prodsys/src/access.rs",
    "`prodsys access` creates and drops the services' database roles as the administrator: \
         DDL outside any service's schema",
)];

/// Calls of a PostgreSQL client (`tokio_postgres`, `deadpool_postgres`, the
/// statement cache of `prodsys_db::Cached`).
const CALLS: &[&str] = &[
    "_cached(",
    ".batch_execute(",
    ".simple_query(",
    ".copy_in(",
    ".copy_out(",
    ".query_one(",
    ".query_opt(",
    ".query_raw(",
    ".prepare_typed(",
    ".execute(",
    ".query(\"",
    ".query(&stat",
];

/// How SQL text starts in a string literal.
const STATEMENTS: &[&str] = &[
    "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "LOCK", "CREATE", "ALTER", "DROP", "LISTEN",
    "NOTIFY", "TRUNCATE", "DO $",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sources(dir: &Path, into: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(&path, into);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            into.push(path);
        }
    }
}

fn is_store(relative: &str) -> bool {
    relative.ends_with("/store.rs") || relative.contains("/store/")
}

/// The lines of a source file that look like SQL or a database call, with
/// their numbers: comments and `#[cfg(test)]` modules (test data such as
/// index definitions) left out.
fn sql_lines(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut in_test_module = false;
    let mut lines = text.lines().enumerate().peekable();
    while let Some((n, line)) = lines.next() {
        if in_test_module {
            // rustfmt closes a top-level module with `}` alone on a line.
            in_test_module = line != "}";
            continue;
        }
        if line == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|(_, next)| next.starts_with("mod ") && next.ends_with('{'))
        {
            in_test_module = true;
            lines.next();
            continue;
        }
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let call = CALLS.iter().any(|call| code.contains(call));
        let statement = STATEMENTS.iter().any(|keyword| {
            code.match_indices(&format!("\"{keyword}")).any(|(at, m)| {
                code[at + m.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| c.is_whitespace())
            })
        });
        if call || statement {
            found.push((n + 1, line.trim().to_string()));
        }
    }
    found
}

#[test]
fn sql_is_only_in_each_service_s_store() {
    let root = root();
    let mut files = Vec::new();
    for service in std::fs::read_dir(root.join("services")).unwrap() {
        let src = service.unwrap().path().join("src");
        if src.is_dir() {
            sources(&src, &mut files);
        }
    }
    assert!(
        files.len() > 50,
        "found only {} source files under services/*/src",
        files.len()
    );
    let mut outside = Vec::new();
    let mut holding = Vec::new();
    for path in &files {
        let relative = path
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if is_store(&relative) {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let lines = sql_lines(&text);
        if lines.is_empty() {
            continue;
        }
        if ALLOWED.iter().any(|(allowed, _)| *allowed == relative) {
            holding.push(relative);
            continue;
        }
        for (n, line) in lines {
            outside.push(format!("{relative}:{n}: {line}"));
        }
    }
    assert!(
        outside.is_empty(),
        "SQL outside a service's store.rs or store/ (move it into a typed store function):\n{}",
        outside.join("\n")
    );
    let stale: Vec<&str> = ALLOWED
        .iter()
        .map(|(allowed, _)| *allowed)
        .filter(|allowed| !holding.iter().any(|h| h == allowed))
        .collect();
    assert!(
        stale.is_empty(),
        "these files hold no SQL any more: take them off ALLOWED: {stale:?}"
    );
}

#[test]
fn the_detector_sees_statements_and_calls_but_not_comments_or_test_data() {
    let text = r#"
fn a() {
    // SELECT in a comment: "SELECT 1"
    let rows = client.query_cached(
        "SELECT 1",
        &[],
    );
    let update = format!("UPDATE jobs SET x = 1");
    let note = "SELECTION is a word";
    client.batch_execute(&sql);
    let url = request.query(&[("a", "b")]);
}

#[cfg(test)]
mod tests {
    const INDEX: &str = "CREATE INDEX a ON b (c)";
}
"#;
    let lines: Vec<usize> = sql_lines(text).into_iter().map(|(n, _)| n).collect();
    assert_eq!(lines, vec![4, 5, 8, 10]);
}
