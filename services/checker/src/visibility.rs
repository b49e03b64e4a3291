//! What a verdict may name, with tokens on: only productions of the
//! request's own VO. Everyone who may read a request (the caller of
//! `ValidateRequest`, and later anyone of the request's VO through
//! `GetRequest` or the answer on `reply_to`) may read that VO's productions,
//! and no other's. A profile open to several VOs (no `vos`) makes their
//! simulations comparable: a duplicate or an overlap of another VO's
//! production is still said — the simulation exists — but without its ID,
//! the files' LFNs that carry it, or its use as the request's answer
//! (`reuse_existing`).
//!
//! The verdict is decided first, on everything; only what it says is
//! changed here, so hiding a name never changes an outcome.

use std::collections::{BTreeSet, HashMap};

use prodsys_core::Violation;

use crate::domain::{Validation, Verdict};

/// How a production of another VO is named.
pub const OTHER_VO: &str = "a production of another VO";
/// How a file of another VO's production is named.
const OTHER_VO_FILE: &str = "(a file of another VO)";

/// Every production ID `validation` (and its pointings) names: its
/// existing production, its overlaps, and those its texts mention (IDs are
/// a profile's prefix, a dash and digits).
pub fn named(validation: &Validation, prefixes: &[&str]) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    collect(validation, prefixes, &mut ids);
    ids
}

fn collect(v: &Validation, prefixes: &[&str], ids: &mut BTreeSet<String>) {
    if !v.existing_production_id.is_empty() {
        ids.insert(v.existing_production_id.clone());
    }
    for o in &v.overlaps {
        if !o.production_id.is_empty() {
            ids.insert(o.production_id.clone());
        }
    }
    let texts = v
        .violations
        .iter()
        .map(|x| x.description.as_str())
        .chain(v.explanations.iter().map(String::as_str))
        .chain(v.overlaps.iter().map(|o| o.description.as_str()));
    for text in texts {
        ids.extend(ids_in(text, prefixes));
    }
    for p in &v.pointings {
        collect(p, prefixes, ids);
    }
}

/// The production IDs in `text`.
fn ids_in(text: &str, prefixes: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for prefix in prefixes.iter().filter(|p| !p.is_empty()) {
        let needle = format!("{prefix}-");
        let mut from = 0;
        while let Some(at) = text[from..].find(&needle) {
            let start = from + at;
            let digits_from = start + needle.len();
            let digits = text[digits_from..]
                .bytes()
                .take_while(u8::is_ascii_digit)
                .count();
            let end = digits_from + digits;
            if digits > 0 && bounded(text, start, end) {
                found.push(text[start..end].to_string());
            }
            from = digits_from;
        }
    }
    found
}

/// Whether `text[start..end]` is a word of its own (no letter, digit or
/// dash glued to either side).
fn bounded(text: &str, start: usize, end: usize) -> bool {
    let glued = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    !text[..start].chars().next_back().is_some_and(glued)
        && !text[end..].chars().next().is_some_and(glued)
}

/// The IDs of `named` that a verdict for `vo` may not name: those of
/// another VO, and those whose VO is not known (never guessed visible).
pub fn hidden_from(
    vo: &str,
    named: &BTreeSet<String>,
    vos: &HashMap<String, String>,
) -> BTreeSet<String> {
    named
        .iter()
        .filter(|id| vos.get(*id).is_none_or(|owner| owner != vo))
        .cloned()
        .collect()
}

/// `validation` without the productions `hidden`: their IDs out of its
/// fields and texts, the LFNs that carry them out of its texts. An existing
/// production that is hidden and was the answer (`reuse_existing`) no
/// longer is: the request is not acceptable then.
pub fn hide(validation: &mut Validation, hidden: &BTreeSet<String>) {
    if hidden.is_empty() {
        return;
    }
    if hidden.contains(&validation.existing_production_id) {
        let existing = std::mem::take(&mut validation.existing_production_id);
        let refused = validation
            .violations
            .iter()
            .any(|v| v.description.contains(&existing));
        if !refused {
            // It would have been the answer: another VO's production cannot be.
            validation.violations.push(Violation::new(
                "reuse_existing",
                format!(
                    "the same simulation already exists as {OTHER_VO}, which cannot answer a request of this VO"
                ),
            ));
            validation.acceptable = false;
        }
    }
    for overlap in &mut validation.overlaps {
        if hidden.contains(&overlap.production_id) {
            overlap.production_id.clear();
        }
        overlap.description = hide_in(&overlap.description, hidden);
    }
    for violation in &mut validation.violations {
        violation.description = hide_in(&violation.description, hidden);
    }
    for explanation in &mut validation.explanations {
        *explanation = hide_in(explanation, hidden);
    }
    for pointing in &mut validation.pointings {
        hide(pointing, hidden);
    }
}

/// A verdict for `vo` as [`hide`] leaves it: one answered with another VO's
/// production becomes a refusal.
pub fn hide_verdict<'p>(verdict: Verdict<'p>, hidden: &BTreeSet<String>) -> Verdict<'p> {
    match verdict {
        Verdict::Reused { mut validation } => {
            hide(&mut validation, hidden);
            if validation.acceptable {
                Verdict::Reused { validation }
            } else {
                Verdict::Rejected { validation }
            }
        }
        Verdict::Rejected { mut validation } => {
            hide(&mut validation, hidden);
            Verdict::Rejected { validation }
        }
        Verdict::Accepted {
            production_id,
            mut validation,
            accepted,
        } => {
            hide(&mut validation, hidden);
            Verdict::Accepted {
                production_id,
                validation,
                accepted,
            }
        }
    }
}

