//! The process spawner against a real binary of this package (`fake-realtime`, which
//! cargo builds for these tests): env passing, readiness, SIGTERM, log capture.

use std::time::Duration;

use callbridge_testkit::procs::{Proc, env, free_addr};
use callbridge_testkit::with_timeout;

#[tokio::test]
async fn spawns_with_env_terminates_with_sigterm_and_keeps_the_log() {
    let addr = free_addr().expect("addr");
    let listen = addr.to_string();
    let mut p = Proc::spawn(
        "fake-realtime",
        env([
            ("FAKE_REALTIME_LISTEN", listen.as_str()),
            ("FAKE_REALTIME_ECHO", "true"),
        ]),
        addr,
    )
    .expect("spawns");
    // Ready once it accepts connections on the address we gave it through its env.
    let ready = callbridge_testkit::eventually(Duration::from_secs(20), || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;
    assert!(ready, "listening on {addr}; log:\n{}", p.log_text());
    assert!(p.is_running());
    p.terminate().expect("SIGTERM sent");
    let status = with_timeout(
        Duration::from_secs(20),
        "exit",
        p.wait_exit(Duration::from_secs(15)),
    )
    .await
    .expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
    let log = p.log_text();
    assert!(log.contains(&format!("listening on ws://{addr}")), "{log}");
    assert!(log.contains("0 sessions served"), "{log}");
}
