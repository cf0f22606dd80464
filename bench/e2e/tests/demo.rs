//! The README's first command, `infermesh-demo`, run as a process with small flags: both
//! runs complete, a node of the tier is killed mid-run, and the report shows what the
//! README promises (through Envoy when it is installed, else through the nodes' proxies).

use std::process::Command;
use std::time::{Duration, Instant};

const REQUESTS: usize = 100;

/// Cells of the first markdown table row whose first cell is `first`.
fn row<'a>(report: &'a str, first: &str) -> Vec<&'a str> {
    report
        .lines()
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row `{first}` in the report:\n{report}"))
}

fn percent(cell: &str) -> f64 {
    cell.strip_suffix('%')
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("`{cell}` is not a percentage"))
}

#[test]
fn demo_runs_both_legs_kills_a_node_and_reports_what_it_cost() {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_infermesh-demo"))
        .args(["--pods", "2", "--requests", &REQUESTS.to_string()])
        .args(["--duration", "10s", "--qps", "20", "--seed", "3"])
        .args(["--kill-node", "2", "--kill-at", "0.4"])
        .output()
        .expect("run infermesh-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "infermesh-demo failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    assert!(
        stdout.contains("infermesh demo: 2 simulated vLLM pods"),
        "{stdout}"
    );
    assert!(
        stderr.contains("run 1/2") && stderr.contains("run 2/2"),
        "{stderr}"
    );
    assert!(stderr.contains("n2 killed (SIGKILL)"), "{stderr}");

    // The comparison table: every request sent on both legs; round-robin, with no kill,
    // answers all of them.
    let sent = row(&stdout, "succeeded / sent");
    let all = format!("{REQUESTS} / {REQUESTS}");
    assert!(sent[1].ends_with(&format!("/ {REQUESTS}")), "{stdout}");
    assert_eq!(sent[2], all, "{stdout}");

    // The kill, and what it cost.
    let killed = row(&stdout, "node killed");
    assert!(killed[1].starts_with("n2 at "), "{stdout}");
    assert_eq!(killed[2], "none", "{stdout}");
    let count = |name: &str| -> usize {
        row(&stdout, name)[1]
            .parse()
            .unwrap_or_else(|_| panic!("`{name}` is not a count:\n{stdout}"))
    };
    let around = count("failed around the kill");
    let after = count("failed after the window");
    let _in_flight = count("requests in flight at the kill");
    let recover = row(&stdout, "time to recover")[1];
    let secs: f64 = recover
        .strip_suffix(" s")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("`{recover}` is not a time:\n{stdout}"));
    assert!(secs >= 0.0, "{stdout}");
    assert!(
        stdout.contains("Time to recover: from the kill"),
        "{stdout}"
    );

    // The full reports: one row per leg, same columns as the bench crate's table.
    let header = row(&stdout, "system");
    let col = |name: &str| header.iter().position(|c| *c == name).expect(name);
    let im = row(&stdout, "infermesh");
    let rr = row(&stdout, "round-robin");
    for r in [&im, &rr] {
        assert_eq!(r[col("sent")], REQUESTS.to_string(), "{stdout}");
    }
    assert_eq!(rr[col("ok")], REQUESTS.to_string(), "{stdout}");
    // Every infermesh failure is one the kill accounts for.
    let ok: usize = im[col("ok")].parse().expect("ok count");
    assert!(
        ok + around + after >= REQUESTS,
        "{ok} ok + {around} around + {after} after < {REQUESTS}:\n{stdout}"
    );
    let hit = percent(im[col("hit rate")]);
    assert!(hit > 0.0, "infermesh's fleet hit rate is {hit}%:\n{stdout}");
    let rr_hit = percent(rr[col("hit rate")]);
    assert!(
        hit > rr_hit,
        "infermesh {hit}% vs round-robin {rr_hit}%:\n{stdout}"
    );
    // The summary row repeats the same measurement.
    let summary = row(&stdout, "prefix-cache hit rate");
    assert_eq!(percent(summary[1]), hit, "{stdout}");
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "the small demo took {:?}",
        t0.elapsed()
    );
}
