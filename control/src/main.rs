//! `callbridge-control`: reads config (exit 64 if invalid), binds, serves until SIGTERM/SIGINT.

use callbridge_control::config::Config;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::from_env_or_exit();
    if let Err(err) = callbridge_telemetry::check_env() {
        eprintln!("callbridge-control: invalid configuration: {err}");
        std::process::exit(callbridge_control::config::EXIT_CONFIG);
    }
    let telemetry = callbridge_telemetry::init(callbridge_telemetry::Options {
        service_name: "callbridge-control",
        filter: &config.log,
        filter_var: "CONTROL_LOG",
        json: matches!(
            config.log_format,
            callbridge_control::config::LogFormat::Json
        ),
        output: callbridge_telemetry::Output::Stderr,
    });
    let code = run(config).await;
    // After serve returns no more RPC spans start; flush what the batch still holds.
    telemetry.shutdown().await;
    code
}

async fn run(config: Config) -> std::process::ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(addr = %config.listen, error = %err, "Cannot bind the gRPC listener.");
            return std::process::ExitCode::from(1);
        }
    };
    match callbridge_control::serve(config, listener, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "Control plane failed.");
            std::process::ExitCode::from(1)
        }
    }
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            // Kubernetes stops pods with SIGTERM.
            _ = term.recv() => {}
            // Ctrl-C in a terminal.
            _ = ctrl_c => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("Shutdown signal received.");
}
