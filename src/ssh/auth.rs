//! Who may log in, decided without sockets: a key or certificate, the user it logs in as, the
//! client's address and the time in; a [`Login`] or a [`Denial`] with its reason out.
//!
//! The handler (`handler.rs`) calls these from russh's callbacks and does the rest: logging,
//! penalties, the session's expiry timer.

use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Algorithm, Certificate, HashAlg, PublicKey};

use super::keys::KeySet;
use super::policy::{KeyPermitOpen, PermitListen};
use crate::net::Cidr;

/// What an authenticated client may do, from its key line or certificate.
#[derive(Debug, Clone)]
pub(crate) struct Login {
    pub(crate) user: String,
    /// How it authenticated, for logs: key fingerprint and origin, or certificate id.
    pub(crate) label: String,
    /// The fingerprint of the key that signed (a certificate's own key), `SHA256:...`.
    pub(crate) key: String,
    /// Who this is, for owning tunnel names: the key's fingerprint, or for a certificate its
    /// CA, key id and login (a re-issued certificate keeps its names).
    pub(crate) identity: String,
    pub(crate) port_forwarding: bool,
    pub(crate) permit_open: Option<Vec<KeyPermitOpen>>,
    pub(crate) permit_listen: Option<Vec<PermitListen>>,
    pub(crate) expires: Option<SystemTime>,
    /// The access grant this login came with (a certificate from sluice's own CA): then
    /// exactly its port and name may be published, whatever the lists above say.
    pub(crate) access: Option<Access>,
    /// Whether the key's own namespace (`NAME-<short id>`) is open to it: not for grants,
    /// which publish exactly their port and name.
    pub(crate) own_namespace: bool,
    /// The certificate it authenticated with, if any.
    pub(crate) certificate: Option<crate::sessions::CertId>,
    /// The grant's device, with `access`.
    pub(crate) device: Option<String>,
}

impl Login {
    /// Who this is, for the live sessions, locks and the trail.
    pub(crate) fn identity(&self) -> crate::sessions::Identity {
        crate::sessions::Identity {
            user: self.user.clone(),
            key: self.key.clone(),
            certificate: self.certificate.clone(),
            grant: self.access.as_ref().map(|a| a.grant.clone()),
            device: self.device.clone(),
        }
    }
}

fn cert_id(cert: &Certificate) -> crate::sessions::CertId {
    crate::sessions::CertId {
        key_id: cert.key_id().to_string(),
        serial: cert.serial(),
        ca: cert
            .signature_key()
            .fingerprint(HashAlg::Sha256)
            .to_string(),
    }
}

/// What an access grant lets its session publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Access {
    /// The grant id.
    pub(crate) grant: String,
    /// The one `-R` port.
    pub(crate) port: u16,
    /// The one tunnel name (any port), with `[tunnels]`.
    pub(crate) name: Option<String>,
}

/// A refused attempt: what was offered (for the log) and why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Denial {
    /// `ED25519 SHA256:...`, or `certificate ID ... serial ... CA SHA256:...`.
    pub(crate) what: String,
    pub(crate) reason: Reason,
}

