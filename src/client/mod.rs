//! `sluice connect`: the ProxyCommand TLS helper. Connects, verifies the server (system trust
//! store, `--ca`, or `--pin`), sends SNI and ALPN `ssh`, then relays stdin/stdout. Nothing but
//! data goes to stdout; errors are one or two lines on stderr with a sysexits code.

mod pin;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

pub use pin::{format_hex, format_pin, parse_pin};

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

/// What `sluice connect` does.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Host to connect to (name or address).
    pub host: String,
    /// Port.
    pub port: u16,
    /// SNI to send; `None` sends none.
    pub sni: Option<String>,
    /// ALPN ids to offer.
    pub alpn: Vec<Vec<u8>>,
    /// Server verification.
    pub trust: Trust,
    /// Deadline for resolving and connecting (all addresses together) and the handshake.
    pub connect_timeout: Duration,
    /// An HTTP CONNECT proxy to go through.
    pub proxy: Option<Proxy>,
    /// A client certificate chain and key (PEM files) for servers that require one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// An HTTP proxy that tunnels with CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Proxy host.
    pub host: String,
    /// Proxy port.
    pub port: u16,
    /// `user:password` for Basic authentication, if the URL has one.
    pub credentials: Option<String>,
}

impl Proxy {
    /// Parses `http://[user:pass@]host[:port]` (a bare `host:port` is taken as http).
    pub fn parse(url: &str) -> Result<Proxy, String> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) | Some(("HTTP", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "`{url}`: only http:// proxies are supported, not {scheme}://"
                ))
            }
            None => url,
        };
        let rest = rest.trim_end_matches('/');
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hp)) => (
                Some(
                    percent_decode(userinfo)
                        .ok_or_else(|| format!("`{url}`: bad percent-encoding"))?,
                ),
                hp,
            ),
            None => (None, rest),
        };
        let has_port = match hostport.strip_prefix('[') {
            Some(v6) => v6.contains("]:"),
            // As parse_target reads it: a bare IPv6 address has no port.
            None => hostport.matches(':').count() == 1,
        };
        // The host is checked as a `sluice connect` target is, with or without a port.
        let (host, port) = parse_target(hostport)
            .map_err(|_| format!("`{url}` is not http://[user:pass@]host:port"))?;
        let port = if has_port { port } else { 80 };
        Ok(Proxy {
            host,
            port,
            credentials,
        })
    }

    /// The proxy from `HTTPS_PROXY`/`https_proxy` (then `ALL_PROXY`), unless `NO_PROXY` covers
    /// `host`.
    pub fn from_env(host: &str, port: u16) -> Option<Result<Proxy, String>> {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let url = get("HTTPS_PROXY")
            .or_else(|| get("https_proxy"))
            .or_else(|| get("ALL_PROXY"))
            .or_else(|| get("all_proxy"))?;
        let no_proxy = get("NO_PROXY")
            .or_else(|| get("no_proxy"))
            .unwrap_or_default();
        if no_proxy_matches(&no_proxy, host, port) {
            return None;
        }
        Some(Proxy::parse(&url))
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether a `NO_PROXY` list (comma or space separated: `*`, names, `.suffix`, addresses,
/// CIDRs, optional `:port`) covers `host`.
pub fn no_proxy_matches(list: &str, host: &str, port: u16) -> bool {
    let host = host
        .trim_matches(|c| c == '[' || c == ']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let ip: Option<std::net::IpAddr> = host.parse().ok();
    list.split([',', ' '])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|e| {
            if e == "*" {
                return true;
            }
            // An entry may carry a port; then only that port bypasses the proxy.
            let (name, entry_port) = match e.strip_prefix('[') {
                Some(v6) => match v6.split_once(']') {
                    Some((h, rest)) => (
                        h,
                        rest.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()),
                    ),
                    None => (v6, None),
                },
                None => match e.rsplit_once(':') {
                    Some((h, p)) if !h.contains(':') => match p.parse::<u16>() {
                        Ok(p) => (h, Some(p)),
                        Err(_) => (e, None),
                    },
                    _ => (e, None),
                },
            };
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            let name = name
                .trim_end_matches('.')
                .trim_start_matches("*.")
                .trim_start_matches('.')
                .to_ascii_lowercase();
            match ip {
                Some(ip) => crate::net::Cidr::parse(&name).is_some_and(|c| c.contains(ip)),
                None => host == name || host.ends_with(&format!(".{name}")),
            }
        })
}

/// Opens a tunnel through `proxy` with CONNECT.
async fn via_proxy(
    proxy: &Proxy,
    host: &str,
    port: u16,
    deadline: Instant,
) -> Result<TcpStream, ConnectError> {
    let p = format!("{}:{}", proxy.host, proxy.port);
    let mut s = connect_tcp(&proxy.host, proxy.port, deadline)
        .await
        .map_err(|e| ConnectError::Unavailable(format!("proxy {e}")))?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut req = format!(
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: sluice/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(c) = &proxy.credentials {
        req.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            pin::base64(c.as_bytes())
        ));
    }
    req.push_str("\r\n");
    let io_err = |e: io::Error| ConnectError::Unavailable(format!("proxy {p}: {e}"));
    timeout_at(deadline, s.write_all(req.as_bytes()))
        .await
        .map_err(|_| ConnectError::Unavailable(format!("proxy {p}: timed out")))?
        .map_err(io_err)?;
    let reply = read_connect_reply(&mut s, deadline).await.map_err(io_err)?;
    match reply {
        ConnectReply::Established => Ok(s),
        ConnectReply::AuthRequired => Err(ConnectError::Unavailable(format!(
            "proxy {p} requires authentication (407){}",
            if proxy.credentials.is_some() {
                ": it refused the credentials given"
            } else {
                "\n  put them in the proxy URL: http://user:password@host:port"
            }
        ))),
        ConnectReply::Refused(status_line) => Err(ConnectError::Unavailable(format!(
            "proxy {p} refused CONNECT {authority}: {status_line}"
        ))),
    }
}

