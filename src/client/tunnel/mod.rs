//! `sluice tunnel`: `-L`, `-R` and `-D` forwards over SSH without OpenSSH, through the same
//! TLS connector as `sluice connect` (or plain TCP to any sshd), that come back by themselves.
//!
//! One supervisor ([`run`]) keeps one SSH session up: it connects, checks the host key,
//! authenticates, asks for the `-R` forwards, then waits for the session to end and connects
//! again after a backoff with jitter, forever. Local listeners (`-L`, `-D`) are bound once, before
//! the first connection, and stay bound across reconnects: a local client that comes while the
//! link is down waits for it (up to the connect timeout) and is reset at worst. An `-R` that
//! asked for port 0 asks for the port it got the first time when it comes back, and tunnel
//! names are kept for their owner by the server.
//!
//! `spec` parses forwards, `known_hosts` checks host keys, `identity` loads keys, `socks` is
//! the `-D` handshake; this file holds the session and the forwards.

mod bundle;
mod device;
mod identity;
mod known_hosts;
mod socks;
mod spec;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{Handle, Msg};
use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use bundle::{Bundle, BundleKey};
pub use device::DeviceConfig;
pub use identity::{cert_beside, default_files, load as load_key, Credentials, Key, KeySource};
pub use known_hosts::{
    check as check_known_hosts, default_path as known_hosts_path, host_label, line_for, Verdict,
};
pub use socks::{parse_greeting, parse_request, SocksError};
pub use spec::{Endpoint, Forward};

use super::{ConnectError, ConnectOptions};

/// How the SSH bytes travel.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Inside TLS to a sluice (SNI, ALPN `ssh`, verification): `ConnectOptions` says how.
    Tls(Box<ConnectOptions>),
    /// Plain TCP to any sshd.
    Tcp,
}

/// How the server's host key is checked.
#[derive(Debug, Clone)]
pub enum HostKeys {
    /// OpenSSH's known_hosts file; `accept_new` records a host seen for the first time
    /// (StrictHostKeyChecking=accept-new).
    KnownHosts {
        /// The file.
        path: PathBuf,
        /// Record unknown hosts instead of refusing them.
        accept_new: bool,
    },
    /// Only keys with these `SHA256:...` fingerprints (`--host-key`, a grant bundle's keys).
    Pinned(Vec<String>),
}

/// Reconnect delays: `first`, doubling up to `max`, each with up to half of it random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub first: Duration,
    /// The longest.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before attempt `n` (0: the first retry): half of the step fixed, half
    /// random ("equal jitter"), so a fleet cut off at once does not come back at once.
    pub fn delay(&self, n: u32, random: u64) -> Duration {
        let step = self
            .first
            .saturating_mul(1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        let half = step / 2;
        let spread = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_millis(random % spread)
    }
}

/// Everything a tunnel needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Server host (name or address).
    pub host: String,
    /// Server port.
    pub port: u16,
    /// TLS or plain TCP.
    pub transport: Transport,
    /// The SSH user name.
    pub user: String,
    /// Keys to authenticate with.
    pub credentials: Credentials,
    /// How the host key is checked.
    pub host_keys: HostKeys,
    /// The forwards.
    pub forwards: Vec<Forward>,
    /// A dead link is noticed within this (SSH keepalives and TCP_USER_TIMEOUT).
    pub keepalive: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// Deadline for connecting, TLS, SSH key exchange and authentication together.
    pub connect_timeout: Duration,
}

/// Where the tunnel is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Connecting (attempt `attempt`, 0 the first).
    Connecting {
        /// How many attempts failed before this one.
        attempt: u32,
    },
    /// Connected, forwards in place.
    Connected,
    /// Waiting to connect again.
    Waiting {
        /// For how long.
        delay: Duration,
        /// Why the last session ended or the last attempt failed.
        why: String,
    },
    /// Stopped (asked to).
    Stopped,
}

impl State {
    /// A short name, for metrics labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Connecting { .. } => "connecting",
            State::Connected => "connected",
            State::Waiting { .. } => "waiting",
            State::Stopped => "stopped",
        }
    }
}

