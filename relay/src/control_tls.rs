//! TLS towards control: an `https://` `CONTROL_URL` is always dialled over TLS (rustls,
//! ring), trusting `CONTROL_CA_FILE` when set and the webpki roots (Mozilla's list,
//! compiled in) otherwise, and presenting `CONTROL_CLIENT_CERT_FILE`/`_KEY_FILE` when set.
//! An `http://` URL stays plaintext h2c; the TLS files are then refused, never ignored.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::{Config, ConfigError};

/// Why the TLS files towards control cannot be used; names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ControlTlsError {
    /// The environment variable.
    pub var: &'static str,
    /// What is wrong (a path and a parser message; never file contents).
    pub reason: String,
}

fn err(var: &'static str, reason: impl Into<String>) -> ControlTlsError {
    ControlTlsError {
        var,
        reason: reason.into(),
    }
}

fn read(var: &'static str, path: &Path) -> Result<Vec<u8>, ControlTlsError> {
    std::fs::read(path).map_err(|e| err(var, format!("cannot read {}: {e}", path.display())))
}

fn read_certs(var: &'static str, path: &Path) -> Result<Vec<u8>, ControlTlsError> {
    let pem = read(var, path)?;
    if !CertificateDer::pem_slice_iter(&pem).any(|c| c.is_ok()) {
        return Err(err(
            var,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(pem)
}

fn read_key(var: &'static str, path: &Path) -> Result<Vec<u8>, ControlTlsError> {
    let pem = read(var, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        err(
            var,
            format!("{} holds no usable PEM private key ({e})", path.display()),
        )
    })?;
    Ok(pem)
}

fn set(path: &Option<PathBuf>) -> Option<&Path> {
    path.as_deref().filter(|p| !p.as_os_str().is_empty())
}

/// Checks the TLS settings against `CONTROL_URL` and reads every file once, so a bad one
/// stops the relay before any socket opens.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    let to_config = |e: ControlTlsError| ConfigError::Invalid {
        field: e.var,
        reason: e.reason,
    };
    let https = config
        .control_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"));
    if !https {
        for (path, var) in [
            (&config.control_ca_file, "CONTROL_CA_FILE"),
            (&config.control_client_cert_file, "CONTROL_CLIENT_CERT_FILE"),
            (&config.control_client_key_file, "CONTROL_CLIENT_KEY_FILE"),
        ] {
            if set(path).is_some() {
                return Err(to_config(err(
                    var,
                    "only used with an https:// CONTROL_URL, and CONTROL_URL is not one",
                )));
            }
        }
        return Ok(());
    }
    client_config(config).map(|_| ()).map_err(to_config)
}

/// The tonic TLS settings for an `https://` `CONTROL_URL`.
pub fn client_config(config: &Config) -> Result<ClientTlsConfig, ControlTlsError> {
    let mut tls = ClientTlsConfig::new();
    tls = match set(&config.control_ca_file) {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read_certs("CONTROL_CA_FILE", ca)?)),
        None => tls.with_webpki_roots(),
    };
    match (
        set(&config.control_client_cert_file),
        set(&config.control_client_key_file),
    ) {
        (None, None) => {}
        (Some(_), None) => {
            return Err(err(
                "CONTROL_CLIENT_KEY_FILE",
                "required when CONTROL_CLIENT_CERT_FILE is set",
            ));
        }
        (None, Some(_)) => {
            return Err(err(
                "CONTROL_CLIENT_CERT_FILE",
                "required when CONTROL_CLIENT_KEY_FILE is set",
            ));
        }
        (Some(cert), Some(key)) => {
            let cert = read_certs("CONTROL_CLIENT_CERT_FILE", cert)?;
            let key = read_key("CONTROL_CLIENT_KEY_FILE", key)?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(url: &str) -> Config {
        let mut c = Config::for_tests("https://relay.example.com", "wss://model.example.com");
        c.control_url = Some(url.to_owned());
        c
    }

    fn file(body: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("cb-relay-tls-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, body).expect("write");
        path
    }

    fn field(e: ConfigError) -> &'static str {
        match e {
            ConfigError::Invalid { field, .. } => field,
            ConfigError::Secret(e) => e.var,
            ConfigError::Parse(e) => panic!("unexpected parse error {e}"),
        }
    }

    #[test]
    fn tls_files_with_a_plaintext_control_url_are_refused_by_name() {
        let mut c = base("http://control:50051");
        c.control_ca_file = Some(file("x"));
        assert_eq!(field(check(&c).expect_err("refused")), "CONTROL_CA_FILE");
        let mut c = base("http://control:50051");
        c.control_client_key_file = Some(file("x"));
        assert_eq!(
            field(check(&c).expect_err("refused")),
            "CONTROL_CLIENT_KEY_FILE"
        );
        check(&base("http://control:50051")).expect("plaintext without files");
        check(&base("https://control:50051")).expect("https with the webpki roots");
    }

    #[test]
    fn unusable_files_name_their_variable() {
        let mut c = base("https://control:50051");
        c.control_ca_file = Some(file("no pem here"));
        assert_eq!(field(check(&c).expect_err("refused")), "CONTROL_CA_FILE");
        let mut c = base("https://control:50051");
        c.control_client_cert_file = Some(file("no pem here"));
        assert_eq!(
            field(check(&c).expect_err("half a pair")),
            "CONTROL_CLIENT_KEY_FILE"
        );
        c.control_client_key_file = Some(PathBuf::from("/nonexistent/key.pem"));
        let e = check(&c).expect_err("bad cert");
        assert_eq!(field(e), "CONTROL_CLIENT_CERT_FILE");
    }
}
