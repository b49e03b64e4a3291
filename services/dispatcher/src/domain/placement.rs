//! Placement of ready jobs on installations: a federated production's (one
//! whose `backend` names a group of installations or `any`) over the
//! installations that may take them, a plain production's on its one. Each
//! job goes to an available installation with free room (its
//! `max_in_flight` minus the jobs it holds), the one with the fewest jobs
//! held per unit of its share; ties go to the first by name.
//!
//! Productions sharing installations are served by priority: a level is
//! placed after every higher one, which already holds the room it was
//! given. Within a level the productions take turns: each next job goes to
//! the production with the fewest jobs in flight (those it holds already
//! and those just placed), the older first on a tie, so one of equal
//! priority is never starved while another has jobs waiting.

use std::collections::BTreeMap;

use prodsys_core::JobState;
use prodsys_proto as pb;

/// An installation as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// Most jobs it may hold at once (queued or running).
    pub capacity: u64,
    /// Jobs it holds now (reserved, queued or running).
    pub in_flight: u64,
    /// Its weight among the installations of a group (positive).
    pub share: f64,
    /// Healthy, and scheduled by a dispatcher: a failing or unattended
    /// installation is given nothing (it is drained).
    pub available: bool,
}

impl Site {
    fn free(&self) -> u64 {
        if self.available {
            self.capacity.saturating_sub(self.in_flight)
        } else {
            0
        }
    }
}

/// The ready jobs of one production, and where they may go.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub production_id: String,
    /// The installations its group (or `any`) gives it, for its VO; for a
    /// plain production, its one installation.
    pub members: Vec<String>,
    /// Jobs ready to run and on no installation yet.
    pub ready: u64,
    /// Its request's priority: higher levels are placed first.
    pub priority: i32,
    /// Its jobs in flight now, on any installation: within a level, the
    /// production with the fewest takes the next job.
    pub in_flight: u64,
}

/// The member of `members` the next job goes to: available, with room, the
/// fewest jobs held per unit of share, the first by name on a tie.
fn best_site<'a>(load: &BTreeMap<&'a str, Site>, members: &[String]) -> Option<&'a str> {
    members
        .iter()
        .filter_map(|name| load.get_key_value(name.as_str()))
        .filter(|(_, site)| site.free() > 0)
        .map(|(name, site)| (*name, (site.in_flight + 1) as f64 / site.share))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(b.0)))
        .map(|(name, _)| name)
}

/// How many jobs of which production go to which installation (production,
/// installation, jobs; in the order of `demands`, then by installation).
/// `demands` come highest priority first, then the oldest. Installations not
/// in `sites` take nothing.
pub fn place(sites: &BTreeMap<String, Site>, demands: &[Demand]) -> Vec<(String, String, u64)> {
    let mut load: BTreeMap<&str, Site> = sites
        .iter()
        .map(|(name, site)| (name.as_str(), site.clone()))
        .collect();
    let mut given: Vec<BTreeMap<&str, u64>> = vec![BTreeMap::new(); demands.len()];
    let mut start = 0;
    while start < demands.len() {
        let priority = demands[start].priority;
        let end = demands[start..]
            .iter()
            .position(|d| d.priority != priority)
            .map_or(demands.len(), |n| start + n);
        // This level's productions: (in flight with what they were given, left to place).
        let mut turns: Vec<(u64, u64)> = demands[start..end]
            .iter()
            .map(|d| (d.in_flight, d.ready))
            .collect();
        loop {
            // The production with the fewest in flight that can still place a job.
            let next = turns
                .iter()
                .enumerate()
                .filter(|(_, (_, left))| *left > 0)
                .min_by_key(|(i, (in_flight, _))| (*in_flight, *i))
                .map(|(i, _)| i);
            let Some(i) = next else {
                break;
            };
            match best_site(&load, &demands[start + i].members) {
                Some(name) => {
                    if let Some(site) = load.get_mut(name) {
                        site.in_flight += 1;
                    }
                    *given[start + i].entry(name).or_default() += 1;
                    turns[i].0 += 1;
                    turns[i].1 -= 1;
                }
                // No room left on any of its installations: it is done here.
                None => turns[i].1 = 0,
            }
        }
        start = end;
    }
    demands
        .iter()
        .zip(given)
        .flat_map(|(demand, given)| {
            given
                .into_iter()
                .map(|(name, n)| (demand.production_id.clone(), name.to_string(), n))
        })
        .collect()
}

