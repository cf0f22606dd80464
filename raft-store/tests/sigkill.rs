//! Crash durability with a real SIGKILL: this program re-runs itself as a child process
//! that writes policy to a single-node store and prints each acknowledged write; the
//! parent SIGKILLs it mid-stream, reopens the redb file and checks that every acknowledged
//! write is there. Three rounds on the same file. (A custom test harness: the child role
//! is selected by an environment variable.)

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use infermesh_raft_store::policy::accept_any_epp_config;
use infermesh_raft_store::testing::mem_node;
use infermesh_raft_store::{MemNetwork, PolicyStore, Route, StoreConfig};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "RAFT_SIGKILL_CHILD_FILE";
const ROUNDS: u64 = 3;
const CHILD_MAX_WRITES: u64 = 5_000;
const CHILD_MAX_TIME: Duration = Duration::from_secs(60);

fn objective_yaml(name: &str, priority: u64) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata: {{name: {name}}}\nspec:\n  priority: {priority}\n  poolRef: {{name: pool}}\n"
    )
}

async fn open(file: &Path) -> Result<PolicyStore> {
    let net = MemNetwork::new(0);
    let store = PolicyStore::open(
        StoreConfig::new(1, file),
        net.transport(1),
        accept_any_epp_config(),
    )
    .await?;
    net.register(store.clone());
    if !store.is_initialized().await? {
        store.bootstrap([(1, mem_node(1))].into(), &[]).await?;
    }
    store
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .state(openraft::ServerState::Leader, "leader")
        .await?;
    Ok(store)
}

/// Child: write until killed (bounded), printing `ACK <n> <index>` after each commit.
async fn child(file: PathBuf) -> Result<()> {
    let store = open(&file).await?;
    let start = store.policy().objectives().count() as u64;
    let started = Instant::now();
    for n in start..start + CHILD_MAX_WRITES {
        if started.elapsed() > CHILD_MAX_TIME {
            break;
        }
        let a = store
            .apply_yaml(&objective_yaml(&format!("c{n}"), n), Route::Local)
            .await?;
        println!("ACK {n} {}", a.index);
    }
    Ok(())
}

/// Parent, part 1: spawn the child, read acks, SIGKILL it after `kill_after` of them.
fn run_and_kill(file: &Path, kill_after: usize) -> Result<Vec<(u64, u64)>> {
    let mut proc = Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = proc.stdout.take().context("child stdout")?;
    let parse = |line: String| -> Result<(u64, u64)> {
        let mut f = line.split_whitespace().skip(1);
        Ok((
            f.next().context("n")?.parse()?,
            f.next().context("index")?.parse()?,
        ))
    };
    let mut acked = Vec::new();
    let mut lines = BufReader::new(stdout).lines();
    while acked.len() < kill_after {
        let Some(line) = lines.next() else { break };
        acked.push(parse(line?)?);
    }
    proc.kill()?; // SIGKILL
    // Acks already written to the pipe before the kill count as acknowledged too.
    for line in lines {
        acked.push(parse(line?)?);
    }
    proc.wait()?;
    ensure!(
        !acked.is_empty(),
        "child acknowledged nothing before it was killed"
    );
    Ok(acked)
}

/// Parent, part 2: reopen the file and check every acknowledged write.
async fn verify(file: &Path, acked: &[(u64, u64)]) -> Result<u64> {
    let store = open(file).await?;
    let last = acked.iter().map(|(_, i)| *i).max().unwrap_or(0);
    store
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .applied_index_at_least(Some(last), "re-applied")
        .await?;
    let p = store.policy();
    for (n, index) in acked {
        match p.objective("default", &format!("c{n}")) {
            Some(o) if o.spec.effective_priority() == *n as i32 => {}
            other => bail!("acknowledged write c{n} (index {index}) lost after SIGKILL: {other:?}"),
        }
    }
    Ok(last)
}

fn round(file: &Path, kill_after: usize) -> Result<(usize, u64)> {
    let acked = run_and_kill(file, kill_after)?;
    // A runtime per verification: dropping it drops every task, closing the redb file
    // before the next child opens it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let last = rt.block_on(verify(file, &acked))?;
    drop(rt);
    Ok((acked.len(), last))
}

fn main() -> Result<()> {
    if let Some(file) = std::env::var_os(CHILD_ENV) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        return rt.block_on(child(PathBuf::from(file)));
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("node.redb");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x51_61_c1);
    let mut failed = 0;
    for r in 0..ROUNDS {
        let kill_after = rng.random_range(10..60);
        match round(&file, kill_after) {
            Ok((acks, last)) => {
                println!("round {r}: killed after {acks} acks (last index {last}); all present")
            }
            Err(e) => {
                println!("round {r}: FAILED: {e:#}");
                failed += 1;
            }
        }
    }
    println!("{} passed, {failed} failed", ROUNDS - failed);
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
