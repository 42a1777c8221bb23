//! Spawns the REAL `callbridge-control` / `callbridge-relay` binaries as child processes.
//!
//! The binaries are found next to the running test executable (`…/target/debug/deps/x`
//! → `…/target/debug/callbridge-relay`), or in `CALLBRIDGE_BIN_DIR`. The test command
//! builds them (`cargo build --workspace --bins`) before running the tests.
//!
//! Each child gets a clean environment (only `PATH` plus what the test passes, so a
//! developer's shell settings cannot leak in), writes stdout and stderr to a log file that
//! is printed when the test panics, and is killed (SIGKILL) on drop. [`Proc::terminate`]
//! sends SIGTERM for drain tests.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::redis_server::{free_port, temp_dir};

/// Where the binaries are: `CALLBRIDGE_BIN_DIR`, else the target dir of this executable.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CALLBRIDGE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A running child process of ours.
#[derive(Debug)]
pub struct Proc {
    name: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// The address it listens on (given to it through its env).
    pub addr: SocketAddr,
    restarts: u32,
}

impl Proc {
    /// Starts `bin_name` from [`bin_dir`] with `env`; `addr` is where it will listen.
    pub fn spawn(
        bin_name: &str,
        env: Vec<(String, String)>,
        addr: SocketAddr,
    ) -> std::io::Result<Self> {
        let bin = bin_dir().join(bin_name);
        if !bin.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} not found; build it first (cargo build --workspace --bins) or set \
                     CALLBRIDGE_BIN_DIR",
                    bin.display()
                ),
            ));
        }
        let dir = temp_dir(&format!("cb-{bin_name}"))?;
        let mut p = Self {
            name: bin_name.to_owned(),
            bin,
            env,
            log: dir.join("output.log"),
            child: None,
            addr,
            restarts: 0,
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> std::io::Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (graceful shutdown); the process stays owned until it exits or is killed.
    pub fn terminate(&mut self) -> std::io::Result<()> {
        self.signal("TERM")
    }

    /// SIGSTOP: the process freezes with every socket open, like a node that hangs or
    /// drops off the network (peers see nothing close). [`kill`](Self::kill) still works.
    pub fn freeze(&mut self) -> std::io::Result<()> {
        self.signal("STOP")?;
        // kill(2) returns before every thread has stopped; a test that acts on a frozen
        // process right away must not race its last instructions.
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let stat = format!("/proc/{pid}/stat");
        for _ in 0..500 {
            let stopped = std::fs::read_to_string(&stat).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
            });
            if stopped {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Err(std::io::Error::other(format!("{} did not stop", self.name)))
    }

    /// SIGCONT: a [`freeze`](Self::freeze)d process runs on, and finds whatever its peers
    /// did meanwhile (closed sockets, streams refused).
    pub fn thaw(&mut self) -> std::io::Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> std::io::Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "kill -{name} {pid} failed: {status}"
            )))
        }
    }

    /// Waits up to `limit` for the process to exit (after [`terminate`](Self::terminate)).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills it and starts it again with the same environment (same address).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.restarts += 1;
        self.start()
    }

    /// Everything it printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `GET path` answers 200 (relay health), or fails with the log.
    pub async fn wait_http_ok(&mut self, path: &str, limit: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let r = crate::http::request(
                self.addr,
                "GET",
                &self.addr.to_string(),
                path,
                &[],
                None,
                Duration::from_secs(2),
            )
            .await;
            if matches!(&r, Ok(resp) if resp.status == 200) {
                return Ok(());
            }
            self.check_alive_or_deadline(deadline, &format!("{r:?}"))?;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until gRPC health says SERVING (control; NOT_SERVING while Redis is down).
    pub async fn wait_grpc_serving(&mut self, limit: Duration) -> Result<(), String> {
        self.wait_grpc_serving_tls(None, limit).await
    }

    /// [`Proc::wait_grpc_serving`] over TLS (`https://`) when `tls` is given.
    pub async fn wait_grpc_serving_tls(
        &mut self,
        tls: Option<tonic::transport::ClientTlsConfig>,
        limit: Duration,
    ) -> Result<(), String> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let deadline = tokio::time::Instant::now() + limit;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", self.addr);
        loop {
            let endpoint =
                tonic::transport::Endpoint::from_shared(url.clone()).and_then(|ep| match &tls {
                    Some(tls) => ep.tls_config(tls.clone()),
                    None => Ok(ep),
                });
            let last = match endpoint {
                Err(e) => return Err(format!("bad url {url}: {e}")),
                Ok(ep) => match ep.connect_timeout(Duration::from_secs(1)).connect().await {
                    Err(e) => format!("connect: {e}"),
                    Ok(ch) => {
                        let mut client = HealthClient::new(ch);
                        let req = HealthCheckRequest {
                            service: String::new(),
                        };
                        match tokio::time::timeout(Duration::from_secs(2), client.check(req)).await
                        {
                            Ok(Ok(resp))
                                if resp.get_ref().status == ServingStatus::Serving as i32 =>
                            {
                                return Ok(());
                            }
                            other => format!("{other:?}"),
                        }
                    }
                },
            };
            self.check_alive_or_deadline(deadline, &last)?;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn check_alive_or_deadline(
        &mut self,
        deadline: tokio::time::Instant,
        last: &str,
    ) -> Result<(), String> {
        if !self.is_running() {
            return Err(format!(
                "{} exited before it was ready; log:\n{}",
                self.name,
                self.log_text()
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{} not ready in time (last: {last}); log:\n{}",
                self.name,
                self.log_text()
            ));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- log of {} ({} restarts) ----\n{}\n---- end of log of {} ----",
                self.name,
                self.restarts,
                self.log_text(),
                self.name
            );
        }
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A loopback address with a port that was free a moment ago (for a child to bind).
pub fn free_addr() -> std::io::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// Builds an env list from pairs.
pub fn env<const N: usize>(pairs: [(&str, &str); N]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_dir_is_the_target_profile_dir() {
        let dir = bin_dir();
        // Test executables live in target/<profile>/deps; the binaries one level up.
        assert!(!dir.ends_with("deps"), "{}", dir.display());
        assert!(dir.join("deps").is_dir(), "{}", dir.display());
    }

    #[tokio::test]
    async fn missing_binary_is_a_clear_error() {
        let err = Proc::spawn("no-such-binary", Vec::new(), free_addr().expect("addr"))
            .expect_err("not found");
        assert!(err.to_string().contains("CALLBRIDGE_BIN_DIR"), "{err}");
    }
}
