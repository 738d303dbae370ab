//! The migration flags, checked, and what they set up: the TLS configurations of both
//! sides and the listener.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The migration flags of `warmvm daemon`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationOptions {
    /// Accept migrations on this address (off when `None`).
    pub listen: Option<SocketAddr>,
    /// This daemon's certificate chain and key (PEM), and the CA it trusts for its peers.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// Plain TCP, loopback only.
    pub insecure: bool,
    /// How long one read or write on a migration stream waits for the peer, seconds
    /// (`None`: [`super::IO_TIMEOUT`]).
    pub io_timeout_secs: Option<u64>,
}

/// The longest `--migration-io-timeout` accepted, seconds.
pub const MAX_IO_TIMEOUT_SECS: u64 = 600;

/// Why the migration flags cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--migration-insecure: plain TCP is allowed only on loopback; --migration-listen {0} is not")]
    InsecureNotLoopback(SocketAddr),
    #[error("--migration-insecure cannot be combined with --migration-cert, --migration-key or --migration-ca")]
    InsecureWithCerts,
    #[error("--migration-cert, --migration-key and --migration-ca go together: {0} is missing")]
    Incomplete(&'static str),
    #[error("--migration-listen needs --migration-cert, --migration-key and --migration-ca (or --migration-insecure on loopback)")]
    NoTrust,
    #[error("{flag} {}: {source}", path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{flag} {}: no certificate in it", path.display())]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("--migration-ca {}: {source}", path.display())]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the migration certificate and key: {0}")]
    Tls(#[source] rustls::Error),
    #[error("the client verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("--migration-io-timeout {0}: must be 1..={MAX_IO_TIMEOUT_SECS} seconds")]
    IoTimeout(u64),
    #[error("--migration-listen {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl SetupError {
    /// The operator's flags or files are at fault (not the host).
    pub fn is_input(&self) -> bool {
        !matches!(self, SetupError::Listen { .. })
    }
}

/// The TLS both ends of a migration speak: ours as a server and as a client.
#[derive(Clone, Debug)]
pub struct Tls {
    pub(super) server: Arc<rustls::ServerConfig>,
    pub(super) client: Arc<rustls::ClientConfig>,
}

/// ring's provider. rustls marks it deprecated for its lack of post-quantum key exchange
/// (only aws-lc-rs offers that, at the cost of a cmake C build); recorded traffic of a
/// migration is worth little once the VM has moved on, and both ends are our daemons.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, SetupError> {
    let pem = |source| SetupError::Pem {
        flag,
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(SetupError::NoCertificate {
            flag,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

impl Tls {
    /// The configuration the listener serves with.
    pub fn server(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// Read the certificate chain, the key and the CA (PEM files) and build both configs.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, SetupError> {
        let chain = certs("--migration-cert", cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| SetupError::Pem {
            flag: "--migration-key",
            path: key.to_path_buf(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("--migration-ca", ca)? {
            roots.add(c).map_err(|source| SetupError::Ca {
                path: ca.to_path_buf(),
                source,
            })?;
        }
        let roots = Arc::new(roots);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(SetupError::Verifier)?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(SetupError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(SetupError::Tls)?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(SetupError::Tls)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(SetupError::Tls)?;
        Ok(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// How this daemon migrates: its trust (none: plain TCP to loopback only) and where it
/// listens, if it does.
#[derive(Clone, Debug)]
pub struct Setup {
    pub tls: Option<Tls>,
    pub insecure: bool,
    pub listen: Option<SocketAddr>,
    /// How long one read or write on a migration stream, in or out, waits for the peer:
    /// a peer that stalls (stopped, or its link down) longer than this fails the
    /// migration at this end.
    pub io_timeout: Duration,
}

impl MigrationOptions {
    /// Check the flags and read the files; nothing is bound yet.
    pub fn setup(&self) -> Result<Option<Setup>, SetupError> {
        let io_timeout = match self.io_timeout_secs {
            None => super::IO_TIMEOUT,
            Some(s) if (1..=MAX_IO_TIMEOUT_SECS).contains(&s) => Duration::from_secs(s),
            Some(s) => return Err(SetupError::IoTimeout(s)),
        };
        let given = [
            ("--migration-cert", &self.cert),
            ("--migration-key", &self.key),
            ("--migration-ca", &self.ca),
        ];
        let count = given.iter().filter(|(_, p)| p.is_some()).count();
        if self.insecure && count > 0 {
            return Err(SetupError::InsecureWithCerts);
        }
        if let Some(addr) = self
            .listen
            .filter(|a| self.insecure && !a.ip().is_loopback())
        {
            return Err(SetupError::InsecureNotLoopback(addr));
        }
        if count > 0 && count < given.len() {
            let missing = given
                .iter()
                .find(|(_, p)| p.is_none())
                .map_or("--migration-ca", |(f, _)| f);
            return Err(SetupError::Incomplete(missing));
        }
        let tls = match (&self.cert, &self.key, &self.ca) {
            (Some(c), Some(k), Some(a)) => Some(Tls::load(c, k, a)?),
            _ => None,
        };
        if tls.is_none() && !self.insecure {
            return match self.listen {
                Some(_) => Err(SetupError::NoTrust),
                None => Ok(None),
            };
        }
        Ok(Some(Setup {
            tls,
            insecure: self.insecure,
            listen: self.listen,
            io_timeout,
        }))
    }

    /// The flags a warm reboot's new daemon gets to do the same.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        if let Some(a) = &self.listen {
            args.extend(["--migration-listen".into(), a.to_string().into()]);
        }
        for (flag, p) in [
            ("--migration-cert", &self.cert),
            ("--migration-key", &self.key),
            ("--migration-ca", &self.ca),
        ] {
            if let Some(p) = p {
                args.extend([flag.into(), p.clone().into_os_string()]);
            }
        }
        if self.insecure {
            args.push("--migration-insecure".into());
        }
        if let Some(s) = self.io_timeout_secs {
            args.extend(["--migration-io-timeout".into(), s.to_string().into()]);
        }
        args
    }
}

/// Bind the migration listener.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, SetupError> {
    TcpListener::bind(addr).map_err(|source| SetupError::Listen { addr, source })
}
