//! `callbridge-relay`: reads configuration, binds, runs until SIGTERM/SIGINT, drains.

use std::process::ExitCode;

use callbridge_relay::config::{Config, ConfigError, EXIT_CONFIG};

fn main() -> ExitCode {
    let config = match Config::from_args_and_env(std::env::args_os()) {
        Ok(c) => c,
        Err(ConfigError::Parse(e))
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("callbridge-relay: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if let Err(e) = callbridge_telemetry::check_env() {
        eprintln!("callbridge-relay: invalid configuration: {e}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    // tokio-tungstenite's rustls needs a process-wide crypto provider for wss://.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("callbridge-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Inside the runtime: the OTLP exporter spawns its connection tasks on it.
        let telemetry = callbridge_telemetry::init(callbridge_telemetry::Options {
            service_name: "callbridge-relay",
            filter: &config.log,
            filter_var: "RELAY_LOG",
            json: matches!(config.log_format, callbridge_relay::config::LogFormat::Json),
            output: callbridge_telemetry::Output::Stdout,
        });
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let code = match serve(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "Relay failed.");
                eprintln!("callbridge-relay: {e:#}");
                ExitCode::FAILURE
            }
        };
        // Calls have drained by now; flush the spans the batch still holds.
        telemetry.shutdown().await;
        code
    })
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", config.listen))?;
    callbridge_relay::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
