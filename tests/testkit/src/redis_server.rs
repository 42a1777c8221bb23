//! A throwaway `redis-server` for tests and benchmarks.
//!
//! Each [`RedisServer`] runs in its own temporary directory, with persistence off unless
//! asked for, and is killed when dropped (through its child handle, never `pkill`). Shapes:
//! - [`RedisServer::unix`]: listens only on a unix socket (no port to race for);
//! - [`RedisServer::tcp`]: listens on a loopback port, which can be stopped and restarted
//!   on the same port ([`RedisServer::stop`] / [`RedisServer::restart`]) to test outages;
//! - [`RedisServer::tcp_aof`]: the same with the append-only file on, as deployed: a
//!   restart in the same directory ([`RedisServer::shutdown`] or [`RedisServer::stop`],
//!   then [`RedisServer::restart`]) loads what the file holds.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a test reaches the server.
#[derive(Debug, Clone)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(u16),
    /// A TLS port for the system under test, and a plaintext one (loopback only) for the
    /// kit's readiness check and for admin commands such as a certificate swap.
    Tls {
        plain: u16,
        tls: u16,
    },
}

/// TLS files of a [`RedisServer::tls`] server.
#[derive(Debug, Clone)]
pub struct RedisTls {
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server key (PEM).
    pub key: PathBuf,
    /// CA that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Whether clients must present a certificate.
    pub require_client_cert: bool,
}

/// A running `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    dir: PathBuf,
    endpoint: Endpoint,
    extra_args: Vec<String>,
    child: Option<Child>,
}

/// The `redis-server` binary: `REDIS_SERVER_BIN`, else the one on `PATH`.
pub fn redis_server_bin() -> String {
    std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned())
}