/// Why an attempt was refused. With several matching lines, the last line's reason is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reason {
    /// An RSA key signing with SHA-1 (`ssh-rsa`).
    RsaSha1,
    /// No authorized_keys line for this key.
    KeyNotAuthorized,
    /// The line's `from=` does not allow the client's address.
    FromNotAllowed,
    /// The line's `expiry-time` has passed.
    KeyExpired,
    /// The CA signed the certificate with SHA-1.
    CaSha1,
    /// No `cert-authority` line for the signing key.
    CaNotTrusted,
    /// Before the certificate's valid-after time.
    CertNotYetValid(SystemTime),
    /// At or after the certificate's valid-before time.
    CertExpired(SystemTime),
    /// Another validation failure (signature, fingerprint).
    CertInvalid(String),
    /// A host certificate offered for a login.
    NotUserCert,
    /// A certificate with no principals (OpenSSH refuses these too).
    NoPrincipals,
    /// None of these principals (as listed) may log in as this user.
    PrincipalNotAllowed(Vec<String>),
    /// The `cert-authority` line's `from=` does not allow the client's address.
    CaFromNotAllowed,
    /// The `cert-authority` line's `expiry-time` has passed.
    CaLineExpired,
    /// The certificate's `source-address` (as written) does not list the client.
    SourceAddress(String),
    /// A critical option sluice does not know (refused, as OpenSSH does).
    UnsupportedCritical(String),
    /// A certificate from sluice's own CA whose grant does not let it in.
    Grant(String),
    /// A lock matches the key, grant, device or source (its id and reason).
    Locked(String, String),
    /// The audit trail cannot be written and `[audit] on_failure` is `refuse`.
    AuditUnavailable,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stamp = |t: &SystemTime| humantime::format_rfc3339_seconds(*t).to_string();
        match self {
            Reason::RsaSha1 => f.write_str("ssh-rsa (SHA-1) signatures are not accepted"),
            Reason::KeyNotAuthorized => f.write_str("key not authorized"),
            Reason::AuditUnavailable => f.write_str("the audit trail cannot be written"),
            Reason::Locked(id, reason) if reason.is_empty() => write!(f, "locked ({id})"),
            Reason::Locked(id, reason) => write!(f, "locked ({id}): {reason}"),
            Reason::FromNotAllowed => f.write_str("client address not allowed by from="),
            Reason::KeyExpired => f.write_str("key expired (expiry-time)"),
            Reason::CaSha1 => f.write_str("the CA signed with ssh-rsa (SHA-1)"),
            Reason::CaNotTrusted => f.write_str("certificate authority not trusted"),
            // The words sshd uses ("Certificate invalid: expired"), with the time.
            Reason::CertNotYetValid(t) => {
                write!(
                    f,
                    "certificate not valid: not yet valid (from {})",
                    stamp(t)
                )
            }
            Reason::CertExpired(t) => write!(f, "certificate not valid: expired (at {})", stamp(t)),
            Reason::CertInvalid(e) => write!(f, "certificate not valid: {e}"),
            Reason::NotUserCert => f.write_str("not a user certificate"),
            Reason::NoPrincipals => f.write_str("certificate lists no principals"),
            Reason::PrincipalNotAllowed(listed) => {
                let listed: Vec<String> = listed.iter().map(|p| super::clean(p)).collect();
                write!(
                    f,
                    "no principal of the certificate ({}) allowed for this login",
                    listed.join(",")
                )
            }
            Reason::CaFromNotAllowed => {
                f.write_str("client address not allowed by from= on the cert-authority line")
            }
            Reason::CaLineExpired => f.write_str("cert-authority line expired (expiry-time)"),
            Reason::SourceAddress(v) => {
                write!(
                    f,
                    "client address not in source-address {}",
                    super::clean(v)
                )
            }
            Reason::UnsupportedCritical(name) => {
                write!(f, "unsupported critical option {}", super::clean(name))
            }
            Reason::Grant(why) => write!(f, "access grant refused: {why}"),
        }
    }
}

/// `SHA256:...`, as OpenSSH prints it.
pub(crate) fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The algorithm as sshd names it in its log lines.
fn alg_name(key: &PublicKey) -> String {
    match key.algorithm() {
        Algorithm::Ed25519 => "ED25519".into(),
        Algorithm::Rsa { .. } => "RSA".into(),
        Algorithm::Ecdsa { .. } => "ECDSA".into(),
        other => other.to_string().to_uppercase(),
    }
}

fn key_label(key: &PublicKey) -> String {
    format!("{} {}", alg_name(key), fingerprint(key))
}

/// Whether a key offered without a signature is worth asking to sign with. With any CA
/// configured the answer waits for the signature: a certificate is offered as its bare key.
pub(crate) fn offer(keys: &KeySet, key: &PublicKey, algorithm: &Algorithm) -> Result<(), Denial> {
    if *algorithm == (Algorithm::Rsa { hash: None }) {
        return Err(Denial {
            what: alg_name(key),
            reason: Reason::RsaSha1,
        });
    }
    if keys.has_cas() || keys.lines_for(key).next().is_some() {
        return Ok(());
    }
    Err(Denial {
        what: key_label(key),
        reason: Reason::KeyNotAuthorized,
    })
}

