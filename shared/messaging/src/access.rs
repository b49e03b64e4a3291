//! Least privilege on the broker: the RabbitMQ permissions (configure,
//! write and read regular expressions over exchange and queue names) of
//! each service's own user and of the ingest user other systems publish
//! requests with. `prodsys broker-users` grants them.

use crate::Names;

/// The three regular expressions of a user's permissions on a vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// `text` as a regular expression matching only itself.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn exactly(names: &[String]) -> String {
    let alternatives: Vec<String> = names.iter().map(|n| escape(n)).collect();
    format!("^({})$", alternatives.join("|"))
}

/// What `service` needs: declaring the shared exchanges and its own queues
/// (configure); publishing events, dead letters and, through the default
/// exchange, held batches, replies and binding its queues (write);
/// consuming its queues and binding to the shared exchanges (read).
/// Nothing of another service's queues.
pub fn service(names: &Names, service: &str) -> Permissions {
    let own = [names.queue(service), names.dead_letter_queue(service)];
    let shared = [
        names.events(),
        names.ingest(),
        names.dlx(),
        names.unroutable(),
    ];
    let configure: Vec<String> = shared.iter().chain(&own).cloned().collect();
    let write: Vec<String> = [
        names.events(),
        names.dlx(),
        names.unroutable(),
        "amq.default".to_string(),
    ]
    .into_iter()
    .chain(own.iter().cloned())
    .collect();
    Permissions {
        configure: exactly(&configure),
        write: exactly(&write),
        read: exactly(&configure),
    }
}

/// What a system submitting requests by event needs: publishing to the
/// ingest exchange, and declaring and reading its own server-named reply
/// queue (`amq.gen-*`); nothing else.
pub fn ingest(names: &Names) -> Permissions {
    Permissions {
        configure: "^amq\\.gen-.*$".into(),
        write: exactly(&[names.ingest()]),
        read: "^amq\\.gen-.*$".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_reaches_only_its_own_names() {
        let names = Names::new("t1.");
        let intake = service(&names, "intake");
        assert_eq!(
            intake.configure,
            "^(t1\\.prodsys\\.events|t1\\.prodsys\\.ingest|t1\\.prodsys\\.dlx|t1\\.prodsys\\.unroutable|t1\\.prodsys\\.intake|t1\\.prodsys\\.intake\\.dlq)$"
        );
        assert!(intake.write.contains("amq\\.default"));
        assert!(!intake.write.contains("ingest"));
        assert!(!intake.read.contains("checker"));
        let ingest = ingest(&names);
        assert_eq!(ingest.write, "^(t1\\.prodsys\\.ingest)$");
        assert_eq!(escape("a.b*c"), "a\\.b\\*c");
    }
}
