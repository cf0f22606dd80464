//! Raft and xDS gauges (`infermesh_raft_*`, `infermesh_xds_*`), rendered from the policy
//! store's and the xDS server's own status at scrape time, so the dashboard can show who
//! leads, how far each node has applied, and whether every Envoy took the last push.

use std::fmt::Write as _;

use infermesh_raft_store::{ClusterStatus, Role};
use infermesh_xds::SyncStatus;

/// Appends the Raft gauges of `s`.
pub fn render_raft(s: &ClusterStatus, out: &mut String) {
    let role = s.role.as_str();
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP infermesh_raft_{name} {help}.\n# TYPE infermesh_raft_{name} gauge\ninfermesh_raft_{name} {v}"
        );
    };
    gauge(out, "term", "Current Raft term", s.term);
    gauge(
        out,
        "is_leader",
        "1 when this node leads the policy cluster",
        u64::from(s.role == Role::Leader),
    );
    gauge(
        out,
        "has_leader",
        "1 when this node knows a leader",
        u64::from(s.leader.is_some()),
    );
    gauge(
        out,
        "committed_index",
        "Last committed log index known here",
        s.committed_index,
    );
    gauge(
        out,
        "applied_index",
        "Last log index applied to the policy state",
        s.applied_index.unwrap_or(0),
    );
    gauge(
        out,
        "last_log_index",
        "Last log index in this node's log",
        s.last_log_index.unwrap_or(0),
    );
    let voters = s.members.iter().filter(|m| m.voter).count();
    let _ = writeln!(
        out,
        "# HELP infermesh_raft_members Policy cluster members by kind.\n# TYPE infermesh_raft_members gauge\ninfermesh_raft_members{{kind=\"voter\"}} {voters}\ninfermesh_raft_members{{kind=\"learner\"}} {}",
        s.members.len() - voters
    );
    let _ = writeln!(
        out,
        "# HELP infermesh_raft_role This node's Raft role (1 for the current one).\n# TYPE infermesh_raft_role gauge"
    );
    for r in ["leader", "follower", "candidate", "learner", "shutdown"] {
        let _ = writeln!(
            out,
            "infermesh_raft_role{{role=\"{r}\"}} {}",
            u64::from(r == role)
        );
    }
}

/// Appends the xDS gauges of `s`: Envoys connected, and per state how many are in it
/// (`synced`: every subscribed type acknowledged the version last sent; `pending`: a push
/// is not acknowledged yet; `nacked`: the last push of some type was rejected).
pub fn render_xds(s: &SyncStatus, out: &mut String) {
    let (mut connected, mut streams) = (0u64, 0u64);
    let (mut synced, mut pending, mut nacked, mut nacks) = (0u64, 0u64, 0u64, 0u64);
    for e in &s.envoys {
        if e.connected_streams == 0 {
            continue;
        }
        connected += 1;
        streams += e.connected_streams as u64;
        let subscribed = e.types.iter().filter(|t| t.subscribed);
        let mut state = "synced";
        for t in subscribed {
            nacks += t.nacks_total;
            if t.nack.is_some() {
                state = "nacked";
            } else if state == "synced"
                && t.last_sent.as_ref().map(|v| &v.version)
                    != t.last_acked.as_ref().map(|v| &v.version)
            {
                state = "pending";
            }
        }
        match state {
            "synced" => synced += 1,
            "pending" => pending += 1,
            _ => nacked += 1,
        }
    }
    let _ = writeln!(
        out,
        "# HELP infermesh_xds_connected_envoys Envoys with an open ADS stream to this node.\n# TYPE infermesh_xds_connected_envoys gauge\ninfermesh_xds_connected_envoys {connected}\n\
         # HELP infermesh_xds_streams Open ADS streams to this node.\n# TYPE infermesh_xds_streams gauge\ninfermesh_xds_streams {streams}\n\
         # HELP infermesh_xds_envoys Connected Envoys by sync state.\n# TYPE infermesh_xds_envoys gauge\n\
         infermesh_xds_envoys{{state=\"synced\"}} {synced}\ninfermesh_xds_envoys{{state=\"pending\"}} {pending}\ninfermesh_xds_envoys{{state=\"nacked\"}} {nacked}\n\
         # HELP infermesh_xds_nacks Rejections connected Envoys reported, summed over types.\n# TYPE infermesh_xds_nacks gauge\ninfermesh_xds_nacks {nacks}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_gauges() {
        let s = ClusterStatus {
            id: 1,
            role: Role::Leader,
            leader: Some(1),
            term: 4,
            last_log_index: Some(9),
            committed_index: 9,
            applied_index: Some(8),
            snapshot_index: None,
            purged_index: None,
            members: Vec::new(),
        };
        let mut out = String::new();
        render_raft(&s, &mut out);
        for line in [
            "infermesh_raft_term 4",
            "infermesh_raft_is_leader 1",
            "infermesh_raft_applied_index 8",
            "infermesh_raft_role{role=\"leader\"} 1",
            "infermesh_raft_role{role=\"follower\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line}\n{out}");
        }
        let mut xds = String::new();
        render_xds(
            &SyncStatus {
                versions: None,
                envoys: Vec::new(),
            },
            &mut xds,
        );
        assert!(xds.lines().any(|l| l == "infermesh_xds_connected_envoys 0"));
    }
}
