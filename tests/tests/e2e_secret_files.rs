//! End-to-end: every secret of both binaries given as a file (`NAME_FILE`, the way
//! Kubernetes mounts a Secret), none in the environment or on the command line. A whole
//! call only works if each one was read: the app token (CreateCall, transcript), the relay
//! token (attach), the Twilio token (the signed webhook and stream), the model key (the fake
//! model accepts only that key).

use std::path::PathBuf;

use callbridge_testkit::fake_realtime::FakeRealtime;
use callbridge_tests::scenario::Scenario;
use callbridge_tests::{
    APP_TOKEN, OPENAI_KEY, RELAY_TOKEN, TWILIO_TOKEN, World, agent_settings, flatten,
};

/// Writes `value` + a newline (as `kubectl create secret --from-file` of an editor-made
/// file would hold it) to a fresh file and returns its path.
fn secret_file(dir: &std::path::Path, name: &str, value: &str) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).expect("write the secret file");
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_runs_with_every_secret_read_from_a_file() {
    let dir = std::env::temp_dir().join(format!("cb-secret-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let app = secret_file(&dir, "app-tokens", APP_TOKEN);
    let relay_tokens = secret_file(&dir, "relay-tokens", RELAY_TOKEN);
    let control_token = secret_file(&dir, "control-token", RELAY_TOKEN);
    let openai = secret_file(&dir, "openai-api-key", OPENAI_KEY);
    let twilio = secret_file(&dir, "twilio-auth-token", TWILIO_TOKEN);

    let call = Scenario::inbound()
        .agent_greets("Hello, how can I help?", 400)
        .caller_says("Just checking the secrets.", 400)
        .agent_replies("They all came from files.", 400)
        .caller_hangs_up();
    // The harness sets each secret's variable; empty counts as unset, so only the files
    // are left.
    let world = World::builder(
        FakeRealtime::builder()
            .script(call.script())
            .speed(2.0)
            .require_key(OPENAI_KEY),
    )
    .control_env("CONTROL_APP_TOKENS", "")
    .control_env("CONTROL_APP_TOKENS_FILE", &app)
    .control_env("CONTROL_RELAY_TOKENS", "")
    .control_env("CONTROL_RELAY_TOKENS_FILE", &relay_tokens)
    .relay_env("RELAY_CONTROL_TOKEN", "")
    .relay_env("RELAY_CONTROL_TOKEN_FILE", &control_token)
    .relay_env("OPENAI_API_KEY", "")
    .relay_env("OPENAI_API_KEY_FILE", &openai)
    .relay_env("TWILIO_AUTH_TOKEN", "")
    .relay_env("TWILIO_AUTH_TOKEN_FILE", &twilio)
    .start()
    .await;
    world
        .default_agent(agent_settings(
            "secret-files",
            Some("Hello, how can I help?"),
        ))
        .await;

    let placed = call.place(&world).await;
    placed.heard_every_reply();
    let (_, transcript) = placed.stored(&world).await;
    // The agent's side (the caller's lines depend on the agent's transcription setting).
    let agent = |t: Vec<(String, String)>| -> Vec<(String, String)> {
        t.into_iter()
            .filter(|(who, _)| who == "assistant")
            .collect()
    };
    assert_eq!(
        agent(flatten(&transcript)),
        agent(call.expected_transcript()),
        "stored through control with the tokens from the files"
    );
    assert_eq!(
        world.fake.handshakes_rejected(),
        0,
        "the key from the file was sent"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
