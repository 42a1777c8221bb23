//! Throwaway certificates for TLS tests (rcgen, ring): a CA, server and client
//! certificates it issues, written as PEM files in a temp dir that is removed on drop.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemPair {
    /// Certificate (leaf only).
    pub cert: PathBuf,
    /// PKCS#8 private key.
    pub key: PathBuf,
}

impl PemPair {
    /// The certificate's DER bytes (to compare with what a server presented).
    pub fn cert_der(&self) -> anyhow::Result<Vec<u8>> {
        let pem = std::fs::read_to_string(&self.cert)?;
        let body: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .concat();
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD.decode(body)?)
    }

    /// Copies this pair over `target`'s files (a rotation as cert-manager does it: the
    /// new contents land in the same paths).
    pub fn install_as(&self, target: &PemPair) -> std::io::Result<()> {
        // Key first then certificate: the server must cope with either order.
        std::fs::copy(&self.key, &target.key)?;
        std::fs::copy(&self.cert, &target.cert)?;
        Ok(())
    }
}

/// A test CA with its files in a temp dir.
pub struct TestCa {
    name: String,
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
    serial: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server (SANs `localhost` and `127.0.0.1`).
    Server,
    /// TLS client.
    Client,
    /// Both, with the server's SANs: a Redis Cluster node, which presents its certificate
    /// to its peers on the cluster bus as well as to clients.
    Peer,
}

impl TestCa {
    /// A new CA called `name`, its certificate in `ca.crt` of a fresh temp dir.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let dir = crate::redis_server::temp_dir(&format!("cb-pki-{name}"))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("callbridge test CA {name}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, issuer.pem())?;
        Ok(Self {
            name: name.to_owned(),
            dir,
            issuer,
            ca_file,
            serial: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The CA certificate file.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A leaf certificate for `usage`, valid from yesterday for a year.
    pub fn issue(&self, common_name: &str, usage: Usage) -> anyhow::Result<PemPair> {
        self.issue_valid(common_name, usage, false)
    }

    /// A leaf certificate that expired yesterday.
    pub fn issue_expired(&self, common_name: &str, usage: Usage) -> anyhow::Result<PemPair> {
        self.issue_valid(common_name, usage, true)
    }

    fn issue_valid(
        &self,
        common_name: &str,
        usage: Usage,
        expired: bool,
    ) -> anyhow::Result<PemPair> {
        let names = match usage {
            Usage::Server | Usage::Peer => vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            Usage::Client => vec![common_name.to_owned()],
        };
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Peer => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        let now = rcgen::date_time_ymd(1970, 1, 1)
            + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let day = std::time::Duration::from_secs(86_400);
        if expired {
            params.not_before = now - day * 30;
            params.not_after = now - day;
        } else {
            params.not_before = now - day;
            params.not_after = now + day * 365;
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let n = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pair = PemPair {
            cert: self.dir.join(format!("{common_name}-{n}.crt")),
            key: self.dir.join(format!("{common_name}-{n}.key")),
        };
        std::fs::write(&pair.cert, cert.pem())?;
        std::fs::write(&pair.key, key.serialize_pem())?;
        Ok(pair)
    }

    /// A copy of `pair` under fixed names in its own directory, for a server whose files
    /// are later replaced in place.
    pub fn mounted(&self, pair: &PemPair, name: &str) -> std::io::Result<PemPair> {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let mounted = PemPair {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        pair.install_as(&mounted)?;
        Ok(mounted)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
