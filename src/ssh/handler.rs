//! The per-connection russh handler: authentication, session refusals, forwarding policy.
//!
//! Handler methods run on the session's own loop, so nothing here awaits anything that needs
//! that loop (channel opens, connects): such work is spawned.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use russh::keys::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::auth::{self, Denial, Login};
use super::forward;
use super::limits::{ChannelCount, ChannelSlot};
use super::permit;
use super::sockets::Claim;
use super::{SshServer, TUNNELS_ONLY};
use crate::tunnel;

/// How long the session holding a name gets to answer a keepalive when its key publishes the
/// name again from another session (then it is evicted).
const STALE_PING: Duration = Duration::from_secs(3);

/// Whether a session that holds what a reconnecting key asks for answers a keepalive within
/// [`STALE_PING`] (a failure reply counts: OpenSSH answers unknown requests with one).
async fn answers(handle: &russh::server::Handle) -> bool {
    matches!(
        tokio::time::timeout(STALE_PING, handle.ping()).await,
        Ok(Ok(()))
    )
}

/// Ends a session that did not answer, off the caller's path.
fn end_stale(handle: russh::server::Handle) {
    tokio::spawn(async move {
        let bye = handle.disconnect(
            russh::Disconnect::ByApplication,
            "sluice: this key reconnected and this session did not answer".into(),
            String::new(),
        );
        let _ = tokio::time::timeout(STALE_PING, bye).await;
    });
}

/// What the connection log line should say about the session, and how authentication went.
#[derive(Default)]
pub(crate) struct ConnState {
    who: Mutex<Option<String>>,
    /// The key exchange is done: the client asked for the authentication service.
    keys_exchanged: AtomicBool,
    /// Authentication requests received ("none" probes included).
    attempts: AtomicU32,
    /// The last rejected attempt (user, what was offered, why), logged once if the connection
    /// ends without authenticating: one failed connection is one fail2ban line, however many
    /// keys the client's agent tried.
    last_failure: Mutex<Option<(String, String, String)>>,
}

impl ConnState {
    /// The last rejected attempt, if any.
    pub(crate) fn last_failure(&self) -> Option<(String, String, String)> {
        self.last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Where a connection that never authenticated stopped, for the connection log.
    pub(crate) fn stalled_at(&self) -> String {
        if !self.keys_exchanged.load(Ordering::Acquire) {
            return "during the key exchange (client banner received, no authentication request)"
                .into();
        }
        match self.attempts.load(Ordering::Acquire) {
            0 => "after the key exchange, before any authentication request".into(),
            1 => "after 1 authentication request, not accepted".into(),
            n => format!("after {n} authentication requests, none accepted"),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match &*self.who.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(w) => format!(" ({w})"),
            None => " (not authenticated)".into(),
        }
    }
}

/// One SSH connection.
pub(crate) struct Conn {
    server: Arc<SshServer>,
    peer: SocketAddr,
    authenticated: Arc<AtomicBool>,
    state: Arc<ConnState>,
    /// Accepted by an auth method, in force once russh reports success.
    pending: Option<Login>,
    grant: Option<Login>,
    failures: u32,
    channels: Arc<ChannelCount>,
    /// Session channels hold a slot until the client closes them.
    session_channels: HashMap<ChannelId, ChannelSlot>,
    /// Counts this session in `sluice_ssh_sessions_active` while it lives.
    session_gauge: Option<crate::metrics::GaugeGuard>,
    forwards: HashMap<(String, u32), JoinHandle<()>>,
    /// `-R /name` sockets by the path the client asked for; a claim unlinks on drop.
    sockets: HashMap<String, (JoinHandle<()>, Claim)>,
    expiry: Option<JoinHandle<()>>,
    /// Cuts the connection (see `io::Killable`).
    kill: tokio_util::sync::CancellationToken,
    /// This connection among all (tunnel registrations name their session).
    id: u64,
    /// Tunnel names and ports this session publishes.
    names: HashSet<(String, u16)>,
    /// The access grant this session is attached to (revoking it ends the session).
    attached: Option<crate::grant::Attached>,
    /// This session in the live table (`GET /v1/sessions`), once authenticated.
    live: Option<crate::sessions::SessionGuard>,
}

/// Connection ids for tunnel registrations.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Conn {
    pub(crate) fn new(
        server: Arc<SshServer>,
        peer: SocketAddr,
        authenticated: Arc<AtomicBool>,
        state: Arc<ConnState>,
        kill: tokio_util::sync::CancellationToken,
    ) -> Conn {
        let max = server.settings.max_channels;
        Conn {
            server,
            peer,
            authenticated,
            state,
            pending: None,
            grant: None,
            failures: 0,
            channels: ChannelCount::new(max),
            session_channels: HashMap::new(),
            session_gauge: None,
            forwards: HashMap::new(),
            sockets: HashMap::new(),
            expiry: None,
            kill,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            names: HashSet::new(),
            attached: None,
            live: None,
        }
    }

