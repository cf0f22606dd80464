//! Replays a leg's arrivals through an ideal band-ceiling dispatcher, to tell a target that
//! the dispatcher family cannot reach on these arrivals from one the router misses.
//!
//! The model is kinder than any real fleet: every prefill takes exactly `prefill_s` on a pod
//! of its own, a pod is free the moment it finishes, the dispatcher sees every pod's state
//! exactly, and a request's TTFT is its wait plus the fastest TTFT its class saw unloaded.
//! The dispatcher is what llm-d's flow control can express: classes are served in a fixed
//! order (bands by priority, and within a band the flow that fairness puts first), and a
//! class may start a request only while fewer than its ceiling of pods are busy. A request
//! that waits longer than the TTL expires.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One class's place in the dispatcher: its order and its ceiling.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassRule {
    /// The class name, as in the leg's trace.
    pub name: String,
    /// The class may start a request only while fewer pods than this are busy.
    pub ceiling_pods: usize,
}

/// One setting of the dispatcher: classes in the order they are served.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// Classes, first served first; classes not listed are not replayed.
    pub classes: Vec<ClassRule>,
}

impl std::str::FromStr for Setting {
    type Err = String;

    /// Parses `critical:4,light:3,heavy:3,sheddable:3` (name:ceiling, in serving order).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut classes = Vec::new();
        for part in s.split(',') {
            let (name, ceiling) = part
                .split_once(':')
                .ok_or_else(|| format!("setting entry {part:?}: expected name:ceiling_pods"))?;
            if name.is_empty() {
                return Err(format!("setting entry {part:?}: empty class name"));
            }
            let ceiling_pods: usize = ceiling.parse().map_err(|_| {
                format!("setting entry {part:?}: ceiling {ceiling:?} is not a pod count")
            })?;
            if classes.iter().any(|c: &ClassRule| c.name == name) {
                return Err(format!(
                    "setting entry {part:?}: class {name:?} listed twice"
                ));
            }
            classes.push(ClassRule {
                name: name.to_owned(),
                ceiling_pods,
            });
        }
        Ok(Self { classes })
    }
}

/// The fleet the model dispatches to.
#[derive(Debug, Clone, Copy)]
pub struct Fleet {
    /// Pods, each prefilling one request at a time.
    pub pods: usize,
    /// Seconds one prefill holds its pod.
    pub prefill_s: f64,
    /// Seconds a request may wait before it expires.
    pub ttl_s: f64,
}

/// One request of a leg, as its trace CSV gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    /// The class name.
    pub class: String,
    /// Seconds from the start of the leg.
    pub sent_s: f64,
    /// Its TTFT in ms, when it was served.
    pub served_ttft_ms: Option<f64>,
}

/// What one class got in a replay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Seconds each started request waited, in the order they started.
    pub waits_s: Vec<f64>,
    /// Requests that waited past the TTL.
    pub expired: u64,
}

/// Reads the rows of a leg's trace CSV (`class,sent_s,ttft_ms,status`, written by
/// `classes --trace`; an empty status is a served request).
pub fn parse_trace(csv: &str) -> Result<Vec<Arrival>, String> {
    let mut lines = csv.lines();
    match lines.next() {
        Some(h) if h.starts_with("class,sent_s") => {}
        other => return Err(format!("trace header {other:?}: expected class,sent_s,...")),
    }
    lines
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            let line = i + 2;
            let mut f = l.split(',');
            let class = f.next().unwrap_or_default();
            let sent = f.next().unwrap_or_default();
            let ttft = f.next().unwrap_or_default();
            let served = f.next().unwrap_or_default().is_empty();
            let sent_s: f64 = sent
                .parse()
                .map_err(|_| format!("trace line {line}: sent_s {sent:?} is not a number"))?;
            let served_ttft_ms = match (served, ttft) {
                (true, t) if !t.is_empty() => Some(
                    t.parse()
                        .map_err(|_| format!("trace line {line}: ttft_ms {t:?} is not a number"))?,
                ),
                _ => None,
            };
            Ok(Arrival {
                class: class.to_owned(),
                sent_s,
                served_ttft_ms,
            })
        })
        .collect()
}