/// The order in which [`place`] gives one installation's productions their
/// jobs: highest priority first, then the fewest in flight, then the first
/// in `keys` (priority, jobs in flight; in the order of `demands`). With a
/// single installation of room `room`, a production given a job comes after
/// fewer than `room` others with jobs ready in this order (each of those was
/// given one before it), so the first `room` with jobs ready in this order
/// are all `place` needs to see.
pub fn turn_order(keys: &[(i32, u64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(keys[i].0), keys[i].1, i));
    order
}

/// What `installation` takes of `placed`: per production, how many jobs.
pub fn taken_by<'a>(
    placed: &'a [(String, String, u64)],
    installation: &'a str,
) -> impl Iterator<Item = (&'a str, u64)> + 'a {
    placed
        .iter()
        .filter(move |(_, name, _)| name == installation)
        .map(|(production, _, n)| (production.as_str(), *n))
}

/// Ranges of job indexes kept per installation in `production.completed`.
pub const JOB_RANGES_KEPT: usize = 1000;

/// A finished production's jobs per installation (installation, state,
/// jobs; in installation order) with the ranges of jobs each ran
/// (installation, first, last; at most [`JOB_RANGES_KEPT`] an installation,
/// one more marking it truncated), as `production.completed` tells them.
pub fn per_installation(
    rows: &[(String, JobState, u64)],
    ranges: &[(String, u64, u64)],
) -> Vec<pb::InstallationJobs> {
    let mut by: BTreeMap<&str, (prodsys_core::JobCounts, Vec<pb::JobRange>, bool)> =
        BTreeMap::new();
    for (installation, state, n) in rows {
        by.entry(installation).or_default().0.add(*state, *n);
    }
    for (installation, first, last) in ranges {
        let (_, kept, truncated) = by.entry(installation).or_default();
        if kept.len() < JOB_RANGES_KEPT {
            kept.push(pb::JobRange {
                first: *first,
                last: *last,
            });
        } else {
            *truncated = true;
        }
    }
    by.into_iter()
        .map(
            |(installation, (counts, jobs, jobs_truncated))| pb::InstallationJobs {
                installation: installation.to_string(),
                counts: Some(counts.into()),
                jobs,
                jobs_truncated,
            },
        )
        .collect()
}

/// The installation a failed attempt's retry is placed on: none (placed
/// again, anywhere in its group) when retries may move, else the one it failed on.
pub fn retry_installation(failed_on: &str, retry_elsewhere: bool) -> Option<&str> {
    (!retry_elsewhere).then_some(failed_on)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(capacity: u64, in_flight: u64, share: f64) -> Site {
        Site {
            capacity,
            in_flight,
            share,
            available: true,
        }
    }

    fn demand(production_id: &str, members: &[&str], ready: u64) -> Demand {
        Demand {
            production_id: production_id.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            ready,
            priority: 0,
            in_flight: 0,
        }
    }

    #[test]
    fn one_installation_places_the_same_seeing_only_the_first_productions_with_jobs_ready_in_turn_order()
     {
        // A small generator, so that every run checks the same cases.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut pruned_away = 0;
        for _ in 0..2_000 {
            let capacity = 1 + next(40);
            let sites =
                BTreeMap::from([("local".to_string(), site(capacity, next(capacity + 1), 1.0))]);
            let room = sites["local"].free();
            let mut demands: Vec<Demand> = (0..1 + next(60))
                .map(|i| Demand {
                    production_id: format!("P-{i:03}"),
                    members: vec!["local".into()],
                    ready: next(4),
                    priority: next(3) as i32,
                    in_flight: next(6),
                })
                .collect();
            // `place` takes them highest priority first, then the oldest.
            demands.sort_by_key(|d| std::cmp::Reverse(d.priority));
            let keys: Vec<(i32, u64)> = demands.iter().map(|d| (d.priority, d.in_flight)).collect();
            let mut seen = std::collections::BTreeSet::new();
            let mut with_ready = 0;
            for i in turn_order(&keys) {
                if with_ready >= room {
                    break;
                }
                seen.insert(i);
                with_ready += u64::from(demands[i].ready > 0);
            }
            let first: Vec<Demand> = demands
                .iter()
                .enumerate()
                .filter(|(i, _)| seen.contains(i))
                .map(|(_, d)| d.clone())
                .collect();
            pruned_away += demands.len() - first.len();
            assert_eq!(
                place(&sites, &first),
                place(&sites, &demands),
                "room {room}"
            );
        }
        // The cases left productions out, or the check says nothing.
        assert!(pruned_away > 10_000, "{pruned_away}");
    }

    fn of(placed: &[(String, String, u64)], production: &str) -> u64 {
        placed
            .iter()
            .filter(|(p, _, _)| p == production)
            .map(|(_, _, n)| n)
            .sum()
    }

    fn count(placed: &[(String, String, u64)], installation: &str) -> u64 {
        taken_by(placed, installation).map(|(_, n)| n).sum()
    }

    #[test]
    fn jobs_beyond_the_free_room_wait_and_each_installation_fills_to_its_capacity() {
        let sites = BTreeMap::from([("a".into(), site(1, 0, 1.0)), ("b".into(), site(3, 0, 1.0))]);
        let placed = place(&sites, &[demand("P", &["a", "b"], 10)]);
        assert_eq!(count(&placed, "a"), 1);
        assert_eq!(count(&placed, "b"), 3);
        // Jobs already held count against the room.
        let sites = BTreeMap::from([("a".into(), site(1, 1, 1.0)), ("b".into(), site(3, 1, 1.0))]);
        let placed = place(&sites, &[demand("P", &["a", "b"], 10)]);
        assert_eq!(placed, vec![("P".to_string(), "b".to_string(), 2)]);
    }

    #[test]
    fn with_room_everywhere_jobs_follow_the_shares() {
        let sites = BTreeMap::from([
            ("a".into(), site(100, 0, 1.0)),
            ("b".into(), site(100, 0, 3.0)),
        ]);
        let placed = place(&sites, &[demand("P", &["a", "b"], 8)]);
        assert_eq!((count(&placed, "a"), count(&placed, "b")), (2, 6));
        // Equal shares: the less loaded installation first, then alternating.
        let sites = BTreeMap::from([
            ("a".into(), site(100, 4, 1.0)),
            ("b".into(), site(100, 0, 1.0)),
        ]);
        let placed = place(&sites, &[demand("P", &["a", "b"], 6)]);
        assert_eq!((count(&placed, "a"), count(&placed, "b")), (1, 5));
    }

    #[test]
    fn an_unavailable_installation_is_drained_and_its_share_goes_elsewhere() {
        let mut sites =
            BTreeMap::from([("a".into(), site(2, 0, 1.0)), ("b".into(), site(5, 3, 1.0))]);
        sites.get_mut("b").unwrap().available = false;
        let placed = place(&sites, &[demand("P", &["a", "b"], 6)]);
        assert_eq!(placed, vec![("P".to_string(), "a".to_string(), 2)]);
        sites.get_mut("a").unwrap().available = false;
        assert!(place(&sites, &[demand("P", &["a", "b"], 6)]).is_empty());
    }

    #[test]
    fn productions_are_placed_in_order_over_their_own_members_only() {
        let sites = BTreeMap::from([
            ("a".into(), site(2, 0, 1.0)),
            ("b".into(), site(2, 0, 1.0)),
            ("c".into(), site(2, 0, 1.0)),
        ]);
        let placed = place(
            &sites,
            &[
                Demand {
                    priority: 5,
                    ..demand("HIGH", &["a", "b"], 3)
                },
                demand("LOW", &["b", "c", "unknown"], 5),
            ],
        );
        let of = |p: &str, i: &str| {
            placed
                .iter()
                .find(|(pp, ii, _)| pp == p && ii == i)
                .map_or(0, |(_, _, n)| *n)
        };
        assert_eq!((of("HIGH", "a"), of("HIGH", "b")), (2, 1));
        // LOW gets what HIGH left: one slot of b, both of c; nothing of a.
        assert_eq!((of("LOW", "a"), of("LOW", "b"), of("LOW", "c")), (0, 1, 2));
    }

    #[test]
    fn a_higher_priority_takes_the_shared_room_first_whatever_its_age() {
        let sites = BTreeMap::from([("a".into(), site(1, 0, 1.0)), ("b".into(), site(3, 0, 1.0))]);
        // An older plain production of a, and a newer group's of the same
        // priority: they share a's slot and b's room by turns.
        let placed = place(
            &sites,
            &[demand("OLD", &["a"], 5), demand("NEW", &["a", "b"], 3)],
        );
        assert_eq!(
            (of(&placed, "OLD"), of(&placed, "NEW")),
            (1, 3),
            "{placed:?}"
        );
        // The newer one urgent: it is placed first and takes a's slot too.
        let placed = place(
            &sites,
            &[
                Demand {
                    priority: 10,
                    ..demand("NEW", &["a", "b"], 3)
                },
                demand("OLD", &["a"], 5),
            ],
        );
        assert_eq!(
            (of(&placed, "NEW"), of(&placed, "OLD")),
            (3, 0),
            "{placed:?}"
        );
        assert_eq!(count(&placed, "a"), 1);
    }

    #[test]
    fn equal_priorities_take_turns_by_jobs_in_flight() {
        let sites = BTreeMap::from([("a".into(), site(1, 0, 1.0)), ("b".into(), site(3, 0, 1.0))]);
        let placed = place(
            &sites,
            &[
                demand("OLDER", &["a", "b"], 8),
                demand("NEWER", &["a", "b"], 8),
            ],
        );
        assert_eq!((of(&placed, "OLDER"), of(&placed, "NEWER")), (2, 2));
        // One slot a round: the one with fewer in flight takes it, so the
        // older does not keep it round after round.
        let one = BTreeMap::from([("a".into(), site(2, 1, 1.0))]);
        let placed = place(
            &one,
            &[
                Demand {
                    in_flight: 1,
                    ..demand("OLDER", &["a"], 8)
                },
                demand("NEWER", &["a"], 8),
            ],
        );
        assert_eq!(placed, vec![("NEWER".to_string(), "a".to_string(), 1)]);
        // A tie goes to the older.
        let placed = place(
            &one,
            &[demand("OLDER", &["a"], 8), demand("NEWER", &["a"], 8)],
        );
        assert_eq!(placed, vec![("OLDER".to_string(), "a".to_string(), 1)]);
        // One whose installations are full does not stop the others' turns.
        let sites = BTreeMap::from([("a".into(), site(1, 1, 1.0)), ("b".into(), site(4, 0, 1.0))]);
        let placed = place(
            &sites,
            &[demand("ON-A", &["a"], 5), demand("ON-B", &["b"], 5)],
        );
        assert_eq!((of(&placed, "ON-A"), of(&placed, "ON-B")), (0, 4));
    }

    #[test]
    fn a_finished_production_s_jobs_are_told_per_installation() {
        let rows = [
            ("local-b".to_string(), JobState::Done, 6),
            ("local-a".to_string(), JobState::Done, 3),
            ("local-a".to_string(), JobState::Exhausted, 1),
        ];
        let ranges = [
            ("local-a".to_string(), 0, 2),
            ("local-a".to_string(), 9, 9),
            ("local-b".to_string(), 3, 8),
        ];
        let by = per_installation(&rows, &ranges);
        assert_eq!(by.len(), 2);
        assert_eq!(by[0].installation, "local-a");
        let a = by[0].counts.unwrap();
        assert_eq!((a.done, a.exhausted), (3, 1));
        let spans = |i: &pb::InstallationJobs| -> Vec<(u64, u64)> {
            i.jobs.iter().map(|r| (r.first, r.last)).collect()
        };
        assert_eq!(spans(&by[0]), [(0, 2), (9, 9)]);
        assert!(!by[0].jobs_truncated);
        assert_eq!(by[1].counts.unwrap().done, 6);
        assert_eq!(spans(&by[1]), [(3, 8)]);
    }

    #[test]
    fn ranges_beyond_those_kept_mark_the_installation_truncated() {
        let rows = [("a".to_string(), JobState::Done, 2002)];
        let ranges: Vec<(String, u64, u64)> = (0..=JOB_RANGES_KEPT as u64)
            .map(|i| ("a".to_string(), 2 * i, 2 * i))
            .collect();
        let by = per_installation(&rows, &ranges);
        assert_eq!(by[0].jobs.len(), JOB_RANGES_KEPT);
        assert!(by[0].jobs_truncated);
    }

    #[test]
    fn a_retry_moves_only_when_retries_may_move() {
        assert_eq!(retry_installation("a", true), None);
        assert_eq!(retry_installation("a", false), Some("a"));
    }
}