    /// A rejected attempt: remembered for the one line logged when the connection ends
    /// unauthenticated (see `SshServer::serve`), in detail at debug level now. From a
    /// penalised source the answer waits (see `penalty`); the connection's end still cuts it.
    async fn fail(&mut self, user: &str, denial: Denial) -> Auth {
        self.failures += 1;
        // The trail is JSON (it escapes what it must): the login as sent, not as logged.
        let raw_user = user.to_string();
        let (user, what) = (super::clean(user), super::clean_text(&denial.what));
        // Reasons quote certificate fields; those are escaped where they are quoted, this
        // keeps any other text to one line.
        let reason = super::clean_text(&denial.reason.to_string());
        debug!(target: "sluice::ssh::auth", peer = %self.peer, user, what, reason, "publickey attempt rejected");
        crate::audit::record(|| crate::audit::Event::SshAuthRefused {
            user: raw_user,
            peer: self.peer.to_string(),
            what: what.clone(),
            reason: reason.clone(),
        });
        *self
            .state
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((user.clone(), what, reason));
        if self.failures == self.server.settings.max_auth_attempts {
            warn!(
                target: "sluice::ssh::auth",
                "maximum authentication attempts exceeded for {user} from {} port {} ssh2",
                self.peer.ip(),
                self.peer.port()
            );
        }
        let exempt = &self.server.settings.penalty_exempt;
        let penalty =
            self.server
                .penalties
                .penalty(self.peer.ip(), exempt, tokio::time::Instant::now());
        let delay = super::penalty::delay_for(penalty);
        if !delay.is_zero() {
            info!(
                target: "sluice::ssh::auth",
                source = %super::penalty::Source::of(self.peer.ip()),
                peer = %self.peer,
                penalty_s = penalty.as_secs(),
                delay_ms = delay.as_millis() as u64,
                "failed attempt answered late: penalised source"
            );
            crate::metrics::get()
                .ssh_auth
                .get_or_create(&crate::metrics::ResultLabels { result: "delayed" })
                .inc();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.kill.cancelled() => {}
            }
        }
        Auth::reject()
    }

    /// An authentication method accepted `grant`; a lock may still refuse it.
    async fn accept(&mut self, grant: Login, kind: &str) -> Auth {
        if crate::audit::refusing() {
            warn!(target: "sluice::audit", peer = %self.peer, user = super::clean(&grant.user), "authentication refused: the audit trail cannot be written ([audit] on_failure = \"refuse\")");
            let user = grant.user.clone();
            let denial = Denial {
                what: grant.label,
                reason: auth::Reason::AuditUnavailable,
            };
            return self.fail(&user, denial).await;
        }
        let lock = self
            .server
            .locks
            .as_ref()
            .and_then(|l| l.matching(&grant.identity(), self.peer));
        if let Some(l) = lock {
            let user = grant.user.clone();
            // Logged now: the line logged at the session's end names its last failure, often
            // the client's next try with another key.
            warn!(target: "sluice::lock", lock = l.id, user = super::clean(&user), peer = %self.peer, key = grant.key, "authentication refused: locked");
            let denial = Denial {
                what: grant.label,
                reason: auth::Reason::Locked(l.id, l.reason),
            };
            return self.fail(&user, denial).await;
        }
        info!(
            target: "sluice::ssh::auth",
            "Accepted {kind} for {} from {} port {} ssh2: {}",
            super::clean(&grant.user),
            self.peer.ip(),
            self.peer.port(),
            super::clean_text(&grant.label)
        );
        crate::audit::record(|| crate::audit::Event::SshAuthAccepted {
            user: grant.user.clone(),
            peer: self.peer.to_string(),
            method: kind.to_string(),
            key: grant.key.clone(),
            label: grant.label.clone(),
            grant: grant.access.as_ref().map(|a| a.grant.clone()),
        });
        self.pending = Some(grant);
        Auth::Accept
    }

    /// `-R NAME:PORT:...`: registers the name for this session; nothing is bound.
    /// When `port` is held by another session of the same identity (a reconnect whose old
    /// session may be stale), asks that session for a keepalive; ends it if it does not answer.
    /// Whether it was ended.
    async fn evict_port(&self, grant: &Login, port: u16) -> bool {
        let Some(old) = self.server.ports.holder(port) else {
            return false;
        };
        if old.identity != grant.identity || old.session == self.id {
            return false;
        }
        if answers(&old.handle).await {
            return false;
        }
        warn!(target: "sluice::ssh", peer = %self.peer, port, stale_session = old.session, "reverse forward: the session holding the port did not answer a keepalive within {}: ended", humantime::format_duration(STALE_PING));
        end_stale(old.handle);
        true
    }

    async fn publish_name(
        &mut self,
        grant: &Login,
        name: String,
        via: tunnel::Via,
        port: u32,
        max_per_identity: u32,
        handle: russh::server::Handle,
    ) -> bool {
        let target = format!("{name}:{port}");
        let held = self.held();
        let config = self
            .server
            .tunnels
            .as_ref()
            .map_or(&[][..], |t| &t.permit_listen[..]);
        let port = match permit::publish(grant, &self.server.settings, config, &name, port, held) {
            Ok(p) => p,
            Err(r) => {
                crate::metrics::count(&crate::metrics::get().tunnel_publish, "denied");
                self.deny_channel("tcpip-forward", &target, &r.to_string());
                return false;
            }
        };
        let to = tunnel::Published {
            handle,
            via,
            session: self.id,
            traffic: Arc::default(),
        };
        let registry = &self.server.registry;
        let publish =
            |to| registry.publish(&name, port, &grant.identity, self.id, to, max_per_identity);
        let mut r = publish(to.clone());
        if let Err(tunnel::Refused::Held { .. }) = r {
            // The same key holds it in another session: a reconnect whose old session may be
            // stale (a dead link, a stopped client). A keepalive with a short deadline decides.
            if let Some(old) = registry.route(&name, port) {
                let alive = answers(&old.handle).await;
                if !alive && registry.unpublish(&name, port, old.session) {
                    crate::metrics::count(&crate::metrics::get().tunnel_publish, "evicted");
                    warn!(target: "sluice::ssh", peer = %self.peer, tunnel = name, port, stale_session = old.session, "tunnel: the session holding it did not answer a keepalive within {}: evicted", humantime::format_duration(STALE_PING));
                    crate::audit::record(|| crate::audit::Event::TunnelEnded {
                        name: name.clone(),
                        port,
                        how: "evicted".into(),
                        peer: self.peer.to_string(),
                    });
                    end_stale(old.handle.clone());
                    r = publish(to);
                }
            }
        }
        if let Err(e) = r {
            crate::metrics::count(&crate::metrics::get().tunnel_publish, e.as_str());
            self.deny_channel("tcpip-forward", &target, &e.to_string());
            return false;
        }
        crate::metrics::count(&crate::metrics::get().tunnel_publish, "published");
        info!(target: "sluice::ssh", peer = %self.peer, user = grant.user, key = grant.key, tunnel = name, port, "tunnel published");
        crate::audit::record(|| crate::audit::Event::TunnelPublished {
            name: name.clone(),
            port,
            owner: grant.identity.clone(),
            peer: self.peer.to_string(),
        });
        self.names.insert((name, port));
        true
    }

    /// Stops publishing `name:port` (the client cancelled it); false if this session did not.
    fn withdraw(&mut self, name: String, port: u16) -> bool {
        let key = (name, port);
        if !self.names.remove(&key) {
            return false;
        }
        self.server.registry.unpublish(&key.0, port, self.id);
        info!(target: "sluice::ssh", peer = %self.peer, tunnel = key.0, port, "tunnel withdrawn");
        crate::audit::record(|| crate::audit::Event::TunnelEnded {
            name: key.0.clone(),
            port,
            how: "withdrawn".into(),
            peer: self.peer.to_string(),
        });
        true
    }

    /// This session's record in the live table.
    fn live_session(&self) -> Option<Arc<crate::sessions::Session>> {
        self.live.as_ref().map(|g| g.session().clone())
    }

    /// Listeners, sockets and names this session holds (bounded by `ssh.max_forwards`).
    fn held(&self) -> usize {
        self.forwards.len() + self.sockets.len() + self.names.len()
    }

    fn deny_channel(&self, what: &str, target: &str, reason: &str) {
        let user = self.grant.as_ref().map_or("-", |g| g.user.as_str());
        warn!(target: "sluice::ssh", peer = %self.peer, user, target, reason, "denied {what}");
    }

    fn refuse_session_request(
        &self,
        channel: ChannelId,
        what: &str,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let user = self.grant.as_ref().map_or("-", |g| g.user.as_str());
        info!(target: "sluice::ssh", peer = %self.peer, user, request = what, "refused: tunnels only");
        session.channel_success(channel)?;
        session.extended_data(
            channel,
            1,
            bytes::Bytes::from_static(TUNNELS_ONLY.as_bytes()),
        )?;
        session.exit_status_request(channel, 1)?;
        session.eof(channel)?;
        session.close(channel)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Every listener this session opened closes with it: no leaked ports or sockets.
        for (_, task) in self.forwards.drain() {
            task.abort();
        }
        for (_, (task, claim)) in self.sockets.drain() {
            task.abort();
            drop(claim);
        }
        if let Some(t) = self.expiry.take() {
            t.abort();
        }
        if !self.names.is_empty() {
            self.server.registry.end_session(self.id);
            for (name, port) in &self.names {
                crate::audit::record(|| crate::audit::Event::TunnelEnded {
                    name: name.clone(),
                    port: *port,
                    how: "session_ended".into(),
                    peer: self.peer.to_string(),
                });
            }
        }
    }
}