/// What an HTTP proxy answered to CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectReply {
    /// A 2xx status: the tunnel is open.
    Established,
    /// 407: the proxy wants credentials, or refused the ones given.
    AuthRequired,
    /// Any other status, or no status at all: the reply's first line, trimmed, for the message.
    Refused(String),
}

/// Reads a proxy's reply to CONNECT from `s`: one bounded head (as the built-in HTTP answers
/// read requests), then [`parse_connect_reply`].
pub async fn read_connect_reply<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    deadline: Instant,
) -> io::Result<ConnectReply> {
    let head = crate::builtin::read_head(s, b"", deadline).await?;
    Ok(parse_connect_reply(&head))
}

/// Classifies a CONNECT reply head by the status code of its first line. Pure, no I/O.
pub fn parse_connect_reply(head: &[u8]) -> ConnectReply {
    let status_line =
        String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or_default())
            .trim()
            .to_string();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    match code {
        200..=299 => ConnectReply::Established,
        407 => ConnectReply::AuthRequired,
        _ => ConnectReply::Refused(status_line),
    }
}

/// Why the helper failed; each maps to a sysexits code.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// A file named in the arguments (a CA bundle) is unusable.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// TLS failed: verification or protocol.
    #[error("{0}")]
    Tls(String),
    /// Reading or writing the streams failed after connecting.
    #[error("{0}")]
    Io(String),
}

impl ConnectError {
    /// The sysexits code.
    pub fn exit_code(&self) -> u8 {
        match self {
            ConnectError::Usage(_) => 64,
            ConnectError::Unavailable(_) => 69,
            ConnectError::Io(_) => 74,
            ConnectError::Tls(_) => 76,
            ConnectError::Config(_) => 78,
        }
    }
}

/// Splits `HOST[:PORT]` (`[v6]:port` for IPv6), default port 443.
pub fn parse_target(s: &str) -> Result<(String, u16), ConnectError> {
    let bad = || ConnectError::Usage(format!("`{s}` is not HOST[:PORT]"));
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(bad()),
        }
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').ok_or_else(bad)?;
        (h, Some(p))
    } else {
        (s, None)
    };
    // A name or address only: nothing that could end a line in a proxy request or a log.
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:%".contains(&b))
    {
        return Err(bad());
    }
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        None => 443,
    };
    Ok((host.to_string(), port))
}

/// The certificate verifier: WebPKI with the chosen roots, plus exact matches of self-signed
/// certificates from `--ca` (as OpenSSL accepts them), or a pin. Remembers what the server
/// presented, for the error message.
#[derive(Debug)]
struct Verifier {
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

fn read_pem_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e:?}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