/// A key that has signed: the first authorized_keys line for it that lets `peer` in at `now`.
pub(crate) fn authorize_key(
    keys: &KeySet,
    user: &str,
    key: &PublicKey,
    peer: IpAddr,
    now: SystemTime,
) -> Result<Login, Denial> {
    let what = key_label(key);
    let mut reason = Reason::KeyNotAuthorized;
    for line in keys.lines_for(key) {
        let o = &line.options;
        if o.from.as_ref().is_some_and(|f| !f.allows(peer)) {
            reason = Reason::FromNotAllowed;
            continue;
        }
        if o.expiry.is_some_and(|e| e <= now) {
            reason = Reason::KeyExpired;
            continue;
        }
        return Ok(Login {
            user: user.to_string(),
            label: format!("{what} ({})", line.origin),
            key: fingerprint(key),
            identity: fingerprint(key),
            port_forwarding: o.port_forwarding,
            permit_open: o.permit_open.clone(),
            permit_listen: o.permit_listen.clone(),
            expires: o.expiry,
            access: None,
            own_namespace: true,
            certificate: None,
            device: None,
        });
    }
    Err(Denial { what, reason })
}

/// A certificate whose key has signed (russh checked that): the first `cert-authority` line
/// for its CA under which it is valid for `user` from `peer` at `now`.
pub(crate) fn authorize_cert(
    keys: &KeySet,
    user: &str,
    cert: &Certificate,
    peer: IpAddr,
    now: SystemTime,
) -> Result<Login, Denial> {
    let ca_fp = cert.signature_key().fingerprint(HashAlg::Sha256);
    let what = format!(
        "certificate ID {} serial {} CA {ca_fp}",
        super::clean(cert.key_id()),
        cert.serial()
    );
    let deny = |reason| Denial {
        what: what.clone(),
        reason,
    };
    // SHA-1 CA signatures are refused, as OpenSSH does since 8.2 (CASignatureAlgorithms).
    if cert.signature().algorithm() == (Algorithm::Rsa { hash: None }) {
        return Err(deny(Reason::CaSha1));
    }
    let mut reason = Reason::CaNotTrusted;
    for ca in keys.cas_for(cert.signature_key()) {
        match check_cert(cert, &ca.options, &ca_fp, user, peer, now) {
            Ok(forwarding) => {
                let o = &ca.options;
                let expires = match (cert.valid_before_time(), o.expiry) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                return Ok(Login {
                    user: user.to_string(),
                    label: format!("{what} ({})", ca.origin),
                    key: cert.public_key().fingerprint(HashAlg::Sha256).to_string(),
                    identity: format!("cert {ca_fp} {} {user}", super::clean(cert.key_id())),
                    port_forwarding: forwarding,
                    permit_open: o.permit_open.clone(),
                    permit_listen: o.permit_listen.clone(),
                    expires,
                    access: None,
                    own_namespace: true,
                    certificate: Some(cert_id(cert)),
                    device: None,
                });
            }
            Err(r) => reason = r,
        }
    }
    Err(deny(reason))
}

/// A certificate from sluice's own CA whose grant `check` accepted: exactly the grant's port
/// and name, the `-W/-L` targets it lists (none by default), until it expires.
pub(crate) fn grant_login(user: &str, cert: &Certificate, a: &crate::grant::Allowance) -> Login {
    Login {
        user: user.to_string(),
        label: format!(
            "certificate ID {} serial {} (sluice grant, device {})",
            super::clean(cert.key_id()),
            cert.serial(),
            super::clean(&a.device)
        ),
        key: cert.public_key().fingerprint(HashAlg::Sha256).to_string(),
        identity: a.identity(),
        port_forwarding: true,
        permit_open: Some(
            a.permit_open
                .iter()
                .filter_map(|t| KeyPermitOpen::parse(t))
                .collect(),
        ),
        // Nothing by the key lists (unix sockets included): `access` says what may be published.
        permit_listen: Some(Vec::new()),
        expires: Some(a.expires),
        access: Some(Access {
            grant: a.grant.clone(),
            port: a.port,
            name: a.name.clone(),
        }),
        own_namespace: false,
        certificate: Some(cert_id(cert)),
        device: Some(a.device.clone()),
    }
}

