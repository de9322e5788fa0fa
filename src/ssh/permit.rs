//! What an authenticated session may open, decided without sockets: `-W/-L/-J` connects,
//! `-R` listeners on ports and on unix sockets. The handler turns a [`Refusal`] into a
//! `denied ...` log line and a refused request.

use std::fmt;
use std::ops::RangeInclusive;

use super::auth::Login;
use super::sockets;
use crate::config::SshSettings;
use crate::net::{HostMatch, PermitListen};
use crate::tunnel;

/// Why a forward was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not a host name or an address literal.
    MalformedHost,
    /// Port 0 for a connect, or above 65535.
    BadPort,
    /// The key or certificate does not allow forwarding (`restrict`, no extension).
    NoForwarding,
    /// The key line's `permitopen` does not list the target.
    NotInKeyPermitOpen,
    /// `[ssh] permit_open` does not list the target.
    NotInPermitOpen,
    /// The key line's `permitlisten` does not list the address and port.
    NotInKeyPermitListen,
    /// A fixed port outside `[ssh] listen_ports`.
    OutsideListenPorts(RangeInclusive<u16>),
    /// `[ssh] max_forwards` listeners already open on this connection.
    TooManyForwards,
    /// A socket name that is not 1-100 of `[A-Za-z0-9._-]`.
    BadSocketName,
    /// Socket names are shared by every key: a key must list the names it may take.
    SocketNeedsPermitListen,
    /// The key's `permitlisten` lists no matching `/name-glob`.
    SocketNotInPermitListen,
    /// An access grant allows its port, its name and the targets it lists, nothing else.
    NotInGrant(String),
    /// A tunnel name the key's `permitlisten` does not grant, outside its own namespace.
    NameNotPermitted {
        /// The key's short id: it may always publish `NAME-<own>`.
        own: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::MalformedHost => f.write_str("malformed host"),
            Refusal::BadPort => f.write_str("bad port"),
            Refusal::NoForwarding => f.write_str("port forwarding not permitted for this key"),
            Refusal::NotInKeyPermitOpen => f.write_str("not in the key's permitopen"),
            Refusal::NotInPermitOpen => f.write_str("not in ssh.permit_open"),
            Refusal::NotInKeyPermitListen => f.write_str("not in the key's permitlisten"),
            Refusal::OutsideListenPorts(r) => write!(
                f,
                "port outside ssh.listen_ports ({}-{})",
                r.start(),
                r.end()
            ),
            Refusal::TooManyForwards => {
                f.write_str("too many forwards on this connection (ssh.max_forwards)")
            }
            Refusal::BadSocketName => f.write_str(
                "the socket name must be 1-100 of [A-Za-z0-9._-], not starting with a dot",
            ),
            Refusal::SocketNeedsPermitListen => f.write_str(
                "unix-socket forwards need permitlisten=\"/name-glob\" on the key or cert-authority line",
            ),
            Refusal::SocketNotInPermitListen => {
                f.write_str("not in the key's permitlisten (socket entries are \"/name-glob\")")
            }
            Refusal::NotInGrant(id) => write!(
                f,
                "not allowed by access grant {id} (only its port, its name and the targets it lists)"
            ),
            Refusal::NameNotPermitted { own } => write!(
                f,
                "the name is not in the key's permitlisten (\"NAME-GLOB:PORT\"); this key may publish NAME-{own}"
            ),
        }
    }
}

/// A connect (`direct-tcpip`) that may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Connect {
    pub(crate) port: u16,
    /// `[ssh] permit_open` allows the name itself; otherwise only addresses it resolves to
    /// that an address rule allows (checked after the lookup).
    pub(crate) allowed_by_name: bool,
}

/// A port a client names to connect to or to publish: not 0, at most 65535.
fn nonzero_port(port: u32) -> Result<u16, Refusal> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(Refusal::BadPort)
}