fn verifier(trust: &Trust, provider: &Arc<CryptoProvider>) -> Result<Verifier, ConnectError> {
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

/// Connects and verifies; returns the TLS stream.
pub async fn connect(
    opts: &ConnectOptions,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let provider = crate::tls::provider();
    let verifier = Arc::new(verifier(&opts.trust, &provider)?);
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConnectError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let mut config = match &opts.client_cert {
        None => config.with_no_client_auth(),
        Some((cert, key)) => {
            let chain =
                read_pem_certs(cert).map_err(|e| ConnectError::Config(format!("--cert {e}")))?;
            let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
                ConnectError::Config(format!(
                    "--key {}: no usable private key: {e:?}",
                    key.display()
                ))
            })?;
            config
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ConnectError::Config(format!("--cert/--key: {e}")))?
        }
    };
    config.alpn_protocols = opts.alpn.clone();
    config.enable_sni = opts.sni.is_some();
    let name_str = opts.sni.clone().unwrap_or_else(|| opts.host.clone());
    let name = ServerName::try_from(name_str.trim_matches(|c| c == '[' || c == ']').to_string())
        .map_err(|_| ConnectError::Usage(format!("`{name_str}` is not a valid server name")))?;

    let deadline = Instant::now() + opts.connect_timeout;
    let target = format!("{}:{}", opts.host, opts.port);
    let tcp = match &opts.proxy {
        Some(p) => via_proxy(p, &opts.host, opts.port, deadline).await?,
        None => connect_tcp(&opts.host, opts.port, deadline).await?,
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match timeout_at(deadline, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(tls_error(&target, &opts.trust, &verifier, &e)),
        Err(_) => Err(ConnectError::Unavailable(format!(
            "{target}: TLS handshake timed out"
        ))),
    }
}

/// The message for a failed handshake: what failed and what to do, with the fingerprint seen.
fn tls_error(target: &str, trust: &Trust, v: &Verifier, e: &io::Error) -> ConnectError {
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

async fn connect_tcp(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, ConnectError> {
    let target = format!("{host}:{port}");
    let host = host.trim_matches(|c| c == '[' || c == ']');
    let addrs: Vec<SocketAddr> =
        match timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                return Err(ConnectError::Unavailable(format!(
                    "cannot resolve {host}: {e}"
                )))
            }
            Err(_) => {
                return Err(ConnectError::Unavailable(format!(
                    "{target}: resolving timed out"
                )))
            }
        };
    let mut last = None;
    for (i, a) in addrs.iter().enumerate() {
        // Each address gets a fair share of what is left, so a dead first address (an
        // unreachable AAAA record) does not use up the whole timeout.
        let left = deadline.saturating_duration_since(Instant::now());
        let share = (left / (addrs.len() - i) as u32)
            .max(Duration::from_secs(1))
            .min(left);
        match tokio::time::timeout(share, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = Some(format!("{a}: {e}")),
            Err(_) => last = Some(format!("{a}: timed out")),
        }
    }
    Err(ConnectError::Unavailable(format!(
        "cannot connect to {target}: {}",
        last.unwrap_or_else(|| "no address".into())
    )))
}

/// Connects, then relays stdin to the server and the server to stdout. stdin EOF sends
/// close_notify and FIN while replies keep flowing; server EOF ends it once stdout is flushed.
pub async fn run(opts: &ConnectOptions) -> Result<(), ConnectError> {
    let tls = connect(opts).await?;
    let target = format!("{}:{}", opts.host, opts.port);
    let (mut from_server, mut to_server) = tokio::io::split(tls);
    let up = async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stdin.read(&mut buf).await?;
            if n == 0 {
                return to_server.shutdown().await;
            }
            to_server.write_all(&buf[..n]).await?;
            to_server.flush().await?;
        }
    };
    let down = async move {
        let mut stdout = tokio::io::stdout();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(n) => n,
                // A server that closes without close_notify has still said everything.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                stdout.flush().await?;
                return Ok(total);
            }
            total += n as u64;
            stdout.write_all(&buf[..n]).await?;
            stdout.flush().await?;
        }
    };
    let finish = |r: io::Result<u64>| {
        match r {
        // Nothing at all, not even an SSH banner: the server turned us away after TLS.
        Ok(0) => Err(ConnectError::Unavailable(format!(
            "{target}: the server closed the connection without sending anything\n  does its route require a client certificate (--cert/--key)?"
        ))),
        Ok(_) => Ok(()),
        // Whoever read our stdout (ssh) is gone: nothing left to deliver to.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(ConnectError::Io(format!("{target}: {e}"))),
    }
    };
    tokio::pin!(down);
    tokio::select! {
        r = &mut down => finish(r),
        r = up => match r {
            // stdin is done and our side is closed (or the server stopped reading): keep
            // delivering what the server still sends.
            Ok(()) => finish(down.await),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe || e.kind() == io::ErrorKind::ConnectionReset => finish(down.await),
            Err(e) => Err(ConnectError::Io(format!("{target}: {e}"))),
        },
    }
}

