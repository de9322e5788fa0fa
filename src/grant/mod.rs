//! Access grants: a certificate from sluice's own CA that lets one device publish one port and
//! one tunnel name for a while (seed 001's flow, enforced by the server).
//!
//! A grant is a row in the store (`store::GrantRow`) and a user certificate whose key id is the
//! grant id and whose one principal is the device id. At authentication the SSH server asks
//! `Grants::check`: the row must be live (not revoked, replaced or expired) and match the
//! certificate, so revoking works for certificates that have not expired. The session then may
//! only `-R` the allotted port and name. Live sessions attach here so that a revoke ends them.

pub mod ca;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Certificate, HashAlg, PublicKey};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{GrantSettings, SshSettings, TunnelSettings};
use crate::store::{Allot, GrantCounts, GrantRow, Store, StoreError};
pub use ca::UserCa;

/// Grants could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The CA key.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the operator asks for (`POST /v1/grants`, `sluice grant issue`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    /// The device: 1-64 of `[A-Za-z0-9:._-]` (a MAC address, a serial number).
    pub device: String,
    /// How long the grant lasts (`"2h"`, `"90m"`); default `[grants] default_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// The device's own public key (OpenSSH line); without one sluice makes a key pair and
    /// returns the private key once.
    #[serde(default)]
    pub public_key: Option<String>,
    /// A fixed port from `[ssh] listen_ports`; default: the lowest free one.
    #[serde(default)]
    pub port: Option<u16>,
    /// The tunnel name (with `[tunnels]`); default: from the device id.
    #[serde(default)]
    pub name: Option<String>,
    /// End the device's live grant instead of refusing.
    #[serde(default)]
    pub replace: bool,
    /// Addresses the certificate may be used from (comma-separated CIDRs).
    #[serde(default)]
    pub source_address: Option<String>,
    /// `-W/-L` targets the device may open (`host:port`); default none.
    #[serde(default)]
    pub permit_open: Vec<String>,
    /// What the device publishes, for the ssh command returned; default `localhost:22`.
    #[serde(default)]
    pub local: Option<String>,
}

/// A grant as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    /// `g-...`.
    pub id: String,
    /// The device id (the certificate's principal and login name).
    pub device: String,
    /// `live`, `revoked`, `expired` or `replaced`.
    pub state: String,
    /// The allotted `-R` port.
    pub port: u16,
    /// The tunnel name, with `[tunnels]`.
    pub name: Option<String>,
    /// Where visitors reach the name: `NAME.<domain>`.
    pub host: Option<String>,
    /// The device key's fingerprint.
    pub key: String,
    /// `-W/-L` targets allowed.
    pub permit_open: Vec<String>,
    /// `source-address`, if pinned.
    pub source_address: Option<String>,
    /// RFC 3339 times.
    pub created: String,
    /// When the grant ends by itself.
    pub expires: String,
    /// The first authentication with it.
    pub first_used: Option<String>,
    /// When it ended.
    pub ended: Option<String>,
}

/// What a device gets when a grant is issued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Issued {
    /// The grant.
    pub grant: GrantView,
    /// The private key sluice made (OpenSSH format), returned once and never stored.
    pub private_key: Option<String>,
    /// The certificate (`...-cert.pub` line).
    pub certificate: String,
    /// A ready command line for the device (key in `device_key`, certificate beside it).
    pub ssh_command: String,
    /// The same as a `~/.ssh/config` block.
    pub ssh_config: String,
    /// What `sluice tunnel --grant FILE` needs besides the key and certificate.
    pub tunnel: TunnelBundle,
}

/// Where a device dials and what it publishes, for `sluice tunnel --grant`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelBundle {
    /// `HOST:PORT` of sluice's TLS port (`[grants] server`).
    pub server: String,
    /// The embedded SSH server's host key fingerprints (`SHA256:...`): the device checks
    /// the server against these, no known_hosts needed.
    pub host_keys: Vec<String>,
    /// The `-R` forwards, in `ssh -R` syntax: the allotted port and the name, if any.
    pub forwards: Vec<String>,
}

