//! Tunnel names: DNS labels, read from what clients send, and the short id that gives every
//! identity a namespace of its own (`NAME-<id>`, as Preevy derives its client ids).

use std::net::IpAddr;

/// A DNS label sluice accepts as a tunnel name: 1-63 of `[a-z0-9-]`, no hyphen at either end.
pub fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The tunnel name in a `tcpip-forward` bind address or a `direct-tcpip` host: `NAME` or
/// `NAME.<domain>` (any case). `None` for everything that keeps its old meaning: addresses,
/// `localhost` (OpenSSH's default bind address), `*`, the empty string, other host names.
pub fn from_host(host: &str, domain: &str) -> Option<String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || host == "localhost" || host.parse::<IpAddr>().is_ok() {
        return None;
    }
    let label = match host.strip_suffix(domain) {
        Some(rest) => rest.strip_suffix('.')?.to_string(),
        None => host,
    };
    is_label(&label).then_some(label)
}

/// The tunnel an SNI names: exactly `NAME.<domain>` (any case; the bare name is not one).
pub fn from_sni(sni: &str, domain: &str) -> Option<String> {
    let host = sni.trim_end_matches('.').to_ascii_lowercase();
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    is_label(label).then(|| label.to_string())
}

/// The tunnel a `streamlocal-forward` path names: `/NAME` (`ssh -R /NAME:...`), NAME a label.
pub fn from_socket_path(path: &str) -> Option<String> {
    let label = path.strip_prefix('/')?.to_ascii_lowercase();
    is_label(&label).then_some(label)
}

/// Whether `host` is under the tunnel domain (`NAME.<domain>`), so it must not be resolved.
pub fn under_domain(host: &str, domain: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host.strip_suffix(domain)
        .is_some_and(|rest| rest.ends_with('.'))
}

/// Eight lower-case hex digits from the identity (a key fingerprint, a certificate's CA, key
/// id and principal): the suffix of the names an identity may always publish.
pub(crate) fn short_id(identity: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, identity.as_bytes());
    d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `name` is in the identity's own namespace: `<id>` or `<anything>-<id>`.
pub(crate) fn in_own_namespace(name: &str, short: &str) -> bool {
    name == short
        || name
            .strip_suffix(short)
            .is_some_and(|rest| rest.len() > 1 && rest.ends_with('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(is_label("myapp"));
        assert!(is_label("preview-42"));
        assert!(is_label(&"a".repeat(63)));
        assert!(!is_label(&"a".repeat(64)));
        assert!(!is_label(""));
        assert!(!is_label("-a"));
        assert!(!is_label("a-"));
        assert!(
            !is_label("MyApp"),
            "names are lower case (from_host folds case)"
        );
        assert!(!is_label("a.b"));
        assert!(!is_label("a_b"));
    }

    #[test]
    fn names_from_hosts() {
        let d = "t.example.org";
        assert_eq!(from_host("myapp", d).as_deref(), Some("myapp"));
        assert_eq!(from_host("MyApp", d).as_deref(), Some("myapp"));
        assert_eq!(
            from_host("myapp.t.example.org", d).as_deref(),
            Some("myapp")
        );
        assert_eq!(
            from_host("myapp.t.example.org.", d).as_deref(),
            Some("myapp")
        );
        // What keeps its old meaning: OpenSSH's default bind address, addresses, wildcards.
        for h in ["localhost", "", "*", "127.0.0.1", "::1", "0.0.0.0"] {
            assert_eq!(from_host(h, d), None, "{h}");
        }
        // Other host names are not tunnels, nor a deeper name under the domain.
        assert_eq!(from_host("db.internal", d), None);
        assert_eq!(from_host("a.b.t.example.org", d), None);
        assert_eq!(from_host("t.example.org", d), None);
        assert_eq!(from_host("xt.example.org", d), None);
        assert!(under_domain("a.b.t.example.org", d));
        assert!(under_domain("MYAPP.T.EXAMPLE.ORG", d));
        assert!(!under_domain("xt.example.org", d));
        assert!(!under_domain("t.example.org", d));
    }

    #[test]
    fn names_from_sni() {
        let d = "t.example.org";
        assert_eq!(
            from_sni("MyApp.T.Example.Org.", d).as_deref(),
            Some("myapp")
        );
        for sni in [
            "myapp",
            "t.example.org",
            "a.b.t.example.org",
            "xt.example.org",
            "-a.t.example.org",
            "example.org",
        ] {
            assert_eq!(from_sni(sni, d), None, "{sni}");
        }
    }

    #[test]
    fn names_from_socket_paths() {
        assert_eq!(from_socket_path("/MyApp").as_deref(), Some("myapp"));
        for p in ["myapp", "/", "/a/b", "/my_app.sock", "//x"] {
            assert_eq!(from_socket_path(p), None, "{p}");
        }
    }

    #[test]
    fn own_namespace() {
        let id = short_id("SHA256:abc");
        assert_eq!(id.len(), 8);
        assert!(is_label(&id));
        assert_eq!(id, short_id("SHA256:abc"), "stable");
        assert_ne!(id, short_id("SHA256:abd"));
        assert!(in_own_namespace(&id, &id));
        assert!(in_own_namespace(&format!("myapp-{id}"), &id));
        assert!(!in_own_namespace(&format!("myapp{id}"), &id));
        assert!(!in_own_namespace(&format!("-{id}"), &id));
        assert!(!in_own_namespace("myapp", &id));
    }
}