/// Why a tunnel gave up (only ever before its first session; after one, it retries).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Bad options or an unusable key file.
    #[error("{0}")]
    Config(String),
    /// A local listener could not be bound.
    #[error("{forward}: cannot listen on {listen}: {error}")]
    Bind {
        /// The forward.
        forward: String,
        /// Its address.
        listen: String,
        /// Why.
        error: std::io::Error,
    },
    /// The server's host key is not the one expected.
    #[error("{0}")]
    HostKey(String),
    /// TLS verification or protocol failed.
    #[error("{0}")]
    Tls(String),
    /// No key was accepted.
    #[error("{0}")]
    Auth(String),
    /// The server refused a forward.
    #[error("{0}")]
    Forward(String),
    /// The server could not be reached or the session failed.
    #[error("{0}")]
    Unavailable(String),
}

/// What the forward tasks share with the session: the live link, if any.
type Link = Arc<Handle<Client>>;

/// The `-R` forwards the server holds for this session: (address asked for, port it gave)
/// to where this side connects.
type Remotes = Arc<Mutex<HashMap<(String, u32), Endpoint>>>;

/// The SSH client's callbacks.
pub struct Client {
    host: String,
    port: u16,
    host_keys: HostKeys,
    /// Why the host key was refused, for the error.
    refusal: Arc<Mutex<Option<TunnelError>>>,
    remotes: Remotes,
    /// Why the session ended, as the disconnect callback saw it.
    ended_why: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
    /// Dropped with the session: wakes the supervisor.
    _ended: oneshot::Sender<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    fn check_host_key(&self, key: &PublicKey) -> Result<(), TunnelError> {
        let fp = known_hosts::fingerprint(key);
        match &self.host_keys {
            HostKeys::Pinned(pins) => {
                if pins.iter().any(|p| p == &fp) {
                    Ok(())
                } else {
                    Err(TunnelError::HostKey(format!(
                        "{}:{}: the server's host key {fp} is not the one expected ({})",
                        self.host,
                        self.port,
                        pins.join(", ")
                    )))
                }
            }
            HostKeys::KnownHosts { path, accept_new } => {
                let text = match std::fs::read_to_string(path) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(TunnelError::Config(format!("{}: {e}", path.display()))),
                };
                let label = host_label(&self.host, self.port);
                let line = line_for(&self.host, self.port, key);
                match known_hosts::check(&text, &label, key) {
                    Verdict::Known => Ok(()),
                    Verdict::Unknown if *accept_new => {
                        known_hosts::append(path, &line).map_err(|e| {
                            TunnelError::Config(format!("{}: cannot record the host key: {e}", path.display()))
                        })?;
                        warn!(target: "sluice::tunnel", host = label, key = fp, file = %path.display(), "host key recorded for a host seen for the first time");
                        Ok(())
                    }
                    Verdict::Unknown => Err(TunnelError::HostKey(format!(
                        "{label}: the server's host key is not known: {fp}\n  if that is the server's key, add this line to {}:\n  {line}\n  (or run once with --accept-new)",
                        path.display()
                    ))),
                    Verdict::Changed { lines } => Err(TunnelError::HostKey(format!(
                        "{label}: THE SERVER'S HOST KEY HAS CHANGED: it sent {fp}, which is not the key {} line {} holds for it; someone may be in the middle. Refused.",
                        path.display(),
                        lines.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                    ))),
                    Verdict::Revoked { line } => Err(TunnelError::HostKey(format!(
                        "{label}: the server's host key {fp} is marked @revoked ({} line {line}). Refused.",
                        path.display()
                    ))),
                }
            }
        }
    }
}

