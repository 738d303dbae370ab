//! How a daemon or the CLI reaches etcd: its endpoints and, as production clusters
//! require, TLS with a client certificate. The options are checked whole before any
//! connection is tried, so a bad flag is one clear line at start-up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::FleetError;

/// How long one connection attempt may take, and one call once connected: well under the
/// membership lease's TTL, so that a host that cannot reach etcd notices before its lease
/// runs out.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The files of an mTLS connection to etcd: the CA that signed the members' certificates,
/// and this client's certificate and key (both or neither).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// `http://HOST:PORT` or `https://HOST:PORT`, one per member.
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
}

impl EtcdOptions {
    /// From `--fleet-etcd URL[,URL...]` and the TLS flags.
    pub fn new(
        endpoints: &str,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<EtcdOptions, FleetError> {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect();
        let tls =
            match (ca, cert, key) {
                (None, None, None) => None,
                (Some(ca), cert, key) => Some(EtcdTls { ca, cert, key }),
                (None, _, _) => return Err(FleetError::Invalid(
                    "an etcd client certificate needs the CA that signed etcd's (--fleet-etcd-ca)"
                        .into(),
                )),
            };
        let options = EtcdOptions { endpoints, tls };
        options.check()?;
        Ok(options)
    }

    /// Every rule the options must meet; nothing is connected.
    pub fn check(&self) -> Result<(), FleetError> {
        let invalid = |m: String| Err(FleetError::Invalid(m));
        if self.endpoints.is_empty() {
            return invalid("no etcd endpoint given (--fleet-etcd URL[,URL...])".into());
        }
        for e in &self.endpoints {
            let Some((scheme, rest)) = e.split_once("://") else {
                return invalid(format!(
                    "etcd endpoint {e:?} is not http://HOST:PORT or https://HOST:PORT"
                ));
            };
            let port_ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !port_ok || rest.contains('/') {
                return invalid(format!("etcd endpoint {e:?} is not {scheme}://HOST:PORT"));
            }
            match (scheme, &self.tls) {
                ("https", Some(_)) | ("http", None) => {}
                ("https", None) => {
                    return invalid(format!(
                        "etcd endpoint {e:?} is https but no CA is given (--fleet-etcd-ca)"
                    ))
                }
                ("http", Some(_)) => {
                    return invalid(format!(
                        "etcd endpoint {e:?} is plain http while TLS files are given: use https://"
                    ))
                }
                _ => {
                    return invalid(format!(
                        "etcd endpoint {e:?}: the scheme must be http or https"
                    ))
                }
            }
        }
        if let Some(tls) = &self.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                return invalid(
                    "an etcd client certificate and its key go together (--fleet-etcd-cert and --fleet-etcd-key)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The client library's options: timeouts, and the TLS files read now (a missing file
    /// is an error here, not a failed handshake later).
    pub fn connect_options(&self) -> Result<ConnectOptions, FleetError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            let mut t =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca, "etcd CA")?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                t = t.identity(Identity::from_pem(
                    read(cert, "etcd client certificate")?,
                    read(key, "etcd client key")?,
                ));
            }
            options = options.with_tls(t);
        }
        Ok(options)
    }

    /// Connect (the client reconnects by itself afterwards).
    pub async fn connect(&self) -> Result<Client, FleetError> {
        let options = self.connect_options()?;
        Client::connect(self.endpoints.clone(), Some(options))
            .await
            .map_err(FleetError::etcd(format!(
                "connect to {}",
                self.endpoints.join(",")
            )))
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, FleetError> {
    std::fs::read(path).map_err(|source| FleetError::ReadFile {
        what,
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(endpoints: &str, ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> String {
        EtcdOptions::new(
            endpoints,
            ca.map(Into::into),
            cert.map(Into::into),
            key.map(Into::into),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn endpoints_and_tls_files_are_checked_before_connecting() {
        assert!(err("", None, None, None).contains("no etcd endpoint"));
        assert!(err("10.0.0.1:2379", None, None, None).contains("is not http://"));
        assert!(err("http://10.0.0.1", None, None, None).contains("HOST:PORT"));
        assert!(err("http://10.0.0.1:0", None, None, None).contains("HOST:PORT"));
        assert!(err("ftp://10.0.0.1:2379", Some("/ca"), None, None).contains("scheme"));
        assert!(err("https://10.0.0.1:2379", None, None, None).contains("no CA"));
        assert!(err("http://10.0.0.1:2379", Some("/ca"), None, None).contains("plain http"));
        assert!(err("https://a:1", Some("/ca"), Some("/c"), None).contains("go together"));
        assert!(err("https://a:1", None, Some("/c"), Some("/k")).contains("needs the CA"));
        let ok = EtcdOptions::new("http://a:1, http://b:2", None, None, None).unwrap();
        assert_eq!(ok.endpoints, ["http://a:1", "http://b:2"]);
    }

    #[test]
    fn a_missing_tls_file_is_named() {
        let o = EtcdOptions::new(
            "https://a:1",
            Some("/nonexistent/ca.pem".into()),
            None,
            None,
        )
        .unwrap();
        let e = o.connect_options().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
