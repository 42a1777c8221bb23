//! Server TLS shared by both binaries (rustls, ring provider) and the PEM files behind it:
//! control's gRPC listener and both metrics listeners.
//!
//! No static server configuration: cert-manager rotates certificates in place, so the
//! server key pair sits behind a resolver whose `Arc` is swapped when the files change
//! ([`watch`] polls them). A reload only affects handshakes that start after it;
//! established connections (live attach streams) keep the session they negotiated.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are read again to notice a rotation.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Why a certificate, key or CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no PEM certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no usable PEM private key.
    #[error("{path} holds no usable PEM private key ({reason})")]
    Key {
        /// The file.
        path: PathBuf,
        /// What the parser said (never key material).
        reason: String,
    },
    /// The certificate and key do not belong together, or rustls refuses them.
    #[error("certificate {cert} and key {key} cannot be used together: {reason}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// A client CA file cannot be turned into a verifier.
    #[error("client CA {path} cannot be used: {reason}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate of a PEM file (at least one).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    certificates_from(path, &read(path)?)
}

fn certificates_from(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsFileError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn key_from(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsFileError::Key {
        path: path.to_owned(),
        // pki-types' PEM errors name the section kind, never its bytes.
        reason: e.to_string(),
    })
}

/// A certificate chain and its key, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPairFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl KeyPairFiles {
    /// Reads and checks the pair (the key must match the leaf certificate).
    pub fn load(&self) -> Result<Arc<CertifiedKey>, TlsFileError> {
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        self.load_from(&cert_pem, &key_pem)
    }

    /// [`Self::load`] from contents already read.
    pub fn load_from(
        &self,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Arc<CertifiedKey>, TlsFileError> {
        let chain = certificates_from(&self.cert, cert_pem)?;
        let key = key_from(&self.key, key_pem)?;
        let pair = |reason: String| TlsFileError::Pair {
            cert: self.cert.clone(),
            key: self.key.clone(),
            reason,
        };
        let certified =
            CertifiedKey::from_der(chain, key, &provider()).map_err(|e| pair(e.to_string()))?;
        // from_der lets "cannot tell" through; a rotation that pairs a new certificate
        // with the old key must not be served.
        certified.keys_match().map_err(|e| pair(e.to_string()))?;
        Ok(Arc::new(certified))
    }
}

/// The one crypto provider of this binary.
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Settings of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The server's certificate and key, reloaded when they change.
    pub pair: KeyPairFiles,
    /// CA that client certificates must chain to; set: every client must present one.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Checks every file now, so a bad one is a configuration error before any socket opens.
    pub fn check(&self) -> Result<(), TlsFileError> {
        self.pair.load()?;
        if let Some(ca) = &self.client_ca {
            client_verifier(ca)?;
        }
        Ok(())
    }
}

fn client_verifier(
    path: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| TlsFileError::ClientCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider()))
        .build()
        .map_err(|e| TlsFileError::ClientCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Serves whatever key pair was loaded last.
#[derive(Debug)]
pub struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    fn new(first: Arc<CertifiedKey>) -> Self {
        Self {
            current: RwLock::new(first),
        }
    }

    /// The pair handshakes get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        // A poisoned lock still holds a whole Arc: a panic cannot leave half a swap.
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, next: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut g) => *g = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A rustls server configuration for `tls` with the given ALPN protocols, and the resolver
/// that [`watch`] keeps current.
pub fn server_config(
    tls: &ServerTls,
    alpn: &[&[u8]],
) -> Result<(Arc<rustls::ServerConfig>, Arc<ReloadingCert>), TlsFileError> {
    let resolver = Arc::new(ReloadingCert::new(tls.pair.load()?));
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError::Pair {
            cert: tls.pair.cert.clone(),
            key: tls.pair.key.clone(),
            reason: e.to_string(),
        })?;
    let builder = match &tls.client_ca {
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca)?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((Arc::new(config), resolver))
}