/// One `cert-authority` line against the certificate; `Ok(port forwarding allowed)`.
fn check_cert(
    cert: &Certificate,
    o: &super::authorized_keys::KeyOptions,
    ca_fp: &russh::keys::ssh_key::Fingerprint,
    user: &str,
    peer: IpAddr,
    now: SystemTime,
) -> Result<bool, Reason> {
    let unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Err(e) = cert.validate_at(unix, [ca_fp]) {
        return Err(invalid_reason(cert, now, e));
    }
    if cert.cert_type() != CertType::User {
        return Err(Reason::NotUserCert);
    }
    let principals = cert.valid_principals();
    if principals.is_empty() {
        return Err(Reason::NoPrincipals);
    }
    let principal_ok = match &o.principals {
        Some(allowed) => principals.iter().any(|p| allowed.contains(p)),
        None => principals.iter().any(|p| p == user),
    };
    if !principal_ok {
        return Err(Reason::PrincipalNotAllowed(principals.to_vec()));
    }
    if o.from.as_ref().is_some_and(|f| !f.allows(peer)) {
        return Err(Reason::CaFromNotAllowed);
    }
    if o.expiry.is_some_and(|e| e <= now) {
        return Err(Reason::CaLineExpired);
    }
    for (name, value) in cert.critical_options().iter() {
        match name.as_str() {
            "source-address" => {
                let allowed = value
                    .split(',')
                    .filter_map(|c| Cidr::parse(c.trim()))
                    .any(|c| c.contains(peer));
                if !allowed {
                    return Err(Reason::SourceAddress(value.clone()));
                }
            }
            // sluice runs no commands: a forced command restricts nothing it offers.
            "force-command" => {}
            other => return Err(Reason::UnsupportedCritical(other.to_string())),
        }
    }
    Ok(o.port_forwarding && cert.extensions().contains_key("permit-port-forwarding"))
}