/// `text` without the productions `hidden`: an LFN (a word starting with
/// `/`) that carries one of them becomes "(a file of another VO)",
/// "production <ID>" and a bare ID become "a production of another VO".
fn hide_in(text: &str, hidden: &BTreeSet<String>) -> String {
    let separator = |c: char| c.is_whitespace() || matches!(c, ',' | ';' | '(' | ')');
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        // Anywhere in it: a file name may carry its production's ID too.
        if word.starts_with('/') && hidden.iter().any(|id| word.contains(id.as_str())) {
            out.push_str(OTHER_VO_FILE);
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if separator(c) {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    let mut text = out;
    for id in hidden {
        text = replace_word(&text, &format!("production {id}"), OTHER_VO);
        text = replace_word(&text, id, OTHER_VO);
    }
    text
}

/// `text` with each bounded occurrence of `word` replaced by `with`.
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    while let Some(at) = text[from..].find(word) {
        let start = from + at;
        let end = start + word.len();
        out.push_str(&text[from..start]);
        if bounded(text, start, end) {
            out.push_str(with);
        } else {
            out.push_str(word);
        }
        from = end;
    }
    out.push_str(&text[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Overlap;

    fn duplicate_of(existing: &str) -> Validation {
        Validation {
            acceptable: false,
            violations: vec![
                Violation::new(
                    "parameters",
                    format!("the same simulation already exists as production {existing}"),
                ),
                Violation::new(
                    "extend",
                    "overlaps CTA-000002 (energy 1..10 intersects 5..20); submit with extend",
                ),
            ],
            existing_production_id: existing.into(),
            overlaps: vec![Overlap {
                production_id: "CTA-000002".into(),
                description: "energy 1..10 intersects 5..20".into(),
            }],
            explanations: vec![format!(
                "the outputs: 3 file(s) of this identity in the catalog ({existing}, CTA-000002, CTA-0000123), e.g. /vo.cta/MC/{existing}/Data/0/run1.dat, /vo.cta/MC/CTA-000002/Data/0/run2.dat"
            )],
            ..Validation::default()
        }
    }

    #[test]
    fn another_vos_productions_are_said_to_exist_but_not_named() {
        let v = duplicate_of("CTA-000001");
        let prefixes = ["CTA", "KM3"];
        let named = named(&v, &prefixes);
        assert_eq!(
            named.iter().map(String::as_str).collect::<Vec<_>>(),
            ["CTA-000001", "CTA-000002", "CTA-0000123"]
        );
        let vos: HashMap<String, String> = [
            ("CTA-000001".to_string(), "other".to_string()),
            ("CTA-000002".to_string(), "mine".to_string()),
        ]
        .into();
        // CTA-0000123's VO is unknown: hidden too.
        let hidden = hidden_from("mine", &named, &vos);
        assert_eq!(hidden.len(), 2);
        let mut seen = v.clone();
        hide(&mut seen, &hidden);
        assert_eq!(seen.existing_production_id, "");
        assert!(!seen.acceptable);
        assert_eq!(
            seen.violations[0].description,
            "the same simulation already exists as a production of another VO"
        );
        // What the caller may see stays named.
        assert_eq!(seen.overlaps[0].production_id, "CTA-000002");
        assert!(seen.violations[1].description.contains("CTA-000002"));
        let explanation = &seen.explanations[0];
        assert!(!explanation.contains("CTA-000001"), "{explanation}");
        assert!(!explanation.contains("CTA-0000123"), "{explanation}");
        assert!(
            explanation.contains("(a file of another VO)"),
            "{explanation}"
        );
        assert!(
            explanation.contains("/vo.cta/MC/CTA-000002/Data/0/run2.dat"),
            "{explanation}"
        );
        // Nothing hidden, nothing changed.
        let mut same = v.clone();
        hide(&mut same, &BTreeSet::new());
        assert_eq!(same, v);
    }

    #[test]
    fn another_vos_production_cannot_be_the_answer() {
        let mut reused = Validation {
            acceptable: true,
            existing_production_id: "CTA-000001".into(),
            ..Validation::default()
        };
        let hidden: BTreeSet<String> = ["CTA-000001".to_string()].into();
        hide(&mut reused, &hidden);
        assert!(!reused.acceptable);
        assert_eq!(reused.existing_production_id, "");
        assert_eq!(reused.violations[0].field, "reuse_existing");
        assert!(!reused.violations[0].description.contains("CTA-000001"));
        // The same production of the caller's VO is the answer, as before.
        let mut mine = Validation {
            acceptable: true,
            existing_production_id: "CTA-000001".into(),
            ..Validation::default()
        };
        hide(&mut mine, &BTreeSet::new());
        assert!(mine.acceptable);
        assert_eq!(mine.existing_production_id, "CTA-000001");
    }

    #[test]
    fn ids_are_whole_words() {
        assert_eq!(
            ids_in("CTA-1, XCTA-2, CTA-3x, (CTA-4) CTA-", &["CTA"]),
            ["CTA-1", "CTA-4"]
        );
        assert_eq!(
            replace_word("CTA-1 CTA-12 CTA-1.", "CTA-1", "X"),
            "X CTA-12 X."
        );
    }
}
