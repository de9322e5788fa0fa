//! TLS termination: certificate loading, the SNI certificate store and the rustls server config.
//!
//! Certificates are served through [`CertStore`], a `ResolvesServerCert` over an `ArcSwap`, so
//! that a reload can swap them without touching the `ServerConfig` or open connections.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{CertSource, Config, ConfigError, ConfigPath, TlsSettings, TlsVersion};

/// File names of the generated certificate inside the state directory.
pub const SELF_SIGNED_CERT: &str = "tls-cert.pem";
/// File name of the generated key inside the state directory (mode 0600).
pub const SELF_SIGNED_KEY: &str = "tls-key.pem";

/// A TLS setup error.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A configured certificate or key is unusable; reported as a config error.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The self-signed certificate could not be made or stored.
    #[error("self-signed certificate in {}: {message}", dir.display())]
    SelfSigned {
        /// The state directory.
        dir: PathBuf,
        /// What failed.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider used everywhere: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Whether this CPU does AES-GCM in hardware (AES and carry-less multiply instructions).
pub fn aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// sluice's suite order for this CPU, used in the server's order (not the client's). With AES
/// in hardware, AES-128-GCM first, as Mozilla's guidelines, BoringSSL and Go put it: ten rounds
/// instead of fourteen, the same security margin in practice (measured in BENCHMARKS.md);
/// without, ChaCha20-Poly1305 first, which is faster in software and constant-time.
pub fn default_suites() -> Vec<rustls::CipherSuite> {
    use rustls::CipherSuite as C;
    let aes = [
        C::TLS13_AES_128_GCM_SHA256,
        C::TLS13_AES_256_GCM_SHA384,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    let chacha = [
        C::TLS13_CHACHA20_POLY1305_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    let (first, then) = if aes_hardware() {
        (&aes[..], &chacha[..])
    } else {
        (&chacha[..], &aes[..])
    };
    // TLS 1.3 suites before TLS 1.2 ones, for the log's sake (rustls picks per version).
    let mut all: Vec<_> = first.iter().chain(then).copied().collect();
    all.sort_by_key(|s| !crate::config::is_tls13_suite(*s));
    all
}

/// The server's suites, in its order: the configured ones, or `default_suites`.
pub fn server_suites(settings: &TlsSettings) -> Vec<rustls::CipherSuite> {
    settings
        .cipher_suites
        .clone()
        .unwrap_or_else(default_suites)
}

/// One line for the log at start and on reload: the suites in order, the version floor, and
/// why that order.
pub fn describe(settings: &TlsSettings) -> String {
    let names: Vec<&str> = server_suites(settings)
        .into_iter()
        .map(crate::config::cipher_suite_name)
        .collect();
    let origin = match (&settings.cipher_suites, aes_hardware()) {
        (Some(_), _) => "configured",
        (None, true) => "default: AES instructions present",
        (None, false) => "default: no AES instructions",
    };
    format!(
        "TLS {}+, server order ({origin}): {}",
        settings.min_version,
        names.join(", ")
    )
}

/// aws-lc-rs with only `suites`, in that order.
fn server_provider(suites: &[rustls::CipherSuite]) -> CryptoProvider {
    let base = rustls::crypto::aws_lc_rs::default_provider();
    let cipher_suites = suites
        .iter()
        .filter_map(|want| {
            base.cipher_suites
                .iter()
                .find(|s| s.suite() == *want)
                .copied()
        })
        .collect();
    CryptoProvider {
        cipher_suites,
        ..base
    }
}

/// The certificates in force: a default one and extra ones by server name.
#[derive(Debug)]
pub struct Certs {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain: `*.example.com` is stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// SHA-256 of the default leaf certificate.
    pub fingerprint: String,
    /// Whether the default certificate was generated (self-signed).
    pub self_signed: bool,
}

impl Certs {
    fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = sni else {
            return &self.default;
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return k;
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return k;
            }
        }
        &self.default
    }
}

/// The certificate resolver handed to rustls; [`CertStore::replace`] swaps its contents.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<Certs>,
}

