//! Where the suite's processes live: hosts on loopback addresses, or hosts as network
//! namespaces joined by a bridge, and the network faults nftables can inject between them.
//!
//! In namespace mode every host is a namespace `<prefix>-<host>` with one veth into a
//! bridge that lives in a hub namespace `<prefix>-hub`, so nothing is added to the
//! machine's own network; the driver itself moves into the `client` host's namespace.
//! Faults are nftables rules in the victim's namespace (drops, never rejects, so a
//! partition looks like a blackhole, not like a closed port). The kernel here has no
//! `netem`, so delay is injected by [`crate::relay`] in userspace instead.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

/// How hosts are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Every host an address on loopback: process faults only.
    Loopback,
    /// Every host its own network namespace: process and network faults.
    Netns,
}

/// One place processes run.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name (`n1`, `envoy`, `pod0`, …).
    pub name: String,
    /// Its address.
    pub ip: IpAddr,
    /// Its namespace, in namespace mode.
    pub netns: Option<String>,
}

impl Host {
    /// A command for `program` that runs on this host.
    pub fn command(&self, program: &Path) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

/// Which packets a fault drops, seen from the victim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Both ways.
    Both,
    /// Only packets arriving at the victim (it still sends).
    Inbound,
}

/// The hosts of one run, and the namespaces it created (removed on drop).
#[derive(Debug)]
pub struct Network {
    /// Isolation mode.
    pub mode: Mode,
    hosts: Vec<Host>,
    created: Vec<String>,
}

/// Runs a command to completion, naming it in the error.
fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

impl Network {
    /// Hosts on loopback: host `i` is `127.<run>.<run>.<10+i>`, so fixed ports never
    /// collide with other runs or with services on 127.0.0.1.
    pub fn loopback(names: &[&str], run_id: u16) -> Network {
        let [a, b] = run_id.to_be_bytes();
        let hosts = names
            .iter()
            .enumerate()
            .map(|(i, n)| Host {
                name: (*n).to_owned(),
                ip: IpAddr::V4(Ipv4Addr::new(127, a.max(1), b, 10 + i as u8)),
                netns: None,
            })
            .collect();
        Network {
            mode: Mode::Loopback,
            hosts,
            created: Vec::new(),
        }
    }

    /// Creates one namespace per host on a bridge (10.<run>.<run>.0/24) and moves this
    /// process's main thread into the `client` host's namespace. Call before starting any
    /// thread: threads started later inherit it.
    pub fn netns(names: &[&str], run_id: u16) -> Result<Network> {
        ensure!(
            names.contains(&"client"),
            "namespace mode needs a host named client for the driver"
        );
        let prefix = format!("imc{run_id:04x}");
        let [a, b] = run_id.to_be_bytes();
        let mut net = Network {
            mode: Mode::Netns,
            hosts: Vec::new(),
            created: Vec::new(),
        };
        let hub = format!("{prefix}-hub");
        ip(&["netns", "add", &hub]).context("creating a network namespace (needs root)")?;
        net.created.push(hub.clone());
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{prefix}-{name}");
            ip(&["netns", "add", &ns])?;
            net.created.push(ns.clone());
            let port = format!("v{i}");
            ip(&[
                "link", "add", &port, "netns", &hub, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            let addr = Ipv4Addr::new(10, a.max(1), b, 10 + i as u8);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            net.hosts.push(Host {
                name: (*name).to_owned(),
                ip: IpAddr::V4(addr),
                netns: Some(ns),
            });
        }
        let client = net.host("client").netns.clone().expect("namespace mode");
        let fd = File::open(Path::new("/run/netns").join(&client))
            .with_context(|| format!("opening namespace {client}"))?;
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering namespace {client}"))?;
        Ok(net)
    }

    /// The host called `name` (panics on a name the suite never created: a bug).
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Every host.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    fn nft(&self, victim: &Host, script: &str) -> Result<()> {
        let Some(ns) = &victim.netns else {
            bail!("network faults need namespace mode (--mode netns)");
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("running nft (install nftables)")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("nft stdin")?;
            stdin.write_all(script.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "nft in {ns} failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Drops packets between `victim` and `peers` (a partition or, with every other host,
    /// a blackhole).
    pub fn block(&self, victim: &str, peers: &[IpAddr], dir: Direction) -> Result<()> {
        let v = self.host(victim);
        let set = addr_set(peers);
        let mut rules = format!(
            "table inet chaos {{\n chain in {{ type filter hook input priority 0; ip saddr {set} drop; }}\n"
        );
        if dir == Direction::Both {
            rules.push_str(&format!(
                " chain out {{ type filter hook output priority 0; ip daddr {set} drop; }}\n"
            ));
        }
        rules.push_str("}\n");
        self.nft(v, &rules)
    }

    /// Drops `percent` of the packets `victim` sends and receives, at random.
    pub fn loss(&self, victim: &str, percent: u32) -> Result<()> {
        ensure!(percent <= 100, "loss percent {percent} above 100");
        let v = self.host(victim);
        let rule = format!("meta iifname eth0 numgen random mod 100 < {percent} drop;");
        let out = format!("meta oifname eth0 numgen random mod 100 < {percent} drop;");
        self.nft(
            v,
            &format!(
                "table inet chaos {{\n chain in {{ type filter hook input priority 0; {rule} }}\n chain out {{ type filter hook output priority 0; {out} }}\n}}\n"
            ),
        )
    }

    /// Removes every fault rule from `victim`.
    pub fn heal(&self, victim: &str) -> Result<()> {
        let v = self.host(victim);
        if v.netns.is_none() {
            return Ok(());
        }
        // Deleting a table that is not there is an error; add-then-delete is idempotent.
        self.nft(v, "table inet chaos {}\ndelete table inet chaos\n")
    }
}

fn addr_set(peers: &[IpAddr]) -> String {
    let v: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
    format!("{{ {} }}", v.join(", "))
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