/// A fresh temporary directory under the system temp dir.
pub fn temp_dir(prefix: &str) -> std::io::Result<PathBuf> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl RedisServer {
    /// Starts a server listening only on a unix socket in a temp dir.
    pub fn unix() -> std::io::Result<Self> {
        let dir = temp_dir("cb-redis")?;
        let sock = dir.join("redis.sock");
        Self::start(dir, Endpoint::Unix(sock), Vec::new())
    }

    /// Starts a server on a free loopback TCP port.
    pub fn tcp() -> std::io::Result<Self> {
        Self::tcp_with_args(Vec::new())
    }

    /// Starts a server on a free loopback TCP port with extra `redis-server` arguments
    /// (e.g. `--cluster-enabled yes`).
    pub fn tcp_with_args(extra_args: Vec<String>) -> std::io::Result<Self> {
        let dir = temp_dir("cb-redis")?;
        let port = free_port()?;
        Self::start(dir, Endpoint::Tcp(port), extra_args)
    }

    /// Starts a server on a free loopback TCP port with the append-only file on and
    /// `appendfsync` set to `fsync` (`everysec`, `always`, `no`), like the deployed one.
    pub fn tcp_aof(fsync: &str) -> std::io::Result<Self> {
        Self::tcp_with_args(
            ["--appendonly", "yes", "--appendfsync", fsync]
                .map(str::to_owned)
                .into(),
        )
    }

    /// Starts a server whose clients speak TLS on [`RedisServer::url`] (`rediss://`), with
    /// the Debian build's own TLS support (built against OpenSSL; the system under test
    /// uses rustls).
    pub fn tls(tls: &RedisTls) -> std::io::Result<Self> {
        Self::tls_with_args(tls, Vec::new())
    }

    /// [`RedisServer::tls`] with extra `redis-server` arguments (cluster mode, say).
    pub fn tls_with_args(tls: &RedisTls, extra_args: Vec<String>) -> std::io::Result<Self> {
        let dir = temp_dir("cb-redis-tls")?;
        let endpoint = Endpoint::Tls {
            plain: free_port()?,
            tls: free_port()?,
        };
        let auth = if tls.require_client_cert { "yes" } else { "no" };
        let args = [
            "--tls-cert-file",
            &tls.cert.to_string_lossy(),
            "--tls-key-file",
            &tls.key.to_string_lossy(),
            "--tls-ca-cert-file",
            &tls.client_ca.to_string_lossy(),
            "--tls-auth-clients",
            auth,
        ]
        .map(str::to_owned)
        .into_iter()
        .chain(extra_args)
        .collect();
        Self::start(dir, endpoint, args)
    }

    /// Runs one command on the plaintext admin port (TLS servers and TCP servers), e.g.
    /// `CONFIG SET tls-cert-file …`; returns the first line of the answer.
    pub fn admin(&self, args: &[&str]) -> std::io::Result<String> {
        use std::io::{BufRead, Write};
        let port = match self.endpoint {
            Endpoint::Tcp(p) | Endpoint::Tls { plain: p, .. } => p,
            Endpoint::Unix(_) => return Err(std::io::Error::other("no TCP admin port")),
        };
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream.write_all(cmd.as_bytes())?;
        let mut line = String::new();
        std::io::BufReader::new(stream).read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    }

    /// `INFO section` on the plaintext admin port: the whole answer (`field:value` lines).
    pub fn info(&self, section: &str) -> std::io::Result<String> {
        use std::io::{BufRead, Read, Write};
        let port = self
            .admin_port()
            .ok_or_else(|| std::io::Error::other("no TCP admin port"))?;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let cmd = format!("*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len());
        stream.write_all(cmd.as_bytes())?;
        let mut reader = std::io::BufReader::new(stream);
        let mut head = String::new();
        reader.read_line(&mut head)?;
        let len: usize = head
            .trim_end()
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("unexpected INFO answer {head:?}")))?;
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        String::from_utf8(body).map_err(std::io::Error::other)
    }

    fn start(dir: PathBuf, endpoint: Endpoint, extra_args: Vec<String>) -> std::io::Result<Self> {
        let mut server = Self {
            dir,
            endpoint,
            extra_args,
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let mut cmd = Command::new(redis_server_bin());
        cmd.current_dir(&self.dir)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match &self.endpoint {
            Endpoint::Unix(sock) => {
                cmd.args(["--port", "0", "--unixsocket", &sock.to_string_lossy()]);
                cmd.args(["--unixsocketperm", "700"]);
            }
            Endpoint::Tcp(port) => {
                cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
            }
            Endpoint::Tls { plain, tls } => {
                cmd.args(["--port", &plain.to_string(), "--bind", "127.0.0.1"]);
                cmd.args(["--tls-port", &tls.to_string()]);
            }
        }
        cmd.args(&self.extra_args);
        let child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot start {} ({e}); install it (apt-get install redis-server) \
                     or set REDIS_SERVER_BIN",
                    redis_server_bin()
                ),
            )
        })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(10))
    }

    fn wait_ready(&mut self, limit: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(std::io::Error::other(format!(
                    "redis-server exited early: {status}"
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("redis-server did not become ready"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        fn exchange(mut s: impl Read + Write) -> bool {
            let mut buf = [0u8; 16];
            s.write_all(b"PING\r\n").is_ok()
                && s.read(&mut buf)
                    .map(|n| buf[..n].starts_with(b"+PONG"))
                    .unwrap_or(false)
        }
        match &self.endpoint {
            Endpoint::Unix(sock) => std::os::unix::net::UnixStream::connect(sock)
                .map(exchange)
                .unwrap_or(false),
            Endpoint::Tcp(port) | Endpoint::Tls { plain: port, .. } => {
                std::net::TcpStream::connect(("127.0.0.1", *port))
                    .map(exchange)
                    .unwrap_or(false)
            }
        }
    }

    /// The URL to give `REDIS_URL` (`redis+unix://…` or `redis://127.0.0.1:port`).
    pub fn url(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(sock) => format!("redis+unix://{}", sock.display()),
            Endpoint::Tcp(port) => format!("redis://127.0.0.1:{port}"),
            Endpoint::Tls { tls, .. } => format!("rediss://127.0.0.1:{tls}"),
        }
    }

    /// The TCP port, for TCP servers (the TLS one for TLS servers).
    pub fn port(&self) -> Option<u16> {
        match self.endpoint {
            Endpoint::Tcp(port) | Endpoint::Tls { tls: port, .. } => Some(port),
            Endpoint::Unix(_) => None,
        }
    }

    /// The plaintext loopback port of a TLS or TCP server (for redis-cli and the like).
    pub fn admin_port(&self) -> Option<u16> {
        match self.endpoint {
            Endpoint::Tcp(p) | Endpoint::Tls { plain: p, .. } => Some(p),
            Endpoint::Unix(_) => None,
        }
    }

    /// The append-only file Redis is appending to now (Redis 7: the newest
    /// `appendonlydir/*.incr.aof`), if there is one.
    pub fn aof_file(&self) -> Option<PathBuf> {
        let dir = self.dir.join("appendonlydir");
        let seq = |p: &Path| -> Option<u64> {
            let name = p.file_name()?.to_str()?.strip_suffix(".incr.aof")?;
            name.rsplit('.').next()?.parse().ok()
        };
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| Some((seq(&p)?, p)))
            .max_by_key(|(n, _)| *n)
            .map(|(_, p)| p)
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server (SIGKILL: an outage, a crash). [`restart`](Self::restart) brings it
    /// up on the same endpoint: empty, or with an append-only file, with what that file had
    /// reached the disk.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as an orchestrator stops it: Redis fsyncs its append-only file and exits.
    /// Waits (≤ `limit`) for the exit; past it the server is killed and this is an error.
    pub fn shutdown(&mut self, limit: Duration) -> std::io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + limit;
        while status.success() && Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(std::io::Error::other(format!(
            "redis-server did not exit on SIGTERM within {limit:?} (kill: {status})"
        )))
    }

    /// Starts the server again on the same endpoint.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        if let Endpoint::Unix(sock) = &self.endpoint {
            let _ = std::fs::remove_file(sock);
        }
        self.spawn()
    }

    /// Whether the child is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_server_answers_ping_and_stops_on_drop() {
        let server = RedisServer::unix().expect("redis-server starts");
        assert!(server.url().starts_with("redis+unix://"));
        assert!(server.ping());
        let dir = server.dir().to_owned();
        drop(server);
        assert!(!dir.exists());
    }

    #[test]
    fn an_aof_server_keeps_its_data_across_a_sigterm_restart() {
        let mut server = RedisServer::tcp_aof("always").expect("redis-server starts");
        assert_eq!(server.admin(&["SET", "k", "v"]).expect("set"), "+OK");
        server.shutdown(Duration::from_secs(10)).expect("exits");
        server.restart().expect("restarts");
        assert_eq!(server.admin(&["EXISTS", "k"]).expect("exists"), ":1");
    }

    #[test]
    fn tcp_server_restarts_on_same_port() {
        let mut server = RedisServer::tcp().expect("redis-server starts");
        let port = server.port().expect("tcp");
        server.stop();
        assert!(!server.ping());
        server.restart().expect("restarts");
        assert_eq!(server.port(), Some(port));
        assert!(server.ping());
    }
}