/// `-W/-L/-J HOST:PORT`.
pub(crate) fn connect(
    grant: &Login,
    settings: &SshSettings,
    host: &str,
    port: u32,
) -> Result<Connect, Refusal> {
    // A host name or address literal, nothing else reaches the resolver or the logs.
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
    if !host_ok {
        return Err(Refusal::MalformedHost);
    }
    let port = nonzero_port(port)?;
    if !grant.port_forwarding {
        return Err(Refusal::NoForwarding);
    }
    if grant
        .permit_open
        .as_ref()
        .is_some_and(|list| !list.iter().any(|p| p.matches(host, port)))
    {
        return Err(not_in_key(grant, Refusal::NotInKeyPermitOpen));
    }
    let rules = &settings.permit_open;
    let allowed_by_name = rules.iter().any(|p| p.allows_name(host, port));
    let by_addr_possible = rules
        .iter()
        .any(|p| matches!(p.host, HostMatch::Net(_)) && p.port.matches(port));
    if !allowed_by_name && !by_addr_possible {
        return Err(Refusal::NotInPermitOpen);
    }
    Ok(Connect {
        port,
        allowed_by_name,
    })
}

/// `-R [ADDRESS:]PORT`: the port to bind (0: any in `listen_ports`). `held` counts the
/// connection's open listeners.
pub(crate) fn listen(
    grant: &Login,
    settings: &SshSettings,
    address: &str,
    port: u32,
    held: usize,
) -> Result<u16, Refusal> {
    let requested = u16::try_from(port).map_err(|_| Refusal::BadPort)?;
    if !grant.port_forwarding {
        return Err(Refusal::NoForwarding);
    }
    // A grant's one port, asked for by number (never 0, whatever the bind address).
    if let Some(a) = &grant.access {
        if requested != a.port {
            return Err(Refusal::NotInGrant(a.grant.clone()));
        }
    } else if grant
        .permit_listen
        .as_ref()
        .is_some_and(|l| !l.iter().any(|p| p.matches(address, requested)))
    {
        return Err(not_in_key(grant, Refusal::NotInKeyPermitListen));
    }
    let range = &settings.listen_ports;
    if requested != 0 && !range.contains(&requested) {
        return Err(Refusal::OutsideListenPorts(range.clone()));
    }
    if held >= settings.max_forwards as usize {
        return Err(Refusal::TooManyForwards);
    }
    Ok(requested)
}

/// `-R /NAME:...`: the socket's file name.
pub(crate) fn listen_socket(
    grant: &Login,
    settings: &SshSettings,
    socket_path: &str,
    held: usize,
) -> Result<String, Refusal> {
    if !grant.port_forwarding {
        return Err(Refusal::NoForwarding);
    }
    let name = sockets::socket_name(socket_path).ok_or(Refusal::BadSocketName)?;
    if held >= settings.max_forwards as usize {
        return Err(Refusal::TooManyForwards);
    }
    // Socket names are one namespace for every key: without a per-key list, any key could
    // take (or wait for) another's name. Until names are scoped per identity, a key must
    // list the names it may publish.
    let allowed = grant
        .permit_listen
        .as_ref()
        .ok_or(Refusal::SocketNeedsPermitListen)?;
    if !allowed.iter().any(|p| p.matches_socket(&name)) {
        return Err(not_in_key(grant, Refusal::SocketNotInPermitListen));
    }
    Ok(name)
}

/// `-R NAME:PORT:...` with `[tunnels]`: whether the key may publish this name. The key's
/// own `permitlisten` decides when it has one, else `tunnels.permit_listen` (`config`); the
/// key's own namespace (`NAME-<short id>`) is always its own.
pub(crate) fn publish(
    grant: &Login,
    settings: &SshSettings,
    config: &[PermitListen],
    name: &str,
    port: u32,
    held: usize,
) -> Result<u16, Refusal> {
    // A name needs the port visitors use (80, 22, 443): 0 would allocate nothing.
    let port = nonzero_port(port)?;
    if !grant.port_forwarding {
        return Err(Refusal::NoForwarding);
    }
    if held >= settings.max_forwards as usize {
        return Err(Refusal::TooManyForwards);
    }
    if let Some(a) = &grant.access {
        return match &a.name {
            Some(n) if n == name => Ok(port),
            _ => Err(Refusal::NotInGrant(a.grant.clone())),
        };
    }
    let granted = grant
        .permit_listen
        .as_deref()
        .unwrap_or(config)
        .iter()
        .any(|p| p.matches_name(name, port));
    let own = tunnel::name::short_id(&grant.identity);
    if granted || (grant.own_namespace && tunnel::name::in_own_namespace(name, &own)) {
        Ok(port)
    } else {
        Err(not_in_key(grant, Refusal::NameNotPermitted { own }))
    }
}

