//! A throwaway Redis Cluster of several masters on loopback, for scale-out tests.
//!
//! Each node is a [`RedisServer`] (own temp dir, own `nodes.conf`, killed on drop) started
//! with `--cluster-enabled yes`; `redis-cli --cluster create` joins them and spreads the
//! 16384 slots, and [`RedisCluster::start`] returns once every node reports
//! `cluster_state:ok`. `redis-cli` comes with `redis-server` on Debian (`redis-tools`);
//! `REDIS_CLI_BIN` overrides which binary is used.
//!
//! [`RedisCluster::start_tls`] makes the same cluster speak TLS to clients and on the
//! cluster bus (`--tls-cluster yes`); Redis answers `CLUSTER SLOTS` and redirects with the
//! port of the connection's kind, so clients on `rediss://` are sent to TLS ports. Each node
//! keeps a plaintext loopback port for the kit's own checks.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis_server::{RedisServer, RedisTls};

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

/// What a cluster node is started with, beyond its endpoint.
fn cluster_args() -> Vec<String> {
    [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "5000",
    ]
    .map(str::to_owned)
    .to_vec()
}

impl RedisCluster {
    /// Starts `masters` nodes (at least 3: `redis-cli --cluster create` refuses fewer),
    /// joins them and waits until every node says `cluster_state:ok`. Blocking (seconds):
    /// call it from `spawn_blocking` in async tests.
    pub fn start(masters: usize) -> std::io::Result<Self> {
        let nodes = (0..masters)
            .map(|_| RedisServer::tcp_with_args(cluster_args()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Self::join(Self { nodes }, &[])
    }

    /// [`RedisCluster::start`] with TLS for clients and on the cluster bus, with `tls`'s
    /// files on every node. On the bus each node presents its certificate as a client one
    /// too, so it must allow both (`pki::Usage::Peer`), or the nodes never meet.
    pub fn start_tls(masters: usize, tls: &RedisTls) -> std::io::Result<Self> {
        let nodes = (0..masters)
            .map(|_| {
                let mut args = cluster_args();
                args.extend(["--tls-cluster".to_owned(), "yes".to_owned()]);
                RedisServer::tls_with_args(tls, args)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let [ca, cert, key] = [&tls.client_ca, &tls.cert, &tls.key].map(|p| p.to_string_lossy());
        // The nodes' own certificate also serves redis-cli when clients must present one.
        let cli_tls = ["--tls", "--cacert", &ca, "--cert", &cert, "--key", &key];
        Self::join(Self { nodes }, &cli_tls)
    }

    /// `redis-cli --cluster create` over the client ports, then waits for `cluster_state:ok`.
    fn join(cluster: Self, cli_tls: &[&str]) -> std::io::Result<Self> {
        let mut create = Command::new(redis_cli_bin());
        create.args(cli_tls).arg("--cluster").arg("create");
        for port in cluster.ports() {
            create.arg(format!("127.0.0.1:{port}"));
        }
        create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // redis-cli waits for the nodes to join without a limit of its own: a bus that
        // cannot connect would hang the test (and tokio's blocking pool with it).
        let out = output_within(create, CONVERGE).map_err(|e| {
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

    /// The nodes' plaintext loopback ports (the client ports of a plaintext cluster).
    fn admin_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter_map(RedisServer::admin_port)
            .collect()
    }

    /// Every node's URL (`redis://127.0.0.1:port`, `rediss://` for a TLS cluster).
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
            .admin_ports()
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
                    // Asked over plaintext, Redis names plaintext ports: give the client one.
                    let node = self.admin_ports().iter().position(|&p| p == port);
                    return node
                        .map(|n| self.ports()[n])
                        .ok_or_else(|| std::io::Error::other(format!("unknown node {port}")));
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
            for port in self.admin_ports() {
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

/// `cmd`'s output, or an error once `limit` has passed (the child is killed).
fn output_within(mut cmd: Command, limit: Duration) -> std::io::Result<std::process::Output> {
    let mut child = cmd.spawn()?;
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            return Err(std::io::Error::other(format!(
                "{cmd:?} still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output()
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