/// Time left until `t`, or `None` if it has passed.
fn until(t: SystemTime) -> Option<Duration> {
    t.duration_since(SystemTime::now())
        .ok()
        .filter(|d| !d.is_zero())
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        // russh asks for the banner when the client requests the authentication service,
        // which it can only do once the key exchange is done.
        self.state.keys_exchanged.store(true, Ordering::Release);
        Ok(None)
    }

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        // OpenSSH probes with "none" first; not a failure worth a log line.
        self.state.attempts.fetch_add(1, Ordering::AcqRel);
        Ok(Auth::reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        self.state.attempts.fetch_add(1, Ordering::AcqRel);
        let keys = self.server.keys.current();
        match auth::offer(&keys, offer.public_key, offer.algorithm) {
            Ok(()) => Ok(Auth::Accept),
            // russh offers a certificate as its bare key: a key a grant was issued for may
            // sign (its certificate is then checked in full); any other key is refused here.
            Err(d)
                if d.reason == auth::Reason::KeyNotAuthorized
                    && self
                        .server
                        .grants
                        .as_ref()
                        .is_some_and(|g| g.key_has_grant(offer.public_key)) =>
            {
                Ok(Auth::Accept)
            }
            Err(d) => Ok(self.fail(user, d).await),
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let keys = self.server.keys.current();
        match auth::authorize_key(
            &keys,
            user,
            key.public_key,
            self.peer.ip(),
            SystemTime::now(),
        ) {
            Ok(grant) => Ok(self.accept(grant, "publickey").await),
            Err(d) => Ok(self.fail(user, d).await),
        }
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        if let Some(grants) = self.server.grants.as_ref().filter(|g| g.signed_by_us(cert)) {
            return match grants.check(cert, user, self.peer.ip(), SystemTime::now()) {
                Ok(a) => Ok(self
                    .accept(auth::grant_login(user, cert, &a), "certificate")
                    .await),
                Err(r) => {
                    crate::metrics::count(&crate::metrics::get().grant_events, "refused");
                    // Logged now: the session's last failure (logged at its end, as sshd
                    // does) is usually the client's next try with the bare key.
                    warn!(
                        target: "sluice::grant",
                        grant = super::clean(cert.key_id()),
                        user = super::clean(user),
                        peer = %self.peer,
                        "access grant refused: {r}"
                    );
                    let what = format!(
                        "certificate ID {} serial {} (sluice grant)",
                        super::clean(cert.key_id()),
                        cert.serial()
                    );
                    Ok(self
                        .fail(
                            user,
                            Denial {
                                what,
                                reason: auth::Reason::Grant(r.to_string()),
                            },
                        )
                        .await)
                }
            };
        }
        let keys = self.server.keys.current();
        match auth::authorize_cert(&keys, user, cert, self.peer.ip(), SystemTime::now()) {
            Ok(grant) => Ok(self.accept(grant, "certificate").await),
            Err(d) => Ok(self.fail(user, d).await),
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let Some(grant) = self.pending.take() else {
            return Ok(());
        };
        *self.state.who.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
            "user {} {}",
            super::clean(&grant.user),
            super::clean_text(&grant.label)
        ));
        self.authenticated.store(true, Ordering::Release);
        let m = crate::metrics::get();
        m.ssh_auth
            .get_or_create(&crate::metrics::ResultLabels { result: "accepted" })
            .inc();
        self.session_gauge = Some(crate::metrics::GaugeGuard::new(&m.ssh_sessions_active));
        if let Some(exp) = grant.expires {
            // Expiry ends the live session, not just future logins.
            let handle = session.handle();
            let (peer, user, kill) = (self.peer, grant.user.clone(), self.kill.clone());
            self.expiry = Some(tokio::spawn(async move {
                while let Some(left) = until(exp) {
                    tokio::time::sleep(left.min(Duration::from_secs(3600))).await;
                }
                warn!(target: "sluice::ssh::auth", %peer, user, "key or certificate expired: closing the session");
                super::say_goodbye(&handle, &kill, "your key or certificate has expired");
            }));
        }
        if let (Some(id), Some(grants)) =
            (grant.access.as_ref().map(|a| &a.grant), &self.server.grants)
        {
            // A revoke ends this session at once.
            let (handle, kill) = (session.handle(), self.kill.clone());
            let end: crate::grant::EndSession =
                Arc::new(move |why: &str| super::say_goodbye(&handle, &kill, why));
            self.attached = Some(grants.attach(id, self.id, end));
        }
        let (handle, kill) = (session.handle(), self.kill.clone());
        self.live = Some(crate::sessions::table().enter(
            self.id,
            grant.identity(),
            self.peer,
            Box::new(move |why: &str| super::say_goodbye(&handle, &kill, why)),
        ));
        // A lock added between the check at authentication and now.
        if let Some(l) = self
            .server
            .locks
            .as_ref()
            .and_then(|l| l.matching(&grant.identity(), self.peer))
        {
            super::say_goodbye(&session.handle(), &self.kill, &format!("locked ({})", l.id));
        }
        self.grant = Some(grant);
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = self.channels.enter() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let id = channel.id();
        // Callback model: the Channel object is dropped, never left unread.
        drop(channel);
        reply.accept().await;
        self.session_channels.insert(id, slot);
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.session_channels.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // No terminals here. (A client that forces one with -tt gives up at this reply.)
        session.channel_failure(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_session_request(channel, "shell", session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_session_request(channel, "exec", session)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_session_request(channel, &format!("subsystem {name}"), session)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(grant) = self.grant.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let target = format!("{}:{port}", super::clean(host));
        let deny = |reason: &str| self.deny_channel("direct-tcpip", &target, reason);
        let permit::Connect {
            port,
            allowed_by_name,
        } = match permit::connect(&grant, &self.server.settings, host, port) {
            Ok(c) => c,
            Err(r) => {
                deny(&r.to_string());
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                return Ok(());
            }
        };
        let tunnel = match &self.server.tunnels {
            Some(t) => match tunnel::name::from_host(host, &t.domain) {
                Some(name) => match self.server.registry.route(&name, port) {
                    // Reached by name only: a tunnel has no address a CIDR rule could allow.
                    Some(_) if !allowed_by_name => {
                        crate::metrics::count(&crate::metrics::get().tunnel_visits, "denied");
                        deny("not in ssh.permit_open");
                        reply
                            .reject(ChannelOpenFailure::AdministrativelyProhibited)
                            .await;
                        return Ok(());
                    }
                    Some(to) => Some((name, to)),
                    // An owned name or one under the domain is never looked up in DNS.
                    None if self.server.registry.is_owned(&name)
                        || tunnel::name::under_domain(host, &t.domain) =>
                    {
                        crate::metrics::count(&crate::metrics::get().tunnel_visits, "no_tunnel");
                        deny("no live tunnel publishes this name and port");
                        reply.reject(ChannelOpenFailure::ConnectFailed).await;
                        return Ok(());
                    }
                    None => None,
                },
                None if tunnel::name::under_domain(host, &t.domain) => {
                    crate::metrics::count(&crate::metrics::get().tunnel_visits, "no_tunnel");
                    deny("not a tunnel name (one DNS label under tunnels.domain)");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    return Ok(());
                }
                None => None,
            },
            None => None,
        };
        let Some(slot) = self.channels.enter() else {
            deny("too many channels on this connection (ssh.max_channels)");
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        if let Some((name, to)) = tunnel {
            // The publisher's channel open waits on its session: never on this loop.
            tokio::spawn(forward::to_tunnel(
                self.server.clone(),
                channel,
                reply,
                forward::Visit { to, name, port },
                self.peer,
                slot,
                self.live_session(),
            ));
            return Ok(());
        }
        // Connecting takes time: never on the session loop.
        tokio::spawn(forward::direct(
            self.server.clone(),
            channel,
            reply,
            host.to_string(),
            port,
            allowed_by_name,
            self.peer,
            grant.user,
            slot,
            self.live_session(),
        ));
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let target = format!("{address}:{port}");
        let Some(grant) = self.grant.clone() else {
            return Ok(false);
        };
        if let Some(t) = &self.server.tunnels {
            if let Some(name) = tunnel::name::from_host(address, &t.domain) {
                let max = t.max_per_identity;
                let via = tunnel::Via::Tcp(address.to_string());
                return Ok(self
                    .publish_name(&grant, name, via, *port, max, session.handle())
                    .await);
            }
        }
        let deny = |reason: &str| {
            self.deny_channel("tcpip-forward", &target, reason);
            Ok(false)
        };
        let held = self.held();
        let requested = match permit::listen(&grant, &self.server.settings, address, *port, held) {
            Ok(p) => p,
            Err(r) => return deny(&r.to_string()),
        };
        let range = self.server.settings.listen_ports.clone();
        // Ports allotted to access grants are their devices' only, online or not.
        let reserved = match (&grant.access, &self.server.grants) {
            (None, Some(g)) => match g.allotted_ports() {
                Some(r) => r,
                None => return deny("the grant store cannot say which ports are allotted"),
            },
            _ => Default::default(),
        };
        if reserved.contains(&requested) {
            return deny("the port is allotted to an access grant");
        }
        let bind = || {
            forward::bind_tcp(
                self.server.settings.listen_address,
                requested,
                range.clone(),
                &reserved,
            )
        };
        let listener = match bind() {
            Ok(l) => l,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && self.evict_port(&grant, requested).await =>
            {
                // The stale session's listener closes as its session ends: soon, not at once.
                let deadline = tokio::time::Instant::now() + STALE_PING;
                loop {
                    match bind() {
                        Ok(l) => break l,
                        Err(e) if tokio::time::Instant::now() >= deadline => {
                            return deny(&format!("cannot listen: {e}"))
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }
            Err(e) => return deny(&format!("cannot listen: {e}")),
        };
        let bound = listener.local_addr().map(|a| a.port()).unwrap_or(requested);
        *port = u32::from(bound);
        info!(target: "sluice::ssh", peer = %self.peer, user = grant.user, key = grant.key, listen = %format!("{}:{bound}", self.server.settings.listen_address), "reverse forward opened");
        crate::audit::record(|| crate::audit::Event::ReverseForwardOpened {
            user: grant.user.clone(),
            key: grant.key.clone(),
            listen: format!("{}:{bound}", self.server.settings.listen_address),
            peer: self.peer.to_string(),
        });
        let hold = self.server.ports.hold(
            bound,
            crate::ssh::ports::Holder {
                session: self.id,
                identity: grant.identity.clone(),
                handle: session.handle(),
            },
        );
        let forwarding = forward::reverse_tcp(
            self.server.clone(),
            listener,
            session.handle(),
            address.to_string(),
            u32::from(bound),
            self.channels.clone(),
            self.live_session(),
        );
        // The hold ends with the task (cancelled, or aborted when the session ends).
        let task = tokio::spawn(async move {
            let _hold = hold;
            forwarding.await;
        });
        if let Some(s) = self.live_session() {
            s.listen(format!("{}:{bound}", self.server.settings.listen_address));
        }
        self.forwards
            .insert((address.to_string(), u32::from(bound)), task);
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let name = self
            .server
            .tunnels
            .as_ref()
            .and_then(|t| tunnel::name::from_host(address, &t.domain));
        if let (Some(name), Ok(p)) = (name, u16::try_from(port)) {
            return Ok(self.withdraw(name, p));
        }
        match self.forwards.remove(&(address.to_string(), port)) {
            Some(task) => {
                task.abort();
                if let Some(s) = self.live_session() {
                    s.unlisten(&format!("{}:{port}", self.server.settings.listen_address));
                }
                info!(target: "sluice::ssh", peer = %self.peer, port, "reverse forward cancelled");
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(grant) = self.grant.clone() else {
            return Ok(false);
        };
        // `-R /NAME:...` with [tunnels]: Preevy's way of naming a tunnel, on port 80.
        if let Some(t) = &self.server.tunnels {
            if let Some(name) = tunnel::name::from_socket_path(socket_path) {
                let (via, max) = (
                    tunnel::Via::Socket(socket_path.to_string()),
                    t.max_per_identity,
                );
                let port = u32::from(tunnel::http::HTTP_PORT);
                return Ok(self
                    .publish_name(&grant, name, via, port, max, session.handle())
                    .await);
            }
        }
        let deny = |reason: &str| {
            self.deny_channel("streamlocal-forward", socket_path, reason);
            Ok(false)
        };
        let held = self.held();
        let name = match permit::listen_socket(&grant, &self.server.settings, socket_path, held) {
            Ok(n) => n,
            Err(r) => return deny(&r.to_string()),
        };
        let (claim, listener) = match self.server.sockets.claim(&self.server.socket_dir, &name) {
            Ok(c) => c,
            Err(e) => return deny(&format!("cannot listen: {e}")),
        };
        info!(target: "sluice::ssh", peer = %self.peer, user = grant.user, key = grant.key, socket = %claim.path().display(), "reverse forward opened");
        crate::audit::record(|| crate::audit::Event::ReverseForwardOpened {
            user: grant.user.clone(),
            key: grant.key.clone(),
            listen: claim.path().display().to_string(),
            peer: self.peer.to_string(),
        });
        let task = tokio::spawn(forward::reverse_unix(
            self.server.clone(),
            listener,
            session.handle(),
            socket_path.to_string(),
            self.channels.clone(),
            self.live_session(),
        ));
        if let Some(s) = self.live_session() {
            s.listen(claim.path().display().to_string());
        }
        self.sockets.insert(socket_path.to_string(), (task, claim));
        Ok(true)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if self.server.tunnels.is_some() {
            if let Some(name) = tunnel::name::from_socket_path(socket_path) {
                return Ok(self.withdraw(name, tunnel::http::HTTP_PORT));
            }
        }
        match self.sockets.remove(socket_path) {
            Some((task, claim)) => {
                task.abort();
                if let Some(s) = self.live_session() {
                    s.unlisten(&claim.path().display().to_string());
                }
                drop(claim);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