/// Why a grant was not issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// A field of the request is wrong (400).
    #[error("{field}: {message}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The request conflicts with a live grant or an owned name (409).
    #[error("{field}: {message}")]
    Conflict {
        /// The field.
        field: &'static str,
        /// With what.
        message: String,
    },
    /// Every port of the range is allotted (503, try later).
    #[error("no free port left in [ssh] listen_ports {0}")]
    NoFreePort(String),
    /// The store failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed (500).
    #[error("signing the certificate: {0}")]
    Sign(String),
}

/// Why a revoke did nothing.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// No such grant (404).
    #[error("no grant {0}")]
    NotFound(String),
    /// Already ended (409).
    #[error("grant {} is already {}", .0.id, .0.state)]
    NotLive(Box<GrantView>),
    /// The store failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a grant's certificate lets its session do.
#[derive(Debug, Clone)]
pub(crate) struct Allowance {
    pub(crate) grant: String,
    pub(crate) device: String,
    pub(crate) port: u16,
    pub(crate) name: Option<String>,
    pub(crate) expires: SystemTime,
    pub(crate) permit_open: Vec<String>,
}

impl Allowance {
    /// The identity that owns the grant's name: the device, whichever grant it holds.
    pub(crate) fn identity(&self) -> String {
        owner(&self.device)
    }
}

/// Why a certificate from sluice's CA was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No grant with this id (never issued, or another sluice's).
    Unknown(String),
    /// The grant was revoked, replaced or has expired.
    Ended(String, String),
    /// The certificate's key, principal or login does not match the grant.
    Mismatch(String),
    /// The store could not be read.
    Store(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unknown(id) => write!(f, "no grant {}", crate::text::clean(id)),
            Refusal::Ended(id, how) => write!(f, "grant {id} is {how}"),
            Refusal::Mismatch(what) => write!(f, "certificate does not match its grant: {what}"),
            Refusal::Store(e) => write!(f, "the grant store failed: {e}"),
        }
    }
}

/// A session's way to be ended by a revoke: called with the reason.
pub(crate) type EndSession = Arc<dyn Fn(&str) + Send + Sync>;

/// The grants of this server.
pub struct Grants {
    settings: GrantSettings,
    /// `[ssh] listen_ports` and `[tunnels] domain`, as the last reload left them.
    reloadable: Mutex<Reloadable>,
    /// Where devices dial: `[grants] server`, or the first listen address (as bound).
    server: Mutex<String>,
    /// The embedded SSH server's host key fingerprints, for grant bundles.
    host_keys: Vec<String>,
    store: Arc<Store>,
    ca: UserCa,
    /// Live sessions by grant id (session id, how to end it).
    live: Mutex<HashMap<String, Vec<(u64, EndSession)>>>,
    /// Wakes the sweeper when a grant that may expire sooner is issued.
    wake: tokio::sync::Notify,
    /// Grants by state, for `sluice_grants`.
    counts: Mutex<GrantCounts>,
}