impl CertStore {
    /// A store serving `certs`.
    pub fn new(certs: Certs) -> Self {
        CertStore {
            current: ArcSwap::from_pointee(certs),
        }
    }

    /// The certificates in force.
    pub fn current(&self) -> Arc<Certs> {
        self.current.load_full()
    }

    /// Serves `certs` to new handshakes from now on.
    pub fn replace(&self, certs: Certs) {
        self.current.store(Arc::new(certs));
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().pick(hello.server_name()).clone())
    }
}

/// Loads every certificate the config names (or makes the self-signed one in `state_dir`).
pub fn load_certs(cfg: &Config, state_dir: &Path) -> Result<Certs, TlsError> {
    let provider = provider();
    let (default, self_signed) = match &cfg.tls.cert {
        CertSource::Files { cert, key } => (
            load_pair(cert, key, &provider, cfg.source.as_deref())?,
            false,
        ),
        CertSource::SelfSigned => {
            // Tunnel visitors come as NAME.<domain>: the certificate covers them too.
            let wildcard = cfg.tunnels.as_ref().map(|t| format!("*.{}", t.domain));
            (
                self_signed(state_dir, &provider, wildcard.as_deref())?,
                true,
            )
        }
    };
    let fingerprint = fingerprint(&default.cert[0]);
    let mut certs = Certs {
        default,
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        fingerprint,
        self_signed,
    };
    for s in &cfg.tls.sni {
        let ck = load_pair(&s.cert, &s.key, &provider, cfg.source.as_deref())?;
        for name in &s.names {
            check_name(&ck, name)
                .map_err(|m| ConfigError::at(cfg.source.as_deref(), &s.cert.at, m))?;
            match name.strip_prefix("*.") {
                Some(parent) => certs.wildcard.insert(parent.to_string(), ck.clone()),
                None => certs.exact.insert(name.clone(), ck.clone()),
            };
        }
    }
    Ok(certs)
}

impl Certs {
    /// Whether the certificate sluice picks for `name` (`*.example.org` for any name under it)
    /// is valid for it, as a client would check; the reason when not.
    pub fn covers(&self, name: &str) -> Result<(), String> {
        let probe = match name.strip_prefix("*.") {
            Some(parent) => format!("sluice-name-check.{parent}"),
            None => name.to_string(),
        };
        check_name(self.pick(Some(&probe)), name)
    }
}

/// Checks that the certificate is valid for `name`, as a client would.
fn check_name(ck: &Arc<CertifiedKey>, name: &str) -> Result<(), String> {
    // rustls's own SNI resolver verifies the name against the certificate when adding it.
    let probe = match name.strip_prefix("*.") {
        Some(parent) => format!("sluice-name-check.{parent}"),
        None => name.to_string(),
    };
    let dns = rustls_pki_types::DnsName::try_from(probe.as_str())
        .map_err(|_| format!("`{name}` is not a DNS name"))?;
    let mut r = rustls::server::ResolvesServerCertUsingSni::new();
    r.add(dns.to_lowercase_owned().as_ref(), CertifiedKey::clone(ck))
        .map_err(|e| format!("the certificate is not valid for `{name}`: {e}"))
}

fn load_pair(
    cert: &ConfigPath,
    key: &ConfigPath,
    provider: &CryptoProvider,
    file: Option<&Path>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_chain(&cert.path).map_err(|m| ConfigError::at(file, &cert.at, m))?;
    let key_der = PrivateKeyDer::from_pem_file(&key.path).map_err(|e| {
        ConfigError::at(
            file,
            &key.at,
            format!(
                "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {}",
                key.path.display(),
                pem_error(&e)
            ),
        )
    })?;
    let ck = CertifiedKey::from_der(chain, key_der, provider).map_err(|e| {
        ConfigError::at(
            file,
            &key.at,
            format!(
                "{} does not fit certificate {}: {e}",
                key.path.display(),
                cert.path.display()
            ),
        )
    })?;
    Ok(Arc::new(ck))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {}", path.display(), pem_error(&e)))?;
    let chain = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {}", path.display(), pem_error(&e)))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(chain)
}

fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no matching PEM section found".to_string(),
        other => format!("{other:?}"),
    }
}

/// Loads the self-signed certificate from `dir`, or makes one there on first start (and
/// again when the one there does not cover `wildcard`, the tunnel domain's `*.<domain>`).
fn self_signed(
    dir: &Path,
    provider: &CryptoProvider,
    wildcard: Option<&str>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let err = |message: String| TlsError::SelfSigned {
        dir: dir.to_path_buf(),
        message,
    };
    let (cert_path, key_path) = (dir.join(SELF_SIGNED_CERT), dir.join(SELF_SIGNED_KEY));
    if cert_path.exists() && key_path.exists() {
        let chain = read_chain(&cert_path).map_err(err)?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| err(format!("{}: {}", key_path.display(), pem_error(&e))))?;
        let ck =
            Arc::new(CertifiedKey::from_der(chain, key, provider).map_err(|e| err(e.to_string()))?);
        match wildcard.map(|w| check_name(&ck, w)) {
            None | Some(Ok(())) => return Ok(ck),
            Some(Err(_)) => tracing::info!(
                "the self-signed certificate in {} does not cover {}: making a new one",
                dir.display(),
                wildcard.unwrap_or_default()
            ),
        }
    }
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Some(h) = hostname() {
        names.push(h);
    }
    names.extend(wildcard.map(str::to_string));
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| err(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sluice self-signed");
    let key_pair = rcgen::KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| err(e.to_string()))?;
    crate::state::ensure_dir(dir).map_err(|e| err(e.to_string()))?;
    crate::state::write_private(&key_path, key_pair.serialize_pem().as_bytes())
        .map_err(|e| err(e.to_string()))?;
    crate::state::write_public(&cert_path, cert.pem().as_bytes())
        .map_err(|e| err(e.to_string()))?;
    let key = PrivateKeyDer::try_from(key_pair.serialize_der()).map_err(|e| err(e.to_string()))?;
    let ck = CertifiedKey::from_der(vec![cert.der().clone()], key, provider)
        .map_err(|e| err(e.to_string()))?;
    Ok(Arc::new(ck))
}

fn hostname() -> Option<String> {
    // uname(2), not /proc/sys/kernel/hostname: hardened units hide /proc/sys (ProcSubset=pid).
    let h = crate::sys::hostname()?;
    let h = h.trim().to_ascii_lowercase();
    let valid = !h.is_empty()
        && h != "localhost"
        && h.split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    valid.then_some(h)
}

/// SHA-256 of a certificate, as `openssl x509 -fingerprint -sha256` prints it: `AB:CD:...`.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Session-ticket keys (rotating), made once per process so that reloads keep resumption.
pub fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, TlsError> {
    Ok(rustls::crypto::aws_lc_rs::Ticketer::new()?)
}

/// TLS 1.3 session tickets sent after a full handshake (rustls and OpenSSL send two). One is
/// enough for a client that reconnects one connection at a time (`sluice connect` under ssh,
/// a device's tunnel), since every resumed connection gets a fresh one, and tickets are meant
/// for one use (RFC 8446, C.4); each ticket costs an HKDF derivation, an encryption and a
/// record on every handshake (BENCHMARKS.md, issue 16). A client opening several connections
/// at once resumes one of them.
pub const TLS13_TICKETS: usize = 1;

/// The client-certificate verifier of a server config, kept to re-verify resumed sessions.
pub type ClientVerifier = Arc<dyn rustls::server::danger::ClientCertVerifier>;