/// Reads the pair every [`RELOAD_EVERY`] and swaps it in when the bytes changed and the
/// new pair is valid. A half-written rotation (new certificate, old key) is skipped with
/// a warning and picked up on a later tick once both files agree.
pub async fn watch(pair: KeyPairFiles, resolver: Arc<ReloadingCert>, shutdown: CancellationToken) {
    let mut seen = (read(&pair.cert).ok(), read(&pair.key).ok());
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (cert, key) = match (read(&pair.cert), read(&pair.key)) {
            (Ok(c), Ok(k)) => (c, k),
            (Err(e), _) | (_, Err(e)) => {
                if !warned {
                    tracing::warn!(error = %e, "TLS certificate files unreadable; serving the previous certificate.");
                    warned = true;
                }
                continue;
            }
        };
        if seen.0.as_ref() == Some(&cert) && seen.1.as_ref() == Some(&key) {
            continue;
        }
        match pair.load_from(&cert, &key) {
            Ok(next) => {
                resolver.replace(next);
                tracing::info!(cert = %pair.cert.display(), "TLS certificate reloaded; new connections get it.");
                seen = (Some(cert), Some(key));
                warned = false;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "New TLS certificate files are not usable (yet); serving the previous certificate.");
                    warned = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, body).expect("write");
        path
    }

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "cb-tls-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn a_matching_pair_loads_and_a_mismatched_one_names_both_files() {
        let dir = tempdir("pair");
        let (cert_a, key_a) = pair("a.test");
        let (_, key_b) = pair("b.test");
        let files = KeyPairFiles {
            cert: write(&dir, "a.crt", &cert_a),
            key: write(&dir, "a.key", &key_a),
        };
        let loaded = files.load().expect("matching pair");
        assert_eq!(loaded.cert.len(), 1);
        let wrong = KeyPairFiles {
            cert: files.cert.clone(),
            key: write(&dir, "b.key", &key_b),
        };
        let err = wrong.load().expect_err("mismatch").to_string();
        assert!(err.contains("a.crt") && err.contains("b.key"), "{err}");
        assert!(!err.contains("PRIVATE KEY"), "{err}");
    }

    #[test]
    fn files_without_pem_are_refused_by_name() {
        let dir = tempdir("nopem");
        let (cert, key) = pair("a.test");
        let files = KeyPairFiles {
            cert: write(&dir, "junk.crt", "not a certificate"),
            key: write(&dir, "a.key", &key),
        };
        assert!(
            matches!(files.load(), Err(TlsFileError::NoCertificate { path }) if path.ends_with("junk.crt"))
        );
        let files = KeyPairFiles {
            cert: write(&dir, "a.crt", &cert),
            key: write(&dir, "junk.key", &cert),
        };
        assert!(
            matches!(files.load(), Err(TlsFileError::Key { path, .. }) if path.ends_with("junk.key"))
        );
        let missing = KeyPairFiles {
            cert: dir.join("missing.crt"),
            key: files.key.clone(),
        };
        assert!(matches!(missing.load(), Err(TlsFileError::Read { .. })));
    }

    #[tokio::test]
    async fn watch_swaps_in_a_rotated_pair_and_skips_a_half_written_one() {
        let dir = tempdir("watch");
        let (cert_a, key_a) = pair("a.test");
        let (cert_b, key_b) = pair("b.test");
        let files = KeyPairFiles {
            cert: write(&dir, "tls.crt", &cert_a),
            key: write(&dir, "tls.key", &key_a),
        };
        let tls = ServerTls {
            pair: files.clone(),
            client_ca: None,
        };
        let (_, resolver) = server_config(&tls, &[b"h2"]).expect("config");
        let first = resolver.current().cert[0].clone();
        let token = CancellationToken::new();
        let task = tokio::spawn(watch(files.clone(), resolver.clone(), token.clone()));
        // Certificate B with key A: not servable, the old pair stays.
        std::fs::write(&files.cert, &cert_b).expect("write");
        tokio::time::sleep(RELOAD_EVERY * 2).await;
        assert_eq!(resolver.current().cert[0], first);
        std::fs::write(&files.key, &key_b).expect("write");
        let deadline = tokio::time::Instant::now() + RELOAD_EVERY * 5;
        while resolver.current().cert[0] == first {
            assert!(tokio::time::Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let expected = CertificateDer::from_pem_slice(cert_b.as_bytes()).expect("pem");
        assert_eq!(resolver.current().cert[0], expected);
        token.cancel();
        task.await.expect("watch ends");
    }
}