fn publish_counts(c: &GrantCounts) {
    let g = &crate::metrics::get().grants;
    for (state, n) in [
        ("live", c.live),
        ("revoked", c.revoked),
        ("expired", c.expired),
        ("replaced", c.replaced),
    ] {
        g.get_or_create(&crate::metrics::StateLabels { state })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// The settings of other tables that a reload may change.
#[derive(Debug, Clone)]
struct Reloadable {
    ports: std::ops::RangeInclusive<u16>,
    domain: Option<String>,
}

/// Detaches a session from its grant when dropped.
pub(crate) struct Attached {
    grants: Arc<Grants>,
    grant: String,
    session: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut live = self.grants.lock_live();
        if let Some(v) = live.get_mut(&self.grant) {
            v.retain(|(s, _)| *s != self.session);
            if v.is_empty() {
                live.remove(&self.grant);
            }
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn stamp(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// The owner of a device's tunnel name in the store.
fn owner(device: &str) -> String {
    crate::store::device_owner(device)
}

/// A device id: 1-64 of `[A-Za-z0-9:._-]`.
pub fn valid_device(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b))
}

/// The tunnel name a device gets by default: its id in lower case with every run of other
/// characters one hyphen (`00:1B:44:11:3A:B7` -> `00-1b-44-11-3a-b7`).
pub fn default_name(device: &str) -> Option<String> {
    let mut out = String::new();
    for c in device.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-');
    let out = out.get(..out.len().min(63))?.trim_end_matches('-');
    crate::tunnel::name::is_label(out).then(|| out.to_string())
}

fn new_id() -> Result<String, IssueError> {
    let mut b = [0u8; 10];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| IssueError::Sign("no randomness".into()))?;
    Ok(format!(
        "g-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

/// Where a device dials a listener at `addr` (loopback: by name, as the test certificate and
/// a laptop's own certificate say `localhost`).
fn dial_address(addr: SocketAddr) -> String {
    if addr.ip().is_loopback() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// A grant's `-R` forwards as `ssh_config`'s RemoteForward takes them (`LISTEN TARGET`): the
/// allotted port, and the name (on the local service's port) if there is one.
fn forwards(row: &GrantRow, local: &str) -> Vec<String> {
    let local_port = local.rsplit_once(':').map_or("22", |(_, p)| p);
    let mut forwards = vec![format!("{} {local}", row.port)];
    if let Some(n) = &row.name {
        forwards.push(format!("{n}:{local_port} {local}"));
    }
    forwards
}

impl Grants {
    /// Opens the store and the CA (making it on first use). `listen` is where devices dial
    /// when `[grants] server` is not set; `host_keys` (fingerprints) go in grant bundles.
    pub fn open(
        settings: &GrantSettings,
        ssh: &SshSettings,
        tunnels: Option<&TunnelSettings>,
        store: Arc<Store>,
        state_dir: &Path,
        listen: SocketAddr,
        host_keys: Vec<String>,
    ) -> Result<Grants, GrantError> {
        let ca_path = settings
            .ca_key
            .clone()
            .unwrap_or_else(|| state_dir.join(ca::CA_FILE));
        let ca = UserCa::load_or_create(&ca_path)?;
        // Grants that expired while sluice was down end now, so that the counts start true.
        let now = unix(SystemTime::now());
        for r in store.sweep(now)? {
            info!(target: "sluice::grant", grant = r.id, device = crate::text::clean(&r.device), port = r.port, "grant expired");
            crate::metrics::count(&crate::metrics::get().grant_events, "expired");
        }
        let counts = store.grant_counts(now)?;
        publish_counts(&counts);
        let server = settings
            .server
            .clone()
            .unwrap_or_else(|| dial_address(listen));
        info!(ca = ca.fingerprint(), ca_key = %ca_path.display(), "grants: certificates from this CA authenticate devices");
        Ok(Grants {
            settings: settings.clone(),
            reloadable: Mutex::new(Reloadable {
                ports: ssh.listen_ports.clone(),
                domain: tunnels.map(|t| t.domain.clone()),
            }),
            server: Mutex::new(server),
            host_keys,
            store,
            ca,
            live: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            counts: Mutex::new(counts),
        })
    }

    fn server(&self) -> String {
        self.server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The first listener is bound at `addr`: without `[grants] server`, devices dial it (a
    /// `listen` with port 0 has its real port only now).
    pub fn listening_on(&self, addr: SocketAddr) {
        if self.settings.server.is_none() {
            *self.server.lock().unwrap_or_else(|p| p.into_inner()) = dial_address(addr);
        }
    }

    /// Takes a reload's `[ssh] listen_ports` and `[tunnels] domain` (grants already issued
    /// keep their ports and names).
    pub fn reconfigure(&self, ssh: &SshSettings, tunnels: Option<&TunnelSettings>) {
        *self.reloadable.lock().unwrap_or_else(|p| p.into_inner()) = Reloadable {
            ports: ssh.listen_ports.clone(),
            domain: tunnels.map(|t| t.domain.clone()),
        };
    }

    fn settings_now(&self) -> Reloadable {
        self.reloadable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The CA that signs grant certificates.
    pub fn ca(&self) -> &UserCa {
        &self.ca
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<(u64, EndSession)>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn view(&self, r: &GrantRow, now: u64) -> GrantView {
        let state = match (&r.end_reason, r.ended) {
            (Some(reason), _) => reason.clone(),
            (None, Some(_)) => "ended".into(),
            (None, None) if r.expires <= now => "expired".into(),
            (None, None) => "live".into(),
        };
        GrantView {
            id: r.id.clone(),
            device: r.device.clone(),
            state,
            port: r.port,
            name: r.name.clone(),
            host: match (&r.name, &self.settings_now().domain) {
                (Some(n), Some(d)) => Some(format!("{n}.{d}")),
                _ => None,
            },
            key: r.key.clone(),
            permit_open: r.permit_open.clone(),
            source_address: r.source_address.clone(),
            created: stamp(r.created),
            expires: stamp(r.expires),
            first_used: r.first_used.map(stamp),
            ended: r.ended.map(stamp),
        }
    }

    /// Issues a grant: validates the request, allots a port and claims the name atomically,
    /// signs the certificate.
    /// `by` says who asked (the control socket, a token's name), for the log and the trail.
    pub fn issue(&self, req: &IssueRequest, by: &str) -> Result<Issued, IssueError> {
        let Reloadable { ports, domain } = self.settings_now();
        let field = |field, message: String| IssueError::Field { field, message };
        if !valid_device(&req.device) {
            return Err(field(
                "device",
                "must be 1-64 characters of A-Z a-z 0-9 : . _ -".into(),
            ));
        }
        let ttl = req.ttl.unwrap_or(self.settings.default_ttl);
        if ttl < Duration::from_secs(1) {
            return Err(field("ttl", "must be at least 1s".into()));
        }
        if ttl > self.settings.max_ttl {
            return Err(field(
                "ttl",
                format!(
                    "{} is over max_ttl ({})",
                    humantime::format_duration(ttl),
                    humantime::format_duration(self.settings.max_ttl)
                ),
            ));
        }
        if let Some(p) = req.port {
            if !ports.contains(&p) {
                return Err(field(
                    "port",
                    format!(
                        "{p} is outside [ssh] listen_ports {}-{}",
                        ports.start(),
                        ports.end()
                    ),
                ));
            }
        }
        let name = match (&domain, &req.name) {
            (None, Some(_)) => {
                return Err(field(
                    "name",
                    "tunnel names need a [tunnels] table in the config".into(),
                ))
            }
            (None, None) => None,
            (Some(d), Some(n)) => {
                let n = n.to_ascii_lowercase();
                // What a client's bind address would be read as: `localhost` is not a name.
                if crate::tunnel::name::from_host(&n, d).as_deref() != Some(n.as_str()) {
                    return Err(field(
                        "name",
                        "must be a DNS label (1-63 of a-z 0-9 -, no hyphen at either end) other than localhost".into(),
                    ));
                }
                Some(n)
            }
            (Some(d), None) => default_name(&req.device)
                .filter(|n| crate::tunnel::name::from_host(n, d).as_deref() == Some(n.as_str())),
        };
        if let Some(sa) = &req.source_address {
            let ok = !sa.trim().is_empty()
                && sa
                    .split(',')
                    .all(|c| crate::net::Cidr::parse(c.trim()).is_some());
            if !ok {
                return Err(field(
                    "source_address",
                    "must be comma-separated addresses or CIDRs, e.g. 203.0.113.0/24".into(),
                ));
            }
        }
        for t in &req.permit_open {
            // Exactly what the session will read it as (a key line's permitopen).
            if t.contains(',') || crate::ssh::policy::KeyPermitOpen::parse(t).is_none() {
                return Err(field(
                    "permit_open",
                    format!("`{}` is not host:port", crate::text::clean(t)),
                ));
            }
        }
        if let Some(l) = &req.local {
            // It goes into a shell command line: a host name or address and a port only.
            let ok = l.rsplit_once(':').is_some_and(|(h, p)| {
                !h.is_empty()
                    && h.len() <= 253
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-_[]:".contains(&b))
                    && p.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return Err(field(
                    "local",
                    "must be HOST:PORT (a host name or address, a port 1-65535)".into(),
                ));
            }
        }
        let (public, private) = match &req.public_key {
            Some(text) => {
                let k = PublicKey::from_openssh(text.trim()).map_err(|e| {
                    field("public_key", format!("not an OpenSSH public key line: {e}"))
                })?;
                (k, None)
            }
            None => {
                let k = crate::sshkey::new_ed25519(&format!("sluice grant for {}", req.device))
                    .map_err(IssueError::Sign)?;
                let pem = k
                    .to_openssh(LineEnding::LF)
                    .map_err(|e| IssueError::Sign(e.to_string()))?;
                (k.public_key().clone(), Some(pem.to_string()))
            }
        };
        let now = SystemTime::now();
        let created = unix(now);
        let id = new_id()?;
        let row = GrantRow {
            id,
            device: req.device.clone(),
            port: 0,
            name,
            key: public.fingerprint(HashAlg::Sha256).to_string(),
            permit_open: req.permit_open.clone(),
            source_address: req.source_address.clone(),
            created,
            expires: created + ttl.as_secs().max(1),
            first_used: None,
            ended: None,
            end_reason: None,
        };
        // Signed before anything is stored: a grant is never left without its certificate.
        let cert = self
            .ca
            .sign(&ca::CertSpec {
                key: &public,
                key_id: &row.id,
                principal: &row.device,
                // A device whose clock is a little behind is still let in.
                valid_after: now - Duration::from_secs(300),
                valid_before: UNIX_EPOCH + Duration::from_secs(row.expires),
                source_address: row.source_address.as_deref(),
            })
            .map_err(IssueError::Sign)?;
        let certificate = cert
            .to_openssh()
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        let (row, ended) = match self.store.issue_grant(
            &row,
            req.port,
            ports.clone(),
            &owner(&req.device),
            req.replace,
        )? {
            Allot::Granted { row, ended } => (*row, ended),
            Allot::DeviceHasGrant(other) => {
                return Err(IssueError::Conflict {
                    field: "device",
                    message: format!("has live grant {other} (ask with replace to end it)"),
                })
            }
            Allot::PortTaken(other) => {
                return Err(IssueError::Conflict {
                    field: "port",
                    message: format!("allotted to live grant {other}"),
                })
            }
            Allot::NameOwned(o) => {
                return Err(IssueError::Conflict {
                    field: "name",
                    message: format!("owned by {}", crate::text::clean(&o)),
                })
            }
            Allot::NoFreePort => {
                return Err(IssueError::NoFreePort(format!(
                    "{}-{}",
                    ports.start(),
                    ports.end()
                )))
            }
        };
        self.ended(&ended, "replaced by a new grant");
        self.wake.notify_one();
        self.count(|c| c.live += 1);
        info!(target: "sluice::grant", grant = row.id, device = crate::text::clean(&row.device), port = row.port, name = row.name.as_deref().unwrap_or("-"), key = row.key, expires = %stamp(row.expires), by, "grant issued");
        crate::audit::record(|| crate::audit::Event::GrantIssued {
            grant: row.id.clone(),
            device: row.device.clone(),
            port: row.port,
            name: row.name.clone(),
            key: row.key.clone(),
            expires: stamp(row.expires),
            by: by.to_string(),
        });
        crate::metrics::count(&crate::metrics::get().grant_events, "issued");
        let local = req.local.as_deref().unwrap_or("localhost:22");
        let (ssh_command, ssh_config) = self.commands(&row, local);
        Ok(Issued {
            grant: self.view(&row, created),
            private_key: private,
            certificate,
            ssh_command,
            ssh_config,
            tunnel: TunnelBundle {
                server: self.server(),
                host_keys: self.host_keys.clone(),
                forwards: forwards(&row, local)
                    .iter()
                    .map(|f| f.replace(' ', ":"))
                    .collect(),
            },
        })
    }

    /// The device's command line and config block (key in `device_key`, certificate in
    /// `device_key-cert.pub`).
    fn commands(&self, row: &GrantRow, local: &str) -> (String, String) {
        let server = self.server();
        let host = server
            .rsplit_once(':')
            .map_or(server.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let proxy = format!("sluice connect {server}");
        let forwards = forwards(row, local);
        let mut cmd = format!(
            "ssh -i device_key -o CertificateFile=device_key-cert.pub -o ExitOnForwardFailure=yes -o ServerAliveInterval=30 -o ProxyCommand='{proxy}' -N"
        );
        for f in &forwards {
            cmd.push_str(&format!(" -R {}", f.replace(' ', ":")));
        }
        cmd.push_str(&format!(" -l {} {host}", row.device));
        let mut cfg = format!(
            "Host sluice-grant\n  HostName {host}\n  User {}\n  IdentityFile device_key\n  CertificateFile device_key-cert.pub\n  ProxyCommand {proxy}\n  ExitOnForwardFailure yes\n  ServerAliveInterval 30\n  SessionType none\n",
            row.device
        );
        for f in &forwards {
            cfg.push_str(&format!("  RemoteForward {f}\n"));
        }
        (cmd, cfg)
    }

    /// Live grants (`all`: every grant kept).
    pub fn list(&self, all: bool) -> Result<Vec<GrantView>, StoreError> {
        let now = unix(SystemTime::now());
        Ok(self
            .store
            .grants(all)?
            .iter()
            .map(|r| self.view(r, now))
            .collect())
    }

    /// One grant.
    pub fn get(&self, id: &str) -> Result<Option<GrantView>, StoreError> {
        let now = unix(SystemTime::now());
        Ok(self.store.grant(id)?.map(|r| self.view(&r, now)))
    }

    /// Revokes a live grant and ends its sessions now; the view and how many sessions ended.
    pub fn revoke(&self, id: &str) -> Result<(GrantView, usize), RevokeError> {
        let now = unix(SystemTime::now());
        let ended = match self.store.end_grant(id, "revoked", now) {
            Ok(e) => e,
            Err(e) => {
                // Whether or not the store took it, the operator asked: this process's
                // sessions of the grant end now (failing closed), and the error is reported.
                self.end_sessions(id, "sluice: your access grant was revoked");
                return Err(e.into());
            }
        };
        match ended {
            Some(r) => {
                info!(target: "sluice::grant", grant = r.id, device = crate::text::clean(&r.device), port = r.port, "grant revoked");
                crate::metrics::count(&crate::metrics::get().grant_events, "revoked");
                let n = self.end_sessions(&r.id, "sluice: your access grant was revoked");
                crate::audit::record(|| crate::audit::Event::GrantEnded {
                    grant: r.id.clone(),
                    device: r.device.clone(),
                    how: "revoked".into(),
                    sessions_ended: n,
                });
                self.count(|c| {
                    c.live = c.live.saturating_sub(1);
                    c.revoked += 1;
                });
                Ok((self.view(&r, now), n))
            }
            None => match self.store.grant(id)? {
                Some(r) => Err(RevokeError::NotLive(Box::new(self.view(&r, now)))),
                None => Err(RevokeError::NotFound(crate::text::clean(id))),
            },
        }
    }

    /// Applies a change to the grant counts and publishes them as `sluice_grants` (counted
    /// once from the store at start, then kept: no scan of the store per change).
    fn count(&self, change: impl FnOnce(&mut GrantCounts)) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut c);
        publish_counts(&c);
    }

    /// Ends the live sessions of `grant`; how many.
    fn end_sessions(&self, grant: &str, why: &str) -> usize {
        let sessions = self.lock_live().remove(grant).unwrap_or_default();
        for (_, end) in &sessions {
            end(why);
        }
        sessions.len()
    }

    /// Logs and counts grants a transaction ended, and ends their sessions.
    fn ended(&self, rows: &[GrantRow], why: &str) {
        for r in rows {
            let reason = r.end_reason.as_deref().unwrap_or("ended");
            self.count(|c| {
                c.live = c.live.saturating_sub(1);
                if reason == "expired" {
                    c.expired += 1;
                } else {
                    c.replaced += 1;
                }
            });
            info!(target: "sluice::grant", grant = r.id, device = crate::text::clean(&r.device), port = r.port, "grant {reason}");
            crate::metrics::count(
                &crate::metrics::get().grant_events,
                if reason == "expired" {
                    "expired"
                } else {
                    "replaced"
                },
            );
            let why = if reason == "expired" {
                "sluice: your access grant has expired"
            } else {
                why
            };
            let n = self.end_sessions(&r.id, why);
            crate::audit::record(|| crate::audit::Event::GrantEnded {
                grant: r.id.clone(),
                device: r.device.clone(),
                how: reason.to_string(),
                sessions_ended: n,
            });
        }
    }

    /// Whether sluice's CA signed this certificate (then only [`Grants::check`] decides).
    pub(crate) fn signed_by_us(&self, cert: &Certificate) -> bool {
        self.ca.signed(cert)
    }

    /// A certificate from sluice's CA, offered by `user` from `peer`: what its grant allows.
    pub(crate) fn check(
        &self,
        cert: &Certificate,
        user: &str,
        peer: IpAddr,
        now: SystemTime,
    ) -> Result<Allowance, Refusal> {
        let id = cert.key_id();
        let row = self
            .store
            .grant(id)
            .map_err(|e| Refusal::Store(e.to_string()))?
            .ok_or_else(|| Refusal::Unknown(id.to_string()))?;
        let t = unix(now);
        if let Some(reason) = &row.end_reason {
            return Err(Refusal::Ended(row.id, reason.clone()));
        }
        if row.expires <= t {
            return Err(Refusal::Ended(row.id, "expired".into()));
        }
        let fp = self.ca.public_key().fingerprint(HashAlg::Sha256);
        if let Err(e) = cert.validate_at(t, [&fp]) {
            return Err(Refusal::Mismatch(format!("not valid now: {e}")));
        }
        if cert.public_key().fingerprint(HashAlg::Sha256).to_string() != row.key {
            return Err(Refusal::Mismatch("another key".into()));
        }
        if cert.valid_principals() != [row.device.clone()] {
            return Err(Refusal::Mismatch("another principal".into()));
        }
        if user != row.device {
            return Err(Refusal::Mismatch(format!(
                "login {} is not the device {}",
                crate::text::clean(user),
                crate::text::clean(&row.device)
            )));
        }
        if let Some(sa) = &row.source_address {
            let ok = sa
                .split(',')
                .filter_map(|c| crate::net::Cidr::parse(c.trim()))
                .any(|c| c.contains(peer));
            if !ok {
                return Err(Refusal::Mismatch(format!("client address not in {sa}")));
            }
        }
        if row.first_used.is_none() && matches!(self.store.mark_used(&row.id, t), Ok(true)) {
            info!(target: "sluice::grant", grant = row.id, device = crate::text::clean(&row.device), %peer, "grant first used");
            crate::audit::record(|| crate::audit::Event::GrantUsed {
                grant: row.id.clone(),
                device: row.device.clone(),
                peer: peer.to_string(),
            });
            crate::metrics::count(&crate::metrics::get().grant_events, "used");
        }
        Ok(Allowance {
            grant: row.id,
            device: row.device,
            port: row.port,
            name: row.name,
            expires: UNIX_EPOCH + Duration::from_secs(row.expires),
            permit_open: row.permit_open,
        })
    }

    /// Registers a live session of `grant`, so that a revoke can end it.
    pub(crate) fn attach(self: &Arc<Self>, grant: &str, session: u64, end: EndSession) -> Attached {
        self.lock_live()
            .entry(grant.to_string())
            .or_default()
            .push((session, end.clone()));
        // A revoke between this session's check and now found nothing to end: the grant is
        // read again after attaching (a revoke writes the store before ending sessions).
        let now = unix(SystemTime::now());
        let live = matches!(self.store.grant(grant), Ok(Some(r)) if r.end_reason.is_none() && r.expires > now);
        if !live {
            end("sluice: your access grant has ended");
        }
        Attached {
            grants: self.clone(),
            grant: grant.to_string(),
            session,
        }
    }

    /// Whether an offered key may go on to sign: only a key a grant was issued for (russh
    /// offers a certificate as its bare key). Ended grants too, so that a revoked or expired
    /// certificate is refused with its reason logged rather than as an unknown key.
    pub(crate) fn key_has_grant(&self, key: &PublicKey) -> bool {
        let fp = key.fingerprint(HashAlg::Sha256).to_string();
        matches!(self.store.key_has_grant(&fp), Ok(true))
    }

    /// Ports that live grants hold, which no other key may listen on; `None` if the store
    /// cannot say (then no other key gets a port: failing closed).
    pub(crate) fn allotted_ports(&self) -> Option<std::collections::HashSet<u16>> {
        match self.store.allotted_ports(unix(SystemTime::now())) {
            Ok(p) => Some(p),
            Err(e) => {
                warn!(target: "sluice::grant", error = %e, "grants: reading allotted ports failed");
                None
            }
        }
    }

    /// Ends expired grants as they expire (their sessions end by their own expiry timer; this
    /// frees the ports and names in the store and logs it), until `stop`.
    pub async fn sweep(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let now = unix(SystemTime::now());
            // On a blocking thread: the store may be Redis across a network.
            let store = self.store.clone();
            let swept = tokio::task::spawn_blocking(move || store.sweep(now))
                .await
                .unwrap_or_else(|e| {
                    Err(StoreError::Redis {
                        url: String::new(),
                        message: format!("the sweep task failed: {e}"),
                    })
                });
            match swept {
                Ok(rows) => self.ended(&rows, "expired"),
                Err(e) => {
                    warn!(target: "sluice::grant", error = %e, "grants: sweeping expired grants failed");
                }
            }
            let next = match self.store.next_expiry() {
                Ok(Some(t)) => Duration::from_secs(t.saturating_sub(now).clamp(1, 60)),
                _ => Duration::from_secs(60),
            };
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = self.wake.notified() => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_and_default_names() {
        assert!(valid_device("00:1b:44:11:3a:b7"));
        assert!(valid_device("gw-1.site_a"));
        assert!(!valid_device(""));
        assert!(!valid_device("a b"));
        assert!(!valid_device(&"a".repeat(65)));
        assert!(!valid_device("dev/1"));
        assert_eq!(
            default_name("00:1B:44:11:3A:B7").as_deref(),
            Some("00-1b-44-11-3a-b7")
        );
        assert_eq!(default_name("gw_1..x").as_deref(), Some("gw-1-x"));
        assert_eq!(default_name("::"), None);
        assert_eq!(default_name(&"a".repeat(64)).unwrap().len(), 63);
    }
}