impl russh::client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = key.public_key();
        match self.check_host_key(&key) {
            Ok(()) => Ok(true),
            Err(e) => {
                *lock(&self.refusal) = Some(e);
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        let target = {
            let remotes = lock(&self.remotes);
            remotes
                .get(&(connected_address.to_string(), connected_port))
                .cloned()
                // A server may name the forward differently (an address for a name):
                // the port alone decides when only one forward has it.
                .or_else(|| {
                    let mut by_port = remotes
                        .iter()
                        .filter(|((_, p), _)| *p == connected_port)
                        .map(|(_, t)| t);
                    match (by_port.next(), by_port.next()) {
                        (Some(t), None) => Some(t.clone()),
                        _ => None,
                    }
                })
        };
        let Some(target) = target else {
            warn!(target: "sluice::tunnel", address = connected_address, port = connected_port, "the server opened a channel for a forward this client did not ask for: refused");
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let from = format!("{originator_address}:{originator_port}");
        let stop = self.stop.clone();
        // Connecting takes time: never on the session loop.
        tokio::spawn(async move {
            let tcp = tokio::time::timeout(
                LOCAL_CONNECT_TIMEOUT,
                TcpStream::connect((target.host.as_str(), target.port)),
            )
            .await;
            match tcp {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    reply.accept().await;
                    debug!(target: "sluice::tunnel", from, to = %target, "-R connection");
                    relay(channel, tcp, &stop).await;
                }
                Ok(Err(e)) => {
                    warn!(target: "sluice::tunnel", from, to = %target, error = %e, "-R: cannot connect to the local target");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
                Err(_) => {
                    warn!(target: "sluice::tunnel", from, to = %target, "-R: the local target did not answer within {LOCAL_CONNECT_TIMEOUT:?}");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: russh::client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let why = match &reason {
            russh::client::DisconnectReason::ReceivedDisconnect(info) => {
                format!(
                    "the server ended the session: {}",
                    crate::text::clean(&info.message)
                )
            }
            russh::client::DisconnectReason::Error(russh::Error::KeepaliveTimeout) => {
                "the server stopped answering keepalives (a dead link?)".to_string()
            }
            russh::client::DisconnectReason::Error(e) => format!("the session failed: {e}"),
        };
        *lock(&self.ended_why) = Some(why);
        match reason {
            russh::client::DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            russh::client::DisconnectReason::Error(e) => Err(e),
        }
    }
}

/// How long a local target (`-R`'s) gets to accept.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a channel open through the server may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

async fn relay(channel: Channel<Msg>, mut tcp: TcpStream, stop: &CancellationToken) {
    let mut stream = channel.into_stream();
    // Forwards are long-lived by nature (a database session, an admin port): no idle cut
    // while both directions are open.
    let idle = crate::relay::Idle::new(Duration::from_secs(365 * 24 * 3600));
    let (bytes, end) = crate::relay::relay(&mut stream, &mut tcp, idle, stop).await;
    debug!(target: "sluice::tunnel", up = bytes.up, down = bytes.down, end = ?end, "channel closed");
}

/// A local listener (`-L`, `-D`) for a forward.
struct Bound {
    forward: Forward,
    listener: TcpListener,
}

async fn bind(forward: &Forward) -> Result<Option<Bound>, TunnelError> {
    let listen = match forward {
        Forward::Local { listen, .. } | Forward::Dynamic { listen } => listen,
        Forward::Remote { .. } => return Ok(None),
    };
    let host = if listen.host.is_empty() {
        "0.0.0.0"
    } else {
        listen.host.as_str()
    };
    let listener = TcpListener::bind((host, listen.port))
        .await
        .map_err(|error| TunnelError::Bind {
            forward: forward.to_string(),
            listen: listen.to_string(),
            error,
        })?;
    if let Ok(a) = listener.local_addr() {
        info!(target: "sluice::tunnel", forward = %forward, listen = %a, "listening");
    }
    Ok(Some(Bound {
        forward: forward.clone(),
        listener,
    }))
}

/// The live link, waiting up to `wait` for one while disconnected.
async fn link(links: &mut watch::Receiver<Option<Link>>, wait: Duration) -> Option<Link> {
    let got = tokio::time::timeout(
        wait,
        links.wait_for(|l| l.as_ref().is_some_and(|l| !l.is_closed())),
    )
    .await;
    match got {
        Ok(Ok(l)) => l.clone(),
        _ => None,
    }
}

/// Resets a local client that cannot be served (RST, not a silent close).
fn refuse(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

async fn open(link: &Link, to: &Endpoint, from: SocketAddr) -> Result<Channel<Msg>, String> {
    let opening = link.channel_open_direct_tcpip(
        to.host.clone(),
        u32::from(to.port),
        from.ip().to_string(),
        u32::from(from.port()),
    );
    match tokio::time::timeout(OPEN_TIMEOUT, opening).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("the server refused: {e}")),
        Err(_) => Err(format!("no answer from the server within {OPEN_TIMEOUT:?}")),
    }
}

/// Accepts on one listener until `stop`.
async fn serve_local(
    b: Bound,
    links: watch::Receiver<Option<Link>>,
    wait: Duration,
    stop: CancellationToken,
) {
    loop {
        let (tcp, from) = tokio::select! {
            r = b.listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, usually: wait rather than spin.
                    warn!(target: "sluice::tunnel", forward = %b.forward, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let mut links = links.clone();
        let forward = b.forward.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            match forward {
                Forward::Local { ref target, .. } => {
                    let Some(l) = link(&mut links, wait).await else {
                        warn!(target: "sluice::tunnel", forward = %forward, %from, "not connected to the server: connection reset");
                        return refuse(tcp);
                    };
                    match open(&l, target, from).await {
                        Ok(ch) => relay(ch, tcp, &stop).await,
                        Err(e) => {
                            warn!(target: "sluice::tunnel", forward = %forward, %from, error = e, "cannot open a channel");
                            refuse(tcp);
                        }
                    }
                }
                Forward::Dynamic { .. } => socks_client(tcp, from, &mut links, wait, &stop).await,
                Forward::Remote { .. } => {}
            }
        });
    }
}

async fn socks_client(
    mut tcp: TcpStream,
    from: SocketAddr,
    links: &mut watch::Receiver<Option<Link>>,
    wait: Duration,
    stop: &CancellationToken,
) {
    use tokio::io::AsyncWriteExt;
    let to = match socks::accept(&mut tcp).await {
        Ok(to) => to,
        Err(e) => {
            debug!(target: "sluice::tunnel", %from, error = %e, "SOCKS handshake failed");
            return;
        }
    };
    let Some(l) = link(links, wait).await else {
        let _ = tcp.write_all(&socks::reply(0x01)).await;
        warn!(target: "sluice::tunnel", %from, to = %to, "-D: not connected to the server");
        return;
    };
    match open(&l, &to, from).await {
        Ok(ch) => {
            if tcp.write_all(&socks::reply(0x00)).await.is_ok() {
                relay(ch, tcp, stop).await;
            }
        }
        Err(e) => {
            // 0x05: connection refused, which is what a failed open usually means.
            let _ = tcp.write_all(&socks::reply(0x05)).await;
            debug!(target: "sluice::tunnel", %from, to = %to, error = e, "-D: cannot open a channel");
        }
    }
}

/// One SSH session, authenticated, with its `-R` forwards in place.
struct Session {
    link: Link,
    ended: oneshot::Receiver<()>,
    ended_why: Arc<Mutex<Option<String>>>,
}

/// Why one attempt failed; `first_only` errors end the tunnel if it never had a session.
struct Failed {
    error: TunnelError,
}

impl From<TunnelError> for Failed {
    fn from(error: TunnelError) -> Self {
        Failed { error }
    }
}

fn config(opts: &Options) -> russh::client::Config {
    // Keepalives every third of the bound; the third unanswered one ends the session.
    let interval = (opts.keepalive / 3).max(Duration::from_millis(100));
    russh::client::Config {
        keepalive_interval: Some(interval),
        keepalive_max: 2,
        inactivity_timeout: None,
        nodelay: true,
        // As OpenSSH's client: 2 MiB windows and 32 KiB packets.
        window_size: 2 * 1024 * 1024,
        maximum_packet_size: 32 * 1024,
        // AES-GCM first: the CPUs this runs on have AES instructions, where it costs less
        // than ChaCha20-Poly1305 (russh's first choice); the client's order decides.
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(&[
                russh::cipher::AES_128_GCM,
                russh::cipher::AES_256_GCM,
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_256_CTR,
                russh::cipher::AES_128_CTR,
            ]),
            ..russh::Preferred::DEFAULT
        },
        ..Default::default()
    }
}

/// Connects the transport.
async fn dial(opts: &Options) -> Result<Box<dyn Stream>, TunnelError> {
    // A dead link with data in flight is noticed by the kernel within the keepalive bound
    // too (unacknowledged data); without it a write can wait for minutes.
    let user_timeout = |tcp: &TcpStream| {
        let ms = u32::try_from(opts.keepalive.as_millis()).unwrap_or(u32::MAX);
        let _ = rustix::net::sockopt::set_tcp_user_timeout(tcp, ms);
        let _ = tcp.set_nodelay(true);
    };
    match &opts.transport {
        Transport::Tls(c) => {
            let tls = super::connect(c).await.map_err(|e| match e {
                ConnectError::Usage(m) | ConnectError::Config(m) => TunnelError::Config(m),
                ConnectError::Tls(m) => TunnelError::Tls(m),
                ConnectError::Unavailable(m) | ConnectError::Io(m) => TunnelError::Unavailable(m),
            })?;
            user_timeout(tls.get_ref().0);
            Ok(Box::new(tls))
        }
        Transport::Tcp => {
            let deadline = tokio::time::Instant::now() + opts.connect_timeout;
            let tcp = super::dial::connect_tcp(&opts.host, opts.port, deadline)
                .await
                .map_err(|e| TunnelError::Unavailable(e.to_string()))?;
            user_timeout(&tcp);
            Ok(Box::new(tcp))
        }
    }
}

/// What the SSH session runs over.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Stream for S {}

async fn authenticate(handle: &mut Handle<Client>, opts: &Options) -> Result<(), TunnelError> {
    use russh::client::AuthResult;
    let user = opts.user.as_str();
    let mut tried = Vec::new();
    let rsa = handle.best_supported_rsa_hash().await.ok().flatten();
    let ok = |r: Result<AuthResult, russh::Error>| matches!(r, Ok(AuthResult::Success));
    for k in &opts.credentials.keys {
        if let Some(cert) = &k.certificate {
            if ok(handle
                .authenticate_openssh_cert(user, k.key.clone(), cert.clone())
                .await)
            {
                return Ok(());
            }
            tried.push(format!("{} (certificate)", k.from));
        }
        if ok(handle
            .authenticate_publickey(user, identity::with_hash(&k.key, rsa))
            .await)
        {
            return Ok(());
        }
        tried.push(k.from.clone());
    }
    if opts.credentials.agent {
        match russh::keys::agent::client::AgentClient::connect_env().await {
            Ok(mut agent) => {
                let ids = agent.request_identities().await.unwrap_or_default();
                for id in ids {
                    use russh::keys::agent::AgentIdentity;
                    let r = match &id {
                        AgentIdentity::PublicKey { key, .. } => {
                            let hash = if key.algorithm().is_rsa() {
                                rsa.unwrap_or(Some(HashAlg::Sha512))
                            } else {
                                None
                            };
                            handle
                                .authenticate_publickey_with(user, key.clone(), hash, &mut agent)
                                .await
                        }
                        AgentIdentity::Certificate { certificate, .. } => {
                            handle
                                .authenticate_certificate_with(
                                    user,
                                    certificate.clone(),
                                    None,
                                    &mut agent,
                                )
                                .await
                        }
                    };
                    if matches!(r, Ok(AuthResult::Success)) {
                        return Ok(());
                    }
                    tried.push(format!(
                        "agent key {}",
                        known_hosts::fingerprint(&id_key(&id))
                    ));
                }
            }
            Err(e) => tried.push(format!("ssh-agent ({e})")),
        }
    }
    if tried.is_empty() {
        return Err(TunnelError::Config(
            "no key to authenticate with: give -i FILE or SSH_KEY, or run ssh-agent (SSH_AUTH_SOCK)".into(),
        ));
    }
    Err(TunnelError::Auth(format!(
        "{}@{}:{}: the server accepted none of: {}",
        user,
        opts.host,
        opts.port,
        tried.join(", ")
    )))
}

fn id_key(id: &russh::keys::agent::AgentIdentity) -> PublicKey {
    match id {
        russh::keys::agent::AgentIdentity::PublicKey { key, .. } => key.clone(),
        russh::keys::agent::AgentIdentity::Certificate { certificate, .. } => {
            PublicKey::new(certificate.public_key().clone(), "")
        }
    }
}

/// The ports the server gave `-R` forwards that asked for 0, kept for reconnects.
type Assigned = HashMap<Forward, u16>;

async fn session(
    opts: &Options,
    remotes: &Remotes,
    assigned: &mut Assigned,
    stop: &CancellationToken,
) -> Result<Session, Failed> {
    let stream = dial(opts).await?;
    let refusal = Arc::new(Mutex::new(None));
    let ended_why = Arc::new(Mutex::new(None));
    let (tx, ended) = oneshot::channel();
    let client = Client {
        host: opts.host.clone(),
        port: opts.port,
        host_keys: opts.host_keys.clone(),
        refusal: refusal.clone(),
        remotes: remotes.clone(),
        ended_why: ended_why.clone(),
        stop: stop.clone(),
        _ended: tx,
    };
    let mut handle = match russh::client::connect_stream(Arc::new(config(opts)), stream, client)
        .await
    {
        Ok(h) => h,
        Err(e) => {
            if let Some(r) = lock(&refusal).take() {
                return Err(r.into());
            }
            // Turned away after TLS, before a banner: as `sluice connect` says, the usual
            // cause is a route that wants a client certificate.
            let closed = matches!(&e, russh::Error::Disconnect)
                || matches!(&e, russh::Error::IO(io) if io.kind() == std::io::ErrorKind::UnexpectedEof);
            let hint = match &opts.transport {
                Transport::Tls(c) if closed && c.client_cert.is_none() => {
                    " (closed before the SSH banner: does the server's route require a client certificate, --cert/--key?)"
                }
                _ => "",
            };
            return Err(TunnelError::Unavailable(format!(
                "{}:{}: SSH: {e}{hint}",
                opts.host, opts.port
            ))
            .into());
        }
    };
    authenticate(&mut handle, opts).await?;
    lock(remotes).clear();
    for f in &opts.forwards {
        let Forward::Remote { listen, target } = f else {
            continue;
        };
        let ask = assigned.get(f).copied().unwrap_or(listen.port);
        match handle
            .tcpip_forward(listen.host.clone(), u32::from(ask))
            .await
        {
            Ok(got) => {
                // A server answers 0 when it took the port asked for.
                let port = if got == 0 { u32::from(ask) } else { got };
                if listen.port == 0 {
                    if let Ok(p) = u16::try_from(port) {
                        assigned.insert(f.clone(), p);
                    }
                }
                info!(target: "sluice::tunnel", forward = %f, listen = %format!("{}:{port}", listen.host), to = %target, "remote forward in place");
                lock(remotes).insert((listen.host.clone(), port), target.clone());
            }
            Err(e) => {
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, "forward refused", "")
                    .await;
                return Err(TunnelError::Forward(format!(
                    "{f}: the server refused to listen on {}:{ask} ({e}); is the port or name taken, or not permitted for this key?",
                    listen.host
                ))
                .into());
            }
        }
    }
    Ok(Session {
        link: Arc::new(handle),
        ended,
        ended_why,
    })
}

fn random() -> u64 {
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut b);
    u64::from_ne_bytes(b)
}

/// Runs the tunnel until `stop` (returns `Ok`), reporting each state on `state`. Before the
/// first session, an error that retrying cannot fix (a host key, a key, a refused forward,
/// TLS verification, a listener) ends it; after one, everything is retried, forever.
pub async fn run(
    opts: Options,
    stop: CancellationToken,
    state: watch::Sender<State>,
) -> Result<(), TunnelError> {
    let (links_tx, links) = watch::channel::<Option<Link>>(None);
    let mut listeners = Vec::new();
    for f in &opts.forwards {
        if let Some(b) = bind(f).await? {
            listeners.push(b);
        }
    }
    // Local listeners outlive every session: a task each, all stopped with `stop`.
    let wait = opts.connect_timeout;
    let local_stop = stop.child_token();
    for b in listeners {
        tokio::spawn(serve_local(b, links.clone(), wait, local_stop.clone()));
    }
    let _stop_locals = local_stop.drop_guard();

    let remotes: Remotes = Arc::default();
    let mut assigned = Assigned::new();
    let mut connected_once = false;
    let mut attempt: u32 = 0;
    let set = |s: State| {
        crate::metrics::tunnel_state(s.as_str());
        state.send_replace(s);
    };
    loop {
        set(State::Connecting { attempt });
        let tried = tokio::select! {
            r = tokio::time::timeout(opts.connect_timeout, session(&opts, &remotes, &mut assigned, &stop)) => r,
            () = stop.cancelled() => {
                set(State::Stopped);
                return Ok(());
            }
        };
        let why = match tried {
            Ok(Ok(s)) => {
                connected_once = true;
                attempt = 0;
                info!(target: "sluice::tunnel", server = %format!("{}:{}", opts.host, opts.port), user = opts.user, "connected");
                links_tx.send_replace(Some(s.link.clone()));
                set(State::Connected);
                let Session {
                    link,
                    ended,
                    ended_why,
                } = s;
                tokio::select! {
                    _ = ended => {}
                    () = stop.cancelled() => {
                        links_tx.send_replace(None);
                        let bye = link.disconnect(russh::Disconnect::ByApplication, "sluice tunnel stopped", "");
                        let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
                        set(State::Stopped);
                        return Ok(());
                    }
                }
                links_tx.send_replace(None);
                let why = lock(&ended_why)
                    .take()
                    .unwrap_or_else(|| "the session ended".into());
                warn!(target: "sluice::tunnel", why, "disconnected");
                why
            }
            Ok(Err(Failed { error })) => {
                let fatal = matches!(error, TunnelError::Config(_))
                    || (!connected_once
                        && matches!(
                            error,
                            TunnelError::HostKey(_)
                                | TunnelError::Auth(_)
                                | TunnelError::Forward(_)
                                | TunnelError::Tls(_)
                        ));
                if fatal {
                    set(State::Stopped);
                    return Err(error);
                }
                warn!(target: "sluice::tunnel", error = %error, attempt, "connecting failed");
                error.to_string()
            }
            Err(_) => {
                let why = format!(
                    "no session within {}",
                    humantime::format_duration(opts.connect_timeout)
                );
                warn!(target: "sluice::tunnel", why, attempt, "connecting failed");
                why
            }
        };
        let delay = opts.backoff.delay(attempt, random());
        attempt = attempt.saturating_add(1);
        info!(target: "sluice::tunnel", delay = %humantime::format_duration(Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))), "reconnecting after a pause");
        set(State::Waiting { delay, why });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => {
                set(State::Stopped);
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0), Duration::from_millis(250));
        assert_eq!(b.delay(0, 249), Duration::from_millis(499));
        assert_eq!(b.delay(0, 250), Duration::from_millis(250));
        assert_eq!(b.delay(1, 0), Duration::from_millis(500));
        assert_eq!(b.delay(30, 0), Duration::from_secs(15));
        assert!(b.delay(u32::MAX, u64::MAX) < Duration::from_secs(30));
        let tiny = Backoff {
            first: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(tiny.delay(3, 7), Duration::ZERO);
    }
}