/// Why `validate_at` refused a certificate signed by a trusted CA. russh has checked its
/// signature before the handler sees it, so a failure with the time in range is another one.
fn invalid_reason(cert: &Certificate, now: SystemTime, e: russh::keys::ssh_key::Error) -> Reason {
    if let Some(after) = cert.valid_after_time().filter(|a| now < *a) {
        return Reason::CertNotYetValid(after);
    }
    if let Some(before) = cert.valid_before_time().filter(|b| now >= *b) {
        return Reason::CertExpired(before);
    }
    Reason::CertInvalid(e.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use russh::keys::ssh_key::certificate::Builder;
    use russh::keys::ssh_key::private::Ed25519Keypair;
    use russh::keys::PrivateKey;

    use super::*;
    use crate::ssh::authorized_keys;
    use crate::ssh::tz::SystemTz;

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn line(key: &PrivateKey) -> String {
        key.public_key().to_openssh().unwrap()
    }

    fn keyset(text: &str) -> KeySet {
        let (keys, skipped) = authorized_keys::parse(text.as_bytes(), "test", &SystemTz);
        assert!(skipped.is_empty(), "{skipped:?}");
        KeySet::from_keys(keys)
    }

    const T0: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A user certificate for `subject`, signed by `ca`, valid for an hour from `T0`.
    fn cert(
        ca: &PrivateKey,
        subject: &PrivateKey,
        principals: &[&str],
        edit: impl FnOnce(&mut Builder),
    ) -> Certificate {
        let mut b = Builder::new(
            [7u8; 16],
            subject.public_key().key_data().clone(),
            T0,
            T0 + 3600,
        )
        .unwrap();
        edit(&mut b);
        // A user certificate unless `edit` chose the type (it can be set once).
        let _ = b.cert_type(CertType::User);
        b.key_id("device-42").unwrap();
        b.serial(9).unwrap();
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        if principals.is_empty() {
            // An empty list on the wire; OpenSSH reads it as "any", sluice and sshd refuse it.
            b.all_principals_valid().unwrap();
        }
        b.extension("permit-port-forwarding", "").unwrap();
        b.sign(ca).unwrap()
    }

    #[test]
    fn a_listed_key_gets_its_lines_options() {
        let k = key(1);
        let keys = keyset(&format!("permitopen=\"db:5432\" {}\n", line(&k)));
        let g = authorize_key(&keys, "alice", k.public_key(), ip("10.0.0.1"), at(T0)).unwrap();
        assert_eq!(g.user, "alice");
        assert!(g.key.starts_with("SHA256:"), "{}", g.key);
        assert!(g.label.starts_with("ED25519 SHA256:"), "{}", g.label);
        assert!(g.port_forwarding);
        assert_eq!(g.permit_open.map(|p| p.len()), Some(1));
        assert_eq!(g.expires, None);
    }

    #[test]
    fn key_refusals_name_their_reason() {
        let (k, other) = (key(1), key(2));
        let keys = keyset(&format!("{}\n", line(&k)));
        let d =
            authorize_key(&keys, "alice", other.public_key(), ip("10.0.0.1"), at(T0)).unwrap_err();
        assert_eq!(d.reason, Reason::KeyNotAuthorized);
        assert_eq!(
            offer(&keys, other.public_key(), &Algorithm::Ed25519).unwrap_err(),
            d
        );
        assert!(offer(&keys, k.public_key(), &Algorithm::Ed25519).is_ok());
        let rsa_sha1 = Algorithm::Rsa { hash: None };
        assert_eq!(
            offer(&keys, k.public_key(), &rsa_sha1).unwrap_err().reason,
            Reason::RsaSha1
        );

        let keys = keyset(&format!("from=\"192.0.2.0/24\" {}\n", line(&k)));
        let d = authorize_key(&keys, "alice", k.public_key(), ip("10.0.0.1"), at(T0)).unwrap_err();
        assert_eq!(d.reason, Reason::FromNotAllowed);
        assert!(authorize_key(&keys, "alice", k.public_key(), ip("192.0.2.9"), at(T0)).is_ok());

        let keys = keyset(&format!("expiry-time=\"20300101\" {}\n", line(&k)));
        let exp = authorize_key(&keys, "a", k.public_key(), ip("10.0.0.1"), at(T0))
            .unwrap()
            .expires
            .unwrap();
        let d = authorize_key(&keys, "a", k.public_key(), ip("10.0.0.1"), exp).unwrap_err();
        assert_eq!(d.reason, Reason::KeyExpired);
    }

    #[test]
    fn the_first_line_that_lets_the_client_in_wins() {
        let k = key(1);
        let keys = keyset(&format!(
            "from=\"192.0.2.1\" {l}\nrestrict,permitopen=\"db:5432\" {l}\n",
            l = line(&k)
        ));
        let g = authorize_key(&keys, "a", k.public_key(), ip("10.0.0.1"), at(T0)).unwrap();
        assert!(!g.port_forwarding, "restrict on the second line");
        assert!(g.label.ends_with("(test:2)"), "{}", g.label);
    }

    #[test]
    fn a_valid_certificate_gets_a_grant_bounded_by_its_validity() {
        let (ca, dev) = (key(10), key(11));
        let keys = keyset(&format!("cert-authority {}\n", line(&ca)));
        let c = cert(&ca, &dev, &["gw-1"], |_| {});
        let g = authorize_cert(&keys, "gw-1", &c, ip("10.0.0.1"), at(T0 + 60)).unwrap();
        assert!(g.port_forwarding);
        assert_eq!(g.expires, Some(at(T0 + 3600)));
        assert_eq!(g.key, fingerprint(dev.public_key()));
        assert!(
            g.label
                .starts_with("certificate ID device-42 serial 9 CA SHA256:"),
            "{}",
            g.label
        );
        // A shorter expiry-time on the CA line bounds it further.
        let keys = keyset(&format!(
            "cert-authority,expiry-time=\"20270101\" {}\n",
            line(&ca)
        ));
        let g = authorize_cert(&keys, "gw-1", &c, ip("10.0.0.1"), at(T0 + 60));
        assert_eq!(
            g.unwrap_err().reason,
            Reason::CaLineExpired,
            "2027 is before T0 (2027-01-15)"
        );
    }

    #[test]
    fn certificate_refusals_name_their_reason() {
        let (ca, dev, stranger) = (key(10), key(11), key(12));
        let keys = keyset(&format!("cert-authority {}\n", line(&ca)));
        let now = at(T0 + 60);
        let peer = ip("10.0.0.1");
        let reason = |c: &Certificate, user: &str, now| {
            authorize_cert(&keys, user, c, peer, now)
                .unwrap_err()
                .reason
        };
        let c = cert(&ca, &dev, &["gw-1"], |_| {});
        assert_eq!(
            reason(&c, "gw-1", at(T0 - 1)),
            Reason::CertNotYetValid(at(T0))
        );
        assert_eq!(
            reason(&c, "gw-1", at(T0 + 3600)),
            Reason::CertExpired(at(T0 + 3600))
        );
        assert_eq!(
            reason(&c, "root", now),
            Reason::PrincipalNotAllowed(vec!["gw-1".into()])
        );
        let c = cert(&stranger, &dev, &["gw-1"], |_| {});
        assert_eq!(reason(&c, "gw-1", now), Reason::CaNotTrusted);
        let c = cert(&ca, &dev, &[], |_| {});
        assert_eq!(reason(&c, "gw-1", now), Reason::NoPrincipals);
        let c = cert(&ca, &dev, &["gw-1"], |b| {
            b.cert_type(CertType::Host).unwrap();
        });
        assert_eq!(reason(&c, "gw-1", now), Reason::NotUserCert);
        let c = cert(&ca, &dev, &["gw-1"], |b| {
            b.critical_option("source-address", "192.0.2.0/24,198.51.100.7")
                .unwrap();
        });
        assert_eq!(
            reason(&c, "gw-1", now),
            Reason::SourceAddress("192.0.2.0/24,198.51.100.7".into())
        );
        assert!(authorize_cert(&keys, "gw-1", &c, ip("198.51.100.7"), now).is_ok());
        let c = cert(&ca, &dev, &["gw-1"], |b| {
            b.critical_option("verify-required", "").unwrap();
        });
        assert_eq!(
            reason(&c, "gw-1", now),
            Reason::UnsupportedCritical("verify-required".into())
        );
        // force-command restricts nothing sluice offers: allowed.
        let c = cert(&ca, &dev, &["gw-1"], |b| {
            b.critical_option("force-command", "/bin/true").unwrap();
        });
        assert!(authorize_cert(&keys, "gw-1", &c, peer, now).is_ok());
    }

    #[test]
    fn ca_line_options_apply_to_its_certificates() {
        let (ca, dev) = (key(10), key(11));
        let c = cert(&ca, &dev, &["gw-1", "ops"], |_| {});
        let now = at(T0 + 60);
        let peer = ip("10.0.0.1");
        // principals= on the line replaces the login-name match.
        let keys = keyset(&format!(
            "cert-authority,principals=\"ops\" {}\n",
            line(&ca)
        ));
        assert!(authorize_cert(&keys, "anyone", &c, peer, now).is_ok());
        let keys = keyset(&format!(
            "cert-authority,from=\"192.0.2.0/24\" {}\n",
            line(&ca)
        ));
        assert_eq!(
            authorize_cert(&keys, "gw-1", &c, peer, now)
                .unwrap_err()
                .reason,
            Reason::CaFromNotAllowed
        );
        // Forwarding needs both the line and the certificate's extension.
        let keys = keyset(&format!("cert-authority,restrict {}\n", line(&ca)));
        assert!(
            !authorize_cert(&keys, "gw-1", &c, peer, now)
                .unwrap()
                .port_forwarding
        );
        let keys = keyset(&format!("cert-authority {}\n", line(&ca)));
        let bare = {
            let mut b =
                Builder::new([7u8; 16], dev.public_key().key_data().clone(), T0, T0 + 60).unwrap();
            b.cert_type(CertType::User).unwrap();
            b.valid_principal("gw-1").unwrap();
            b.sign(&ca).unwrap()
        };
        assert!(
            !authorize_cert(&keys, "gw-1", &bare, peer, at(T0 + 1))
                .unwrap()
                .port_forwarding
        );
    }

    #[test]
    fn reasons_read_like_sshd() {
        assert_eq!(
            Reason::CertExpired(at(T0)).to_string(),
            "certificate not valid: expired (at 2027-01-15T08:00:00Z)"
        );
        assert_eq!(
            Reason::PrincipalNotAllowed(vec!["a b".into(), "c".into()]).to_string(),
            "no principal of the certificate (a%20b,c) allowed for this login"
        );
    }
}