/// Replays `arrivals` (sorted by `sent_s`) through the dispatcher `setting` on `fleet`.
pub fn replay(arrivals: &[Arrival], setting: &Setting, fleet: Fleet) -> Vec<Outcome> {
    let rank = |name: &str| setting.classes.iter().position(|c| c.name == name);
    let mut outcomes = vec![Outcome::default(); setting.classes.len()];
    // Pod i is busy until free_at[i].
    let mut free_at = vec![f64::NEG_INFINITY; fleet.pods];
    // Waiting requests by (class order, arrival index): the first entry is served first.
    let mut waiting: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    let mut next = 0;
    let mut now = f64::NEG_INFINITY;
    loop {
        // Everything due at `now`: expiries, then arrivals, then starts.
        waiting.retain(|&(class, _), sent| {
            // The same sum as the expiry event below, so a request expires at that event.
            let keep = now < *sent + fleet.ttl_s;
            if !keep {
                outcomes[class].expired += 1;
            }
            keep
        });
        while next < arrivals.len() && arrivals[next].sent_s <= now {
            if let Some(class) = rank(&arrivals[next].class) {
                waiting.insert((class, next), arrivals[next].sent_s);
            }
            next += 1;
        }
        loop {
            let busy = free_at.iter().filter(|&&t| t > now).count();
            let start = waiting
                .iter()
                .find(|((class, _), _)| busy < setting.classes[*class].ceiling_pods)
                .map(|(&key, &sent)| (key, sent));
            let (Some(((class, idx), sent)), true) = (start, busy < fleet.pods) else {
                break;
            };
            waiting.remove(&(class, idx));
            let pod = free_at.iter().position(|&t| t <= now).unwrap_or(0);
            free_at[pod] = now + fleet.prefill_s;
            outcomes[class].waits_s.push(now - sent);
        }
        // The next moment anything can change.
        let arrival = arrivals.get(next).map_or(f64::INFINITY, |a| a.sent_s);
        let pod_free = free_at
            .iter()
            .copied()
            .filter(|&t| t > now)
            .fold(f64::INFINITY, f64::min);
        let expiry = waiting
            .values()
            .map(|&sent| sent + fleet.ttl_s)
            .fold(f64::INFINITY, f64::min);
        let at = arrival.min(if waiting.is_empty() {
            f64::INFINITY
        } else {
            pod_free.min(expiry)
        });
        if at.is_infinite() {
            break;
        }
        now = at;
    }
    outcomes
}

/// The TTFT p99 (ms) and how many exceed `limit_ms`, for waits plus `base_ms`.
pub fn ttft_summary(waits_s: &[f64], base_ms: f64, limit_ms: f64) -> Option<(f64, usize)> {
    let mut ttft: Vec<f64> = waits_s.iter().map(|w| w * 1000.0 + base_ms).collect();
    ttft.sort_by(f64::total_cmp);
    let p99 = crate::stats::percentile(&ttft, 99.0)?;
    Some((p99, ttft.iter().filter(|&&t| t > limit_ms).count()))
}

/// The markdown table of `settings` replayed over `arrivals`: each `judged` class's
/// modelled TTFT p99 against its limit (`limit_factor` × its unloaded p99), with `base`
/// giving each class's fastest and p99 unloaded TTFT in ms.
pub fn table(
    arrivals: &[Arrival],
    settings: &[Setting],
    fleet: Fleet,
    base: &BTreeMap<String, (f64, f64)>,
    judged: &[String],
    limit_factor: f64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| ceilings (pods, in serving order) | class | started | expired | modelled TTFT p99 ms | limit ms | over the limit | p99 within the limit |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for setting in settings {
        let label = setting
            .classes
            .iter()
            .map(|c| format!("{} {}", c.name, c.ceiling_pods))
            .collect::<Vec<_>>()
            .join(", ");
        for (rule, outcome) in setting.classes.iter().zip(replay(arrivals, setting, fleet)) {
            if !judged.contains(&rule.name) {
                continue;
            }
            let Some(&(fastest, p99)) = base.get(&rule.name) else {
                continue;
            };
            let limit = limit_factor * p99;
            let Some((modelled, over)) = ttft_summary(&outcome.waits_s, fastest, limit) else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {} | {modelled:.0} | {limit:.0} | {over} | {} |",
                rule.name,
                outcome.waits_s.len(),
                outcome.expired,
                if modelled <= limit { "yes" } else { "no" }
            );
        }
    }
    out
}

