//! Configuration that could fail open is refused by the real binaries: exit 64, the
//! variable named on stderr, the secret never echoed. And the one insecure setting that
//! does start (skipping signatures on loopback) says so loudly in the log.

use std::time::Duration;

use callbridge_testkit::procs::{Proc, bin_dir, free_addr};

/// Long enough for the secure modes (32 bytes or more).
const LONG: &str = "a-token-of-thirty-two-bytes-0123456";

/// Runs `binary` with `env` only (plus PATH) and returns its exit code and stderr.
fn run_config(binary: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin_dir().join(binary))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(binary: &str, env: &[(&str, &str)], var: &str, secret: Option<&str>) {
    let (code, stderr) = run_config(binary, env);
    assert_eq!(code, Some(64), "{binary} {env:?}: {stderr}");
    assert!(
        stderr.contains(var),
        "{binary} {env:?} names {var}: {stderr}"
    );
    if let Some(secret) = secret {
        assert!(
            !stderr.contains(secret),
            "{binary} echoed a secret: {stderr}"
        );
    }
}

#[test]
fn relay_refuses_settings_that_would_fail_open() {
    let secure = [
        ("RELAY_PUBLIC_URL", "https://relay.example.com"),
        ("OPENAI_API_KEY", "sk-x"),
        ("TWILIO_AUTH_TOKEN", "twilio-token"),
        ("CONTROL_URL", "http://127.0.0.1:1"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
    ];
    // (extra settings, the variable named, a secret that must not be echoed)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, Option<&'a str>);
    let cases: Vec<Case<'_>> = vec![
        // Not header text: it would have become "no auth".
        (
            vec![(
                "RELAY_CONTROL_TOKEN",
                "token-with-a-newline\n-0123456789abcdef",
            )],
            "RELAY_CONTROL_TOKEN",
            Some("token-with-a-newline"),
        ),
        (
            vec![("RELAY_CONTROL_TOKEN", "short-relay-token")],
            "RELAY_CONTROL_TOKEN",
            Some("short-relay-token"),
        ),
        // Unsigned requests accepted where Twilio (anyone) reaches the relay.
        (
            vec![
                ("RELAY_CONTROL_TOKEN", LONG),
                ("RELAY_INSECURE_SKIP_SIGNATURE", "true"),
            ],
            "RELAY_INSECURE_SKIP_SIGNATURE",
            None,
        ),
        // The API key in clear to another machine.
        (
            vec![
                ("RELAY_CONTROL_TOKEN", LONG),
                ("OPENAI_REALTIME_URL", "ws://model.example.com/v1/realtime"),
            ],
            "OPENAI_REALTIME_URL",
            None,
        ),
        // Stream URLs Twilio cannot open (ws://, or a port other than 443).
        (
            vec![
                ("RELAY_CONTROL_TOKEN", LONG),
                ("RELAY_PUBLIC_URL", "http://relay.example.com"),
            ],
            "RELAY_PUBLIC_URL",
            None,
        ),
        (
            vec![
                ("RELAY_CONTROL_TOKEN", LONG),
                ("RELAY_PUBLIC_URL", "https://relay.example.com:8443"),
            ],
            "RELAY_PUBLIC_URL",
            None,
        ),
    ];
    for (extra, var, secret) in cases {
        let mut env = secure.to_vec();
        env.extend(extra);
        assert_refused("callbridge-relay", &env, var, secret);
    }
}

