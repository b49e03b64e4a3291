//! A field-level reason for refusing a request.

use serde::{Deserialize, Serialize};

/// One thing wrong with a request: which field, and why, in words a scientist reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Dotted path of the field (`parameters.energy_min_tev`), or a top-level field (`profile`).
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}
