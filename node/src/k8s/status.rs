//! Status written back on the custom resources, as GIE defines it (plain functions).
//!
//! - InferenceObjective and InferenceModelRewrite: `status.conditions`, a condition of type
//!   `Accepted` (reason `Accepted` when mirrored into policy, `Invalid` with a message
//!   naming the field when refused).
//! - InferencePool: `status.parents` belongs to the gateways that route to the pool, so
//!   the tier adds and updates only its own entry (parentRef kind `EndpointPicker`,
//!   group `infermesh.io`) and leaves every other parent untouched.
//!
//! `lastTransitionTime` changes only when the condition's status does, as Kubernetes'
//! condition conventions require; a write is needed only when something changed.

use serde_json::{Value, json};

use super::translate::{Review, Verdict};

/// The group of the tier's own `status.parents` entry on an InferencePool.
pub const PARENT_GROUP: &str = "infermesh.io";
/// The kind of that entry.
pub const PARENT_KIND: &str = "EndpointPicker";
/// The controller name written beside it.
pub const CONTROLLER_NAME: &str = "infermesh.io/endpoint-picker";

/// The `Accepted` condition for a review, keeping `lastTransitionTime` from `previous`
/// when the status did not change.
pub fn accepted_condition(review: &Review, previous: Option<&Value>, now: &str) -> Value {
    let (status, reason, message) = match &review.verdict {
        Verdict::Accepted => (
            "True",
            "Accepted",
            "mirrored into the tier's policy".to_string(),
        ),
        Verdict::Invalid { field, reason } => ("False", "Invalid", format!("{field}: {reason}")),
    };
    let since = previous
        .filter(|p| p.get("status").and_then(Value::as_str) == Some(status))
        .and_then(|p| p.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| Value::String(now.to_owned()));
    let mut c = json!({
        "type": "Accepted",
        "status": status,
        "reason": reason,
        // The API server caps messages at 32 KiB.
        "message": truncate(&message, 32 * 1024),
        "lastTransitionTime": since,
    });
    if let Some(g) = review.generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn find_accepted(conditions: Option<&Value>) -> Option<&Value> {
    conditions?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Accepted"))
}

fn set_accepted(conditions: &mut Vec<Value>, c: Value) -> bool {
    match conditions
        .iter_mut()
        .find(|x| x.get("type").and_then(Value::as_str) == Some("Accepted"))
    {
        Some(old) if *old == c => false,
        Some(old) => {
            *old = c;
            true
        }
        None => {
            conditions.push(c);
            true
        }
    }
}

/// The array under `key` of a JSON object, created (or replaced, when it holds something
/// else) empty; `None` when `v` is not an object.
fn array_at<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Vec<Value>> {
    let slot = v.as_object_mut()?.entry(key).or_insert_with(|| json!([]));
    if !slot.is_array() {
        *slot = json!([]);
    }
    slot.as_array_mut()
}

/// The object's new `status`, or `None` when it already says this. `tier` names the
/// tier's parent entry on an InferencePool (its Service name).
pub fn updated_status(
    review: &Review,
    status: Option<&Value>,
    tier: &str,
    now: &str,
) -> Option<Value> {
    let mut status = status.cloned().unwrap_or_else(|| json!({}));
    if !status.is_object() {
        status = json!({});
    }
    let changed = if review.kind == "InferencePool" {
        let parents = array_at(&mut status, "parents")?;
        let ours = |p: &Value| {
            let r = p.get("parentRef");
            r.and_then(|r| r.get("group")).and_then(Value::as_str) == Some(PARENT_GROUP)
                && r.and_then(|r| r.get("kind")).and_then(Value::as_str) == Some(PARENT_KIND)
                && r.and_then(|r| r.get("name")).and_then(Value::as_str) == Some(tier)
        };
        match parents.iter_mut().find(|p| ours(p)) {
            Some(entry) => {
                let c = accepted_condition(review, find_accepted(entry.get("conditions")), now);
                set_accepted(array_at(entry, "conditions")?, c)
            }
            None => {
                parents.push(json!({
                    "parentRef": {"group": PARENT_GROUP, "kind": PARENT_KIND, "name": tier},
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [accepted_condition(review, None, now)],
                }));
                true
            }
        }
    } else {
        let c = accepted_condition(review, find_accepted(status.get("conditions")), now);
        set_accepted(array_at(&mut status, "conditions")?, c)
    };
    changed.then_some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(kind: &str, verdict: Verdict) -> Review {
        Review {
            api_version: "llm-d.ai/v1alpha2".into(),
            kind: kind.into(),
            namespace: "ns".into(),
            name: "chat".into(),
            generation: Some(4),
            verdict,
        }
    }

    #[test]
    fn objective_condition_names_the_field_and_keeps_its_transition_time() {
        let bad = review(
            "InferenceObjective",
            Verdict::Invalid {
                field: "spec.priorty".into(),
                reason: "unknown field".into(),
            },
        );
        let s = updated_status(&bad, None, "infermesh", "2026-01-01T00:00:00Z").unwrap();
        let c = &s["conditions"][0];
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "Invalid");
        assert!(c["message"].as_str().unwrap().starts_with("spec.priorty"));
        assert_eq!(c["observedGeneration"], 4);
        // Same verdict later: nothing to write.
        assert!(updated_status(&bad, Some(&s), "infermesh", "2026-01-02T00:00:00Z").is_none());
        // Fixed: status flips, the transition time moves.
        let good = review("InferenceObjective", Verdict::Accepted);
        let s2 = updated_status(&good, Some(&s), "infermesh", "2026-01-03T00:00:00Z").unwrap();
        assert_eq!(s2["conditions"][0]["status"], "True");
        assert_eq!(
            s2["conditions"][0]["lastTransitionTime"],
            "2026-01-03T00:00:00Z"
        );
        assert_eq!(s2["conditions"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn pool_status_touches_only_the_tiers_parent_entry() {
        let gateway = json!({"parents": [{
            "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"},
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                            "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        }]});
        let r = review("InferencePool", Verdict::Accepted);
        let s = updated_status(&r, Some(&gateway), "infermesh", "2026-01-01T00:00:00Z").unwrap();
        let parents = s["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0], gateway["parents"][0]);
        assert_eq!(parents[1]["parentRef"]["kind"], PARENT_KIND);
        assert!(updated_status(&r, Some(&s), "infermesh", "2026-01-05T00:00:00Z").is_none());
    }
}