#[test]
fn relay_refuses_a_silence_commit_it_cannot_honour() {
    let base = [
        ("RELAY_PUBLIC_URL", "https://relay.example.com"),
        ("OPENAI_API_KEY", "sk-x"),
        ("TWILIO_AUTH_TOKEN", "twilio-token"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
    ];
    // The model's own turn detection commits: a relay silence commit would fight it.
    let mut env = base.to_vec();
    env.push(("AGENT_SILENCE_COMMIT_MS", "500"));
    assert_refused("callbridge-relay", &env, "AGENT_SILENCE_COMMIT_MS", None);
    // Too short to be the end of a turn.
    let mut env = base.to_vec();
    env.extend([
        ("AGENT_TURN_DETECTION", "none"),
        ("AGENT_SILENCE_COMMIT_MS", "50"),
    ]);
    assert_refused("callbridge-relay", &env, "AGENT_SILENCE_COMMIT_MS", None);
}

#[test]
fn control_refuses_short_tokens_outside_the_insecure_mode() {
    let base = [
        ("CONTROL_METRICS_LISTEN", ""),
        ("CONTROL_LISTEN", "127.0.0.1:0"),
    ];
    for (var, value) in [
        ("CONTROL_APP_TOKENS", format!("{LONG},short-app-token")),
        ("CONTROL_RELAY_TOKENS", "short-relay-token".to_owned()),
    ] {
        let mut env = base.to_vec();
        env.push((var, &value));
        assert_refused("callbridge-control", &env, var, Some("short-"));
    }
}

#[test]
fn secrets_given_twice_or_in_unreadable_files_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("cb-refused-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key_file = dir.join("openai-api-key");
    std::fs::write(&key_file, "sk-from-the-file\n").expect("write");
    let key_file = key_file.to_string_lossy().into_owned();
    let relay = [
        ("RELAY_PUBLIC_URL", "https://relay.example.com"),
        ("TWILIO_AUTH_TOKEN", "twilio-token"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
    ];
    // Both the variable and its file: which should win is a guess; refused, both named.
    let mut env = relay.to_vec();
    env.extend([
        ("OPENAI_API_KEY", "sk-inline-value"),
        ("OPENAI_API_KEY_FILE", key_file.as_str()),
    ]);
    assert_refused("callbridge-relay", &env, "OPENAI_API_KEY_FILE", Some("sk-"));
    let (_, stderr) = run_config("callbridge-relay", &env);
    assert!(stderr.contains("OPENAI_API_KEY or"), "{stderr}");
    // A file that is not there.
    let mut env = relay.to_vec();
    env.push(("OPENAI_API_KEY_FILE", "/nonexistent/openai-api-key"));
    assert_refused("callbridge-relay", &env, "OPENAI_API_KEY_FILE", None);
    // No longer a flag: clap refuses it as an unknown argument.
    let out = std::process::Command::new(bin_dir().join("callbridge-relay"))
        .args(["--openai-api-key", "sk-on-the-command-line"])
        .env_clear()
        .envs(relay)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let control = [
        ("CONTROL_APP_TOKENS_FILE", "/nonexistent/app-tokens"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
    ];
    assert_refused(
        "callbridge-control",
        &control,
        "CONTROL_APP_TOKENS_FILE",
        None,
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn control_hides_redis_urls_in_help() {
    let out = std::process::Command::new(bin_dir().join("callbridge-control"))
        .arg("--help")
        .env_clear()
        .env("REDIS_URL", "redis://:hunter2-url-password@127.0.0.1:6379")
        .env(
            "REDIS_CLUSTER_NODES",
            "redis://:hunter3-node-password@127.0.0.1:7000",
        )
        .output()
        .expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("REDIS_URL") && help.contains("REDIS_CLUSTER_NODES"));
    assert!(
        !help.contains("hunter2") && !help.contains("hunter3"),
        "{help}"
    );
}

/// Loopback needs no extra flag, and the relay says loudly that signatures are off.
#[tokio::test]
async fn skipping_signatures_on_loopback_starts_with_a_loud_warning() {
    let addr = free_addr().expect("a free port");
    let public = format!("http://{addr}");
    let env = [
        ("RELAY_LISTEN", addr.to_string()),
        ("RELAY_PUBLIC_URL", public),
        ("OPENAI_API_KEY", "sk-x".to_owned()),
        (
            "OPENAI_REALTIME_URL",
            "ws://127.0.0.1:9/v1/realtime".to_owned(),
        ),
        ("RELAY_INSECURE_SKIP_SIGNATURE", "true".to_owned()),
        ("RELAY_LOG", "info".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    let mut relay = Proc::spawn("callbridge-relay", env, addr).expect("relay spawns");
    relay
        .wait_http_ok("/healthz", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = relay.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("RELAY_INSECURE_SKIP_SIGNATURE=true"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    relay.kill();
}
