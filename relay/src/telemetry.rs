//! Logging: `tracing-subscriber` with the filter from `RELAY_LOG` and text or JSON lines.

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber. An invalid filter falls back to `info` with a warning.
pub fn init(config: &Config) {
    let (filter, bad) = match EnvFilter::try_new(&config.log) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e.to_string())),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Some(e) = bad {
        tracing::warn!(error = %e, "RELAY_LOG is not a valid filter; using info.");
    }
}
