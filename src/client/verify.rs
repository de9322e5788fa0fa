//! How the server is verified: the system store, `--ca` certificates or a pin, and the
//! error that says what the server presented.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use super::error::ConnectError;
use super::pin::{format_hex, format_pin};

/// How the server is verified.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The system trust store (SSL_CERT_FILE, or the distribution's bundle).
    System,
    /// Only these PEM certificates: CA certificates, or the server's own self-signed one.
    CaFile(PathBuf),
    /// The SHA-256 of the server's certificate.
    Pin([u8; 32]),
    /// Nothing. Loud, never the default.
    Insecure,
}

/// The certificate verifier: WebPKI with the chosen roots, plus exact matches of self-signed
/// certificates from `--ca` (as OpenSSL accepts them), or a pin. Remembers what the server
/// presented, for the error message.
#[derive(Debug)]
pub(super) struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    ca_certs: Vec<CertificateDer<'static>>,
    pin: Option<[u8; 32]>,
    insecure: bool,
    provider: Arc<CryptoProvider>,
    presented: Mutex<Option<[u8; 32]>>,
}

fn sha256(der: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = sha256(end_entity.as_ref());
        *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = Some(digest);
        if self.insecure {
            return Ok(ServerCertVerified::assertion());
        }
        if let Some(pin) = self.pin {
            // The pin is the identity: no name or chain checks, as with ssh host keys.
            return if pin == digest {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(rustls::Error::General("pin mismatch".into()))
            };
        }
        // A self-signed server certificate given with --ca is trusted as itself, the way
        // OpenSSL treats it; its name must still match. (Its validity dates are not checked:
        // remove a retired certificate from the file.)
        if self
            .ca_certs
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            if rustls::client::verify_server_name(&parsed, server_name).is_ok() {
                return Ok(ServerCertVerified::assertion());
            }
        }
        match &self.webpki {
            Some(webpki) => {
                webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

pub(super) fn read_pem_certs(
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e:?}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

pub(super) fn verifier(
    trust: &Trust,
    provider: &Arc<CryptoProvider>,
) -> Result<Verifier, ConnectError> {
    let mut v = Verifier {
        webpki: None,
        ca_certs: Vec::new(),
        pin: None,
        insecure: false,
        provider: provider.clone(),
        presented: Mutex::new(None),
    };
    let certs = match trust {
        Trust::Insecure => {
            v.insecure = true;
            return Ok(v);
        }
        Trust::Pin(p) => {
            v.pin = Some(*p);
            return Ok(v);
        }
        Trust::CaFile(path) => {
            read_pem_certs(path).map_err(|e| ConnectError::Config(format!("--ca {e}")))?
        }
        Trust::System => {
            // SSL_CERT_FILE, when set, is the only store: a typo must not widen trust.
            let env = std::env::var_os("SSL_CERT_FILE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from);
            let candidates: Vec<PathBuf> = match env {
                Some(p) => vec![p],
                None => SYSTEM_BUNDLES.iter().map(PathBuf::from).collect(),
            };
            let path = candidates.into_iter().find(|p| p.exists()).ok_or_else(|| {
                ConnectError::Config("no system trust store found (install ca-certificates, or set SSL_CERT_FILE); or use --ca FILE or --pin".into())
            })?;
            read_pem_certs(&path).map_err(ConnectError::Config)?
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in &certs {
        // A self-signed leaf may not be a valid anchor; it is still matched exactly below.
        let _ = roots.add(c.clone());
    }
    if !roots.is_empty() {
        let w = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| ConnectError::Config(format!("trust anchors: {e}")))?;
        v.webpki = Some(w);
    }
    v.ca_certs = certs;
    Ok(v)
}

/// The message for a failed handshake: what failed and what to do, with the fingerprint seen.
pub(super) fn tls_error(target: &str, trust: &Trust, v: &Verifier, e: &io::Error) -> ConnectError {
    let presented = *v.presented.lock().unwrap_or_else(|p| p.into_inner());
    let seen = presented.map(|d| format!("{} ({})", format_pin(&d), format_hex(&d)));
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let msg = match (inner, trust, seen) {
        (Some(rustls::Error::General(g)), Trust::Pin(p), Some(seen)) if g == "pin mismatch" => format!(
            "{target}: certificate does not match --pin {}\n  the server presented {seen}; if it changed its certificate on purpose, update the pin",
            format_pin(p)
        ),
        (Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { expected, presented })), _, _) => format!(
            "{target}: the certificate is not valid for {expected:?}; it names {}\n  connect with the name it has, or pass --sni NAME",
            presented.join(", ")
        ),
        (Some(rustls::Error::InvalidCertificate(c)), _, Some(seen)) => format!(
            "{target}: certificate not trusted ({c:?})\n  the server presented {seen}; if sluice serve logs that fingerprint, trust it with --pin {} (or --ca FILE)",
            seen.split(' ').next().unwrap_or_default()
        ),
        _ => format!("{target}: TLS handshake failed: {e}"),
    };
    ConnectError::Tls(msg)
}