/// Each class's fastest and p99 TTFT (ms) among the served requests of a trace.
pub fn unloaded_base(trace: &[Arrival]) -> BTreeMap<String, (f64, f64)> {
    let mut by_class: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for a in trace {
        if let Some(t) = a.served_ttft_ms {
            by_class.entry(&a.class).or_default().push(t);
        }
    }
    by_class
        .into_iter()
        .filter_map(|(class, mut v)| {
            v.sort_by(f64::total_cmp);
            Some((
                class.to_owned(),
                (v[0], crate::stats::percentile(&v, 99.0)?),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrivals(list: &[(&str, f64)]) -> Vec<Arrival> {
        list.iter()
            .map(|&(c, t)| Arrival {
                class: c.into(),
                sent_s: t,
                served_ttft_ms: None,
            })
            .collect()
    }

    const FLEET: Fleet = Fleet {
        pods: 2,
        prefill_s: 1.0,
        ttl_s: 10.0,
    };

    #[test]
    fn the_first_class_goes_first_and_a_ceiling_holds_a_class_back() {
        let a = arrivals(&[("low", 0.0), ("low", 0.0), ("high", 0.5), ("low", 0.5)]);
        let s: Setting = "high:2,low:2".parse().unwrap();
        let o = replay(&a, &s, FLEET);
        // Both pods take the first two low requests; high starts first when one frees.
        assert_eq!(o[0].waits_s, vec![0.5]);
        assert_eq!(o[1].waits_s, vec![0.0, 0.0, 0.5]);
        // With low's ceiling at 1 pod, high finds a pod free at once, and low starts only
        // when no pod is busy.
        let s: Setting = "high:2,low:1".parse().unwrap();
        let o = replay(&a, &s, FLEET);
        assert_eq!(o[0].waits_s, vec![0.0]);
        assert_eq!(o[1].waits_s, vec![0.0, 1.5, 2.0]);
    }

    #[test]
    fn a_request_waiting_past_the_ttl_expires_and_unlisted_classes_are_skipped() {
        let a = arrivals(&[("x", 0.0), ("x", 0.0), ("other", 0.0)]);
        let fleet = Fleet {
            pods: 1,
            prefill_s: 1.0,
            ttl_s: 0.5,
        };
        let o = replay(&a, &"x:1".parse().unwrap(), fleet);
        assert_eq!(o[0].waits_s, vec![0.0]);
        assert_eq!(o[0].expired, 1);
    }

    #[test]
    fn bad_settings_and_traces_are_named() {
        for (bad, want) in [
            ("a", "expected name:ceiling_pods"),
            ("a:x", "is not a pod count"),
            (":1", "empty class name"),
            ("a:1,a:2", "listed twice"),
        ] {
            let e = bad.parse::<Setting>().unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(parse_trace("x,y\n").unwrap_err().contains("header"));
        let e = parse_trace("class,sent_s,ttft_ms,status\na,zz,,\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("\"zz\""), "{e}");
    }

    #[test]
    fn the_table_judges_each_class_against_its_limit() {
        let trace = "class,sent_s,ttft_ms,status\nhigh,0.0,,\nhigh,0.0,,\n";
        let a = parse_trace(trace).unwrap();
        let base = unloaded_base(
            &parse_trace(
                "class,sent_s,ttft_ms,status\nhigh,0,100.0,\nhigh,0,100.0,\nhigh,0,,429\n",
            )
            .unwrap(),
        );
        assert_eq!(base["high"], (100.0, 100.0));
        let fleet = Fleet {
            pods: 1,
            prefill_s: 1.0,
            ttl_s: 10.0,
        };
        // The second request waits 1 s: 1,100 ms against 1.5 × 100 = 150 ms.
        let judged = ["high".to_owned()];
        let t = table(&a, &["high:1".parse().unwrap()], fleet, &base, &judged, 1.5);
        assert!(t.contains("| high 1 | high | 2 | 0 |"), "{t}");
        assert!(t.contains("| 1090 | 150 | 1 | no |"), "{t}");
        let fleet = Fleet { pods: 2, ..fleet };
        let t = table(&a, &["high:2".parse().unwrap()], fleet, &base, &judged, 1.5);
        assert!(t.contains("| 100 | 150 | 0 | yes |"), "{t}");
        // A class not judged gets no row.
        let t = table(&a, &["high:2".parse().unwrap()], fleet, &base, &[], 1.5);
        assert!(!t.contains("| high |"), "{t}");
    }
}
