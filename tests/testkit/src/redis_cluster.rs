//! A throwaway Redis Cluster of several masters on loopback, for scale-out tests.
//!
//! Each node is a [`RedisServer`] (own temp dir, own `nodes.conf`, killed on drop) started
//! with `--cluster-enabled yes`; `redis-cli --cluster create` joins them and spreads the
//! 16384 slots, and [`RedisCluster::start`] returns once every node reports
//! `cluster_state:ok`. `redis-cli` comes with `redis-server` on Debian (`redis-tools`);
//! `REDIS_CLI_BIN` overrides which binary is used.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis_server::RedisServer;

/// How long the nodes may take to agree on the slot map.
const CONVERGE: Duration = Duration::from_secs(30);

/// The `redis-cli` binary: `REDIS_CLI_BIN`, else the one on `PATH`.
pub fn redis_cli_bin() -> String {
    std::env::var("REDIS_CLI_BIN").unwrap_or_else(|_| "redis-cli".to_owned())
}

/// A running cluster of masters (no replicas); dropping it kills every node.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` nodes (at least 3: `redis-cli --cluster create` refuses fewer),
    /// joins them and waits until every node says `cluster_state:ok`. Blocking (seconds):
    /// call it from `spawn_blocking` in async tests.
    pub fn start(masters: usize) -> std::io::Result<Self> {
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            nodes.push(RedisServer::tcp_with_args(vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                "nodes.conf".into(),
                "--cluster-node-timeout".into(),
                "5000".into(),
            ])?);
        }
        let cluster = Self { nodes };
        let mut create = Command::new(redis_cli_bin());
        create.arg("--cluster").arg("create");
        for port in cluster.ports() {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot run {} ({e}); install redis-tools or set REDIS_CLI_BIN",
                        redis_cli_bin()
                    ),
                )
            })?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "redis-cli --cluster create failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        cluster.wait_ok(CONVERGE)?;
        Ok(cluster)
    }

    /// The nodes' loopback ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().filter_map(RedisServer::port).collect()
    }

    /// Every node's URL (`redis://127.0.0.1:port`).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The seed list for `REDIS_CLUSTER_NODES` (comma-separated URLs).
    pub fn seeds(&self) -> String {
        self.urls().join(",")
    }

    /// `CLUSTER INFO` of the node on `port`, as text.
    pub fn cluster_info(port: u16) -> std::io::Result<String> {
        cli(port, &["cluster", "info"])
    }

    /// The port of the master that owns `key`'s slot (from `CLUSTER KEYSLOT` and
    /// `CLUSTER NODES` of the first node). Tests use it to place channels and keys on a
    /// chosen node.
    pub fn owner_of(&self, key: &str) -> std::io::Result<u16> {
        let first = self
            .ports()
            .first()
            .copied()
            .ok_or_else(|| std::io::Error::other("cluster has no node"))?;
        let slot: u16 = cli(first, &["cluster", "keyslot", key])?
            .trim()
            .parse()
            .map_err(|e| std::io::Error::other(format!("CLUSTER KEYSLOT {key}: {e}")))?;
        let nodes = cli(first, &["cluster", "nodes"])?;
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(port) = fields
                .get(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            // Slot ranges ("0-5460") or single slots follow the 8 fixed fields;
            // "[…]" entries are migrations in progress.
            for range in fields.iter().skip(8).filter(|r| !r.starts_with('[')) {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>())
                    && (lo..=hi).contains(&slot)
                {
                    return Ok(port);
                }
            }
        }
        Err(std::io::Error::other(format!(
            "no node owns slot {slot} of {key}: {nodes}"
        )))
    }

    /// Waits until every node reports `cluster_state:ok` and the full slot count.
    pub fn wait_ok(&self, limit: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let mut last = String::new();
            let mut ok = true;
            for port in self.ports() {
                let info = Self::cluster_info(port)?;
                if !(info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_assigned:16384"))
                {
                    ok = false;
                    last = format!("node {port}: {info}");
                    break;
                }
            }
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "cluster not ok after {limit:?}; last: {last}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs `redis-cli -p port args…` against a loopback node; its stdout.
fn cli(port: u16, args: &[&str]) -> std::io::Result<String> {
    let out = Command::new(redis_cli_bin())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "redis-cli {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_masters_share_every_slot() {
        let cluster = RedisCluster::start(3).expect("cluster starts");
        assert_eq!(cluster.ports().len(), 3);
        for port in cluster.ports() {
            let info = RedisCluster::cluster_info(port).expect("cluster info");
            assert!(info.contains("cluster_known_nodes:3"), "{info}");
            assert!(info.contains("cluster_size:3"), "{info}");
        }
        assert_eq!(cluster.seeds().split(',').count(), 3);
        // `--cluster create` gives each master a contiguous third, in the order given.
        let ports = cluster.ports();
        assert_eq!(cluster.owner_of("{a}").expect("owner"), ports[2]); // slot 15495
        assert_eq!(cluster.owner_of("{b}").expect("owner"), ports[0]); // slot 3300
        assert_eq!(cluster.owner_of("{c}").expect("owner"), ports[1]); // slot 7365
    }
}
