//! The read model's gauges at `/metrics`, through `prometheus-client` as
//! every service's own figures: productions by state, jobs by state, each
//! installation's health and, per forwarding destination, files catalogued,
//! verified there and failing. They are read from the database at each
//! scrape ([`store::figures`]), so they go in a registry of their own, built
//! for that scrape, encoded before the process's figures.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::store::{DestinationFigures, Figures};

/// One figure of a forwarding destination.
type DestinationFigure = fn(&DestinationFigures) -> i64;

/// The gauges of each forwarding destination: name, help, figure.
const DESTINATION_GAUGES: [(&str, &str, DestinationFigure); 3] = [
    (
        "prodsys_forwarding_files",
        "Files of the productions forwarded to a destination, catalogued so far.",
        |d| d.total,
    ),
    (
        "prodsys_forwarded_files",
        "Of those, files verified on the destination (registered, on a Rucio destination).",
        |d| d.forwarded,
    ),
    (
        "prodsys_forwarding_failing_files",
        "Of those, files whose last copy to the destination failed (retried with backoff).",
        |d| d.failing,
    ),
];

/// A label value as the text format quotes it (`prometheus-client` writes
/// label values as they are).
fn escaped(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A gauge family with one label, its samples in the order given.
fn gauges<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    key: &str,
    samples: impl IntoIterator<Item = (&'a str, i64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, n) in samples {
        let labels = [(key, escaped(value))];
        ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The figures of one scrape, encoded as gauges.
#[derive(Debug)]
struct ReadModel(Figures);

impl Collector for ReadModel {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let figures = &self.0;
        gauges(
            &mut encoder,
            "prodsys_productions",
            "Productions in the status read model, by state.",
            "state",
            figures
                .productions
                .iter()
                .map(|(state, n)| (state.as_str(), *n)),
        )?;
        // Jobs no event mentioned yet are CREATED too.
        let created = figures
            .jobs
            .iter()
            .filter(|(state, _)| state == "CREATED")
            .map(|(_, n)| *n)
            .sum::<i64>()
            + figures.unmentioned.max(0);
        gauges(
            &mut encoder,
            "prodsys_jobs",
            "Jobs of all productions, by state (CREATED: not yet mentioned by any event).",
            "state",
            std::iter::once(("CREATED", created)).chain(
                figures
                    .jobs
                    .iter()
                    .filter(|(state, _)| state != "CREATED")
                    .map(|(state, n)| (state.as_str(), *n)),
            ),
        )?;
        gauges(
            &mut encoder,
            "prodsys_installation_up",
            "1 when the WMS installation answers, 0 while it fails.",
            "installation",
            figures
                .installations
                .iter()
                .map(|(name, healthy)| (name.as_str(), i64::from(*healthy))),
        )?;
        for (name, help, figure) in DESTINATION_GAUGES {
            gauges(
                &mut encoder,
                name,
                help,
                "destination",
                figures
                    .destinations
                    .iter()
                    .map(|d| (d.destination.as_str(), figure(d))),
            )?;
        }
        Ok(())
    }
}

/// The read model's gauges in the OpenMetrics text format, without the end
/// marker (the process's figures follow).
pub fn encode(figures: Figures) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReadModel(figures)));
    let mut out = String::new();
    let _ = prodsys_telemetry::metrics::encode_families(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_model_s_figures_are_gauges_by_state_installation_and_destination() {
        let text = encode(Figures {
            productions: vec![("COMPLETED".into(), 2), ("RUNNING".into(), 1)],
            jobs: vec![("CREATED".into(), 3), ("DONE".into(), 8)],
            unmentioned: 4,
            installations: vec![("local".into(), true), ("say \"slurm\"".into(), false)],
            destinations: vec![DestinationFigures {
                destination: "disk".into(),
                forwarded: 6,
                total: 8,
                failing: 1,
            }],
        });
        let lines: Vec<&str> = text.lines().collect();
        for line in [
            "# HELP prodsys_productions Productions in the status read model, by state.",
            "# TYPE prodsys_productions gauge",
            "prodsys_productions{state=\"COMPLETED\"} 2",
            "prodsys_productions{state=\"RUNNING\"} 1",
            "# TYPE prodsys_jobs gauge",
            "prodsys_jobs{state=\"CREATED\"} 7",
            "prodsys_jobs{state=\"DONE\"} 8",
            "prodsys_installation_up{installation=\"local\"} 1",
            "prodsys_installation_up{installation=\"say \\\"slurm\\\"\"} 0",
            "prodsys_forwarding_files{destination=\"disk\"} 8",
            "prodsys_forwarded_files{destination=\"disk\"} 6",
            "prodsys_forwarding_failing_files{destination=\"disk\"} 1",
        ] {
            assert!(lines.contains(&line), "{line} missing from\n{text}");
        }
        assert_eq!(text.matches("prodsys_jobs{").count(), 2, "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn without_productions_each_family_is_still_described() {
        let text = encode(Figures {
            productions: Vec::new(),
            jobs: Vec::new(),
            unmentioned: 0,
            installations: Vec::new(),
            destinations: Vec::new(),
        });
        assert!(text.contains("prodsys_jobs{state=\"CREATED\"} 0"), "{text}");
        for (name, _, _) in DESTINATION_GAUGES {
            assert!(text.contains(&format!("# TYPE {name} gauge")), "{text}");
        }
    }
}