/// A refusal by the key's own lists; a grant's lists are the grant's, so it says that.
fn not_in_key(grant: &Login, r: Refusal) -> Refusal {
    match &grant.access {
        Some(a) => Refusal::NotInGrant(a.grant.clone()),
        None => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::authorized_keys::parse_line;
    use crate::ssh::tz::SystemTz;

    /// The grant a key line with `options` gives.
    fn grant(options: &str) -> Login {
        let key = russh::keys::PrivateKey::from(
            russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[1; 32]),
        );
        let key = key.public_key().to_openssh().unwrap();
        let line = format!("{options} {key}").trim_start().to_string();
        let (_, o) = parse_line(&line, &SystemTz).unwrap();
        Login {
            user: "u".into(),
            label: "test".into(),
            key: "SHA256:test".into(),
            identity: "SHA256:test".into(),
            port_forwarding: o.port_forwarding,
            permit_open: o.permit_open,
            permit_listen: o.permit_listen,
            expires: None,
            access: None,
            own_namespace: true,
            certificate: None,
            device: None,
        }
    }

    fn settings(permit_open: &[&str]) -> SshSettings {
        SshSettings {
            permit_open: permit_open
                .iter()
                .map(|p| crate::net::PermitOpen::parse(p).unwrap())
                .collect(),
            listen_ports: 20000..=20010,
            max_forwards: 2,
            ..SshSettings::default()
        }
    }

    #[test]
    fn connects_need_both_the_key_and_the_server_to_allow_them() {
        let s = settings(&["db.internal:5432", "10.0.0.0/8:*"]);
        let any = grant("");
        assert_eq!(
            connect(&any, &s, "db.internal", 5432),
            Ok(Connect {
                port: 5432,
                allowed_by_name: true
            })
        );
        // A name no rule lists may still resolve into an allowed network: decided later.
        assert_eq!(
            connect(&any, &s, "app.internal", 80).map(|c| c.allowed_by_name),
            Ok(false)
        );
        let s_names_only = settings(&["db.internal:5432"]);
        assert_eq!(
            connect(&any, &s_names_only, "app.internal", 80),
            Err(Refusal::NotInPermitOpen)
        );
        assert_eq!(connect(&any, &s, "db.internal", 0), Err(Refusal::BadPort));
        assert_eq!(
            connect(&any, &s, "db.internal", 70000),
            Err(Refusal::BadPort)
        );
        assert_eq!(connect(&any, &s, "a b", 22), Err(Refusal::MalformedHost));
        assert_eq!(connect(&any, &s, "", 22), Err(Refusal::MalformedHost));
        assert_eq!(
            connect(&grant("restrict"), &s, "db.internal", 5432),
            Err(Refusal::NoForwarding)
        );
        let narrow = grant("permitopen=\"db.internal:5432\"");
        assert!(connect(&narrow, &s, "db.internal", 5432).is_ok());
        assert_eq!(
            connect(&narrow, &s, "10.1.1.1", 22),
            Err(Refusal::NotInKeyPermitOpen)
        );
    }

    #[test]
    fn listeners_stay_in_range_and_in_number() {
        let s = settings(&[]);
        let any = grant("");
        assert_eq!(listen(&any, &s, "localhost", 0, 0), Ok(0));
        assert_eq!(listen(&any, &s, "localhost", 20005, 1), Ok(20005));
        assert_eq!(
            listen(&any, &s, "localhost", 8080, 0),
            Err(Refusal::OutsideListenPorts(20000..=20010))
        );
        assert_eq!(
            Refusal::OutsideListenPorts(20000..=20010).to_string(),
            "port outside ssh.listen_ports (20000-20010)"
        );
        assert_eq!(
            listen(&any, &s, "localhost", 0, 2),
            Err(Refusal::TooManyForwards)
        );
        assert_eq!(
            listen(&any, &s, "localhost", 1 << 16, 0),
            Err(Refusal::BadPort)
        );
        let only = grant("permitlisten=\"localhost:20001\"");
        assert_eq!(listen(&only, &s, "localhost", 20001, 0), Ok(20001));
        assert_eq!(
            listen(&only, &s, "localhost", 20002, 0),
            Err(Refusal::NotInKeyPermitListen)
        );
    }

    #[test]
    fn sockets_need_a_listed_name() {
        let s = settings(&[]);
        assert_eq!(
            listen_socket(&grant(""), &s, "/app", 0),
            Err(Refusal::SocketNeedsPermitListen)
        );
        let g = grant("permitlisten=\"/preview-*\"");
        assert_eq!(
            listen_socket(&g, &s, "/preview-42", 0).as_deref(),
            Ok("preview-42")
        );
        assert_eq!(
            listen_socket(&g, &s, "/other", 0),
            Err(Refusal::SocketNotInPermitListen)
        );
        assert_eq!(listen_socket(&g, &s, "/.x", 0), Err(Refusal::BadSocketName));
        assert_eq!(
            listen_socket(&g, &s, "/preview-1", 2),
            Err(Refusal::TooManyForwards)
        );
    }

    #[test]
    fn names_come_from_permitlisten_or_the_keys_own_namespace() {
        let s = settings(&[]);
        let own = tunnel::name::short_id("SHA256:test");
        let any = grant("");
        assert_eq!(
            publish(&any, &s, &[], "myapp", 80, 0),
            Err(Refusal::NameNotPermitted { own: own.clone() })
        );
        assert_eq!(
            publish(&any, &s, &[], &format!("myapp-{own}"), 80, 0),
            Ok(80)
        );
        assert_eq!(
            publish(&any, &s, &[], &format!("myapp-{own}"), 0, 0),
            Err(Refusal::BadPort)
        );
        let g = grant("permitlisten=\"preview-*:80\",permitlisten=\"mydevice:*\"");
        assert_eq!(publish(&g, &s, &[], "preview-42", 80, 0), Ok(80));
        assert!(
            publish(&g, &s, &[], "preview-42", 443, 0).is_err(),
            "port 80 only"
        );
        assert_eq!(publish(&g, &s, &[], "mydevice", 22, 0), Ok(22));
        // A bare port in permitlisten grants ports, not names.
        let ports_only = grant("permitlisten=\"8080\"");
        assert!(matches!(
            publish(&ports_only, &s, &[], "myapp", 8080, 0),
            Err(Refusal::NameNotPermitted { .. })
        ));
        assert_eq!(
            publish(&grant("restrict"), &s, &[], &format!("a-{own}"), 80, 0),
            Err(Refusal::NoForwarding)
        );
        assert_eq!(
            publish(&any, &s, &[], &format!("a-{own}"), 80, 2),
            Err(Refusal::TooManyForwards)
        );
        // tunnels.permit_listen grants names to keys without a permitlisten of their own.
        let config = [PermitListen::parse("myapp:*").unwrap()];
        assert_eq!(publish(&any, &s, &config, "myapp", 443, 0), Ok(443));
        assert!(publish(&any, &s, &config, "other", 80, 0).is_err());
        assert!(
            publish(&g, &s, &config, "myapp", 80, 0).is_err(),
            "a key's own permitlisten is the whole list for it"
        );
        assert_eq!(publish(&g, &s, &config, "preview-1", 80, 0), Ok(80));
    }

    #[test]
    fn a_grant_publishes_its_port_and_its_name_and_nothing_else() {
        let s = settings(&[]);
        let mut g = grant("");
        g.access = Some(crate::ssh::auth::Access {
            grant: "g-1".into(),
            port: 20003,
            name: Some("gw-1".into()),
        });
        g.permit_listen = Some(Vec::new());
        g.own_namespace = false;
        let no = Err(Refusal::NotInGrant("g-1".into()));
        assert_eq!(listen(&g, &s, "localhost", 20003, 0), Ok(20003));
        assert_eq!(listen(&g, &s, "gw-1", 20003, 0), Ok(20003));
        // Not 0 (any free port), not another port, whatever the bind address says.
        assert_eq!(listen(&g, &s, "localhost", 0, 0), no);
        assert_eq!(listen(&g, &s, "gw-1", 0, 0), no);
        assert_eq!(listen(&g, &s, "localhost", 20004, 0), no);
        assert_eq!(publish(&g, &s, &[], "gw-1", 22, 0), Ok(22));
        assert_eq!(publish(&g, &s, &[], "gw-1", 80, 0), Ok(80));
        assert_eq!(publish(&g, &s, &[], "gw-2", 22, 0), no);
        let own = tunnel::name::short_id(&g.identity);
        assert_eq!(publish(&g, &s, &[], &format!("x-{own}"), 22, 0), no);
        assert_eq!(
            listen_socket(&g, &s, "/gw-1", 0),
            Err(Refusal::NotInGrant("g-1".into()))
        );
    }
}