/// The rustls server config: TLS 1.2 (unless `min_version` is 1.3) and 1.3, the suites in
/// the server's order (`server_suites`), certificates from `store`, the routes' ALPN ids,
/// session tickets from `ticketer`, and, with `client_ca`, client certificates verified when
/// offered (routes decide whether one is required), with that verifier.
pub fn server_config(
    store: Arc<CertStore>,
    alpn: Vec<Vec<u8>>,
    settings: &TlsSettings,
    file: Option<&Path>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
) -> Result<(Arc<ServerConfig>, Option<ClientVerifier>), TlsError> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder =
        ServerConfig::builder_with_provider(Arc::new(server_provider(&server_suites(settings))))
            .with_protocol_versions(versions)?;
    let client_ca = settings.client_ca.as_ref().map(|c| (c, file));
    let mut client_verifier = None;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some((ca, file)) => {
            let bad = |m: String| ConfigError::at(file, &ca.at, m);
            let mut roots = rustls::RootCertStore::empty();
            for c in read_chain(&ca.path).map_err(bad)? {
                roots
                    .add(c)
                    .map_err(|e| bad(format!("{}: {e}", ca.path.display())))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad(format!("{}: {e}", ca.path.display())))?;
            client_verifier = Some(verifier.clone());
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_cert_resolver(store);
    cfg.alpn_protocols = alpn;
    cfg.ticketer = ticketer;
    // The server's order decides: clients (OpenSSL, rustls) list AES-256-GCM first.
    cfg.ignore_client_order = true;
    cfg.send_tls13_tickets = TLS13_TICKETS;
    Ok((Arc::new(cfg), client_verifier))
}

/// Why a resumed session's client certificate no longer passes.
#[derive(Debug, thiserror::Error)]
pub enum ResumedCertError {
    /// No CA is configured any more.
    #[error("no tls.client_ca is configured now")]
    NoVerifier,
    /// The chain restored from the ticket fails the current CA at the current time.
    #[error("{0}")]
    Rejected(rustls::Error),
}

/// Re-verifies the chain a resumed session restored from its ticket against the verifier in
/// force now, at the current time: a ticket (and every ticket issued on a resumption) carries
/// the chain of the first handshake, which may have expired or lost its CA since.
pub fn reverify_resumed(
    verifier: Option<&ClientVerifier>,
    chain: &[CertificateDer<'static>],
) -> Result<(), ResumedCertError> {
    let verifier = verifier.ok_or(ResumedCertError::NoVerifier)?;
    let (leaf, intermediates) = chain.split_first().ok_or(ResumedCertError::Rejected(
        rustls::Error::NoCertificatesPresented,
    ))?;
    verifier
        .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(ResumedCertError::Rejected)
}

/// Every file the certificates in `cfg` come from, the client CA included (watched for
/// renewals).
pub fn cert_files(cfg: &Config) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let CertSource::Files { cert, key } = &cfg.tls.cert {
        files.extend([cert.path.clone(), key.path.clone()]);
    }
    if let Some(ca) = &cfg.tls.client_ca {
        files.push(ca.path.clone());
    }
    for s in &cfg.tls.sni {
        files.extend([s.cert.path.clone(), s.key.path.clone()]);
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_order_offers_every_suite_tls13_first_fastest_first() {
        use rustls::CipherSuite as C;
        let order = default_suites();
        assert_eq!(order.len(), crate::config::CIPHER_SUITES.len());
        let first_tls12 = order
            .iter()
            .position(|s| !crate::config::is_tls13_suite(*s))
            .unwrap();
        assert!(order[first_tls12..]
            .iter()
            .all(|s| !crate::config::is_tls13_suite(*s)));
        let (first13, first12) = if aes_hardware() {
            (
                C::TLS13_AES_128_GCM_SHA256,
                C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            )
        } else {
            (
                C::TLS13_CHACHA20_POLY1305_SHA256,
                C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            )
        };
        assert_eq!((order[0], order[first_tls12]), (first13, first12));
        // The provider keeps that order.
        let p = server_provider(&order);
        let got: Vec<_> = p.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(got, order);
    }
}