/// Quotes `s` for the shell OpenSSH runs a ProxyCommand with, and escapes `%` for ssh itself.
fn shell_word(s: &str) -> String {
    let s = s.replace('%', "%%");
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@,".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A `~/.ssh/config` block that reaches `host:port` through `sluice connect`.
pub fn ssh_config_block(
    alias: &str,
    host: &str,
    port: u16,
    program: &str,
    trust_args: &[String],
) -> String {
    let mut cmd = vec![shell_word(program), "connect".to_string()];
    cmd.extend(trust_args.iter().map(|a| shell_word(a)));
    // Brackets keep an IPv6 HostName apart from the port; names are fine in them too.
    cmd.push("[%h]:%p".to_string());
    let host_name = host;
    format!(
        "Host {alias}\n  HostName {host_name}\n  Port {port}\n  ProxyCommand {}\n  ServerAliveInterval 30\n  ServerAliveCountMax 3\n",
        cmd.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_config_quoting() {
        let b = ssh_config_block(
            "work",
            "sluice.example.org",
            443,
            "/usr/local/bin/sluice",
            &["--pin".into(), "sha256:ab+/c=".into()],
        );
        assert_eq!(
            b,
            "Host work\n  HostName sluice.example.org\n  Port 443\n  ProxyCommand /usr/local/bin/sluice connect --pin sha256:ab+/c= [%h]:%p\n  ServerAliveInterval 30\n  ServerAliveCountMax 3\n"
        );
        let b = ssh_config_block(
            "x",
            "h",
            8443,
            "/opt/my tools/100%/sluice",
            &["--ca".into(), "/etc/it's.pem".into()],
        );
        assert!(
            b.contains(
                "ProxyCommand '/opt/my tools/100%%/sluice' connect --ca '/etc/it'\\''s.pem' [%h]:%p"
            ),
            "{b}"
        );
    }

    #[test]
    fn proxies() {
        assert_eq!(
            Proxy::parse("http://proxy.corp:3128").unwrap(),
            Proxy {
                host: "proxy.corp".into(),
                port: 3128,
                credentials: None
            }
        );
        assert_eq!(
            Proxy::parse("http://me%40corp:p%3Ass@10.0.0.1:8080/").unwrap(),
            Proxy {
                host: "10.0.0.1".into(),
                port: 8080,
                credentials: Some("me@corp:p:ss".into())
            }
        );
        assert_eq!(Proxy::parse("proxy:3128").unwrap().port, 3128);
        assert_eq!(Proxy::parse("http://proxy").unwrap().port, 80);
        assert!(Proxy::parse("https://proxy:443")
            .unwrap_err()
            .contains("only http://"));
        assert!(Proxy::parse("socks5://p:1080").is_err());
        for (list, host, hit) in [
            ("*", "a.example", true),
            ("example.org", "ssh.example.org", true),
            (".example.org", "example.org", true),
            ("example.org.", "example.org", true),
            ("example.org", "badexample.org", false),
            ("localhost,127.0.0.0/8", "127.0.0.1", true),
            ("10.0.0.0/8 internal", "10.1.2.3", true),
            ("2.3", "10.1.2.3", false),
            ("internal:443", "host.internal", true),
            ("internal:8443", "host.internal", false),
            ("[::1]", "::1", true),
            ("[::1]:443", "::1", true),
            ("", "a", false),
        ] {
            assert_eq!(no_proxy_matches(list, host, 443), hit, "{list} / {host}");
        }
        assert_eq!(Proxy::parse("http://[::1]").unwrap().port, 80);
        assert_eq!(Proxy::parse("http://::1").unwrap().port, 80);
        // Found by fuzzing: a host without a port was not checked at all.
        for bad in [
            "http://proxy\0",
            "http://pro xy",
            "http://[::1]x",
            "http://a\r\nb",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Proxy::parse("http://[::1]:3128").unwrap(),
            Proxy {
                host: "::1".into(),
                port: 3128,
                credentials: None
            }
        );
    }

    #[test]
    fn connect_replies() {
        for ok in [
            &b"HTTP/1.1 200 Connection established\r\n\r\n"[..],
            b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ] {
            assert_eq!(parse_connect_reply(ok), ConnectReply::Established);
        }
        assert_eq!(
            parse_connect_reply(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n"),
            ConnectReply::AuthRequired
        );
        assert_eq!(
            parse_connect_reply(b"HTTP/1.1 403 Access violation\r\nServer: x\r\n\r\n"),
            ConnectReply::Refused("HTTP/1.1 403 Access violation".into())
        );
        assert_eq!(
            parse_connect_reply(b"\xffjunk\r\n\r\n"),
            ConnectReply::Refused("\u{fffd}junk".into())
        );
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("example.org").unwrap(),
            ("example.org".into(), 443)
        );
        assert_eq!(
            parse_target("example.org:8443").unwrap(),
            ("example.org".into(), 8443)
        );
        assert_eq!(parse_target("[::1]:22").unwrap(), ("::1".into(), 22));
        assert_eq!(parse_target("[::1]").unwrap(), ("::1".into(), 443));
        assert_eq!(parse_target("::1").unwrap(), ("::1".into(), 443));
        for bad in ["", ":443", "h:0", "h:x", "[::1", "[::1]x"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
