//! Routing: from what the handshake and the classifier saw to a route. Pure, no I/O.

use std::fmt;

use crate::config::{Config, Fallback, Plaintext, RouteKind};
use crate::detect::Protocol;

/// What decided the route, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RoutedBy {
    /// The ALPN protocol the client chose in the TLS handshake.
    Alpn,
    /// The SNI name the client sent.
    Sni,
    /// The first decrypted bytes.
    Peek,
    /// The client sent nothing within `detect.timeout`.
    Timeout,
    /// The first bytes of a connection without TLS.
    Plaintext,
}

impl RoutedBy {
    /// The name used in logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RoutedBy::Alpn => "alpn",
            RoutedBy::Sni => "sni",
            RoutedBy::Peek => "peek",
            RoutedBy::Timeout => "timeout",
            RoutedBy::Plaintext => "plaintext",
        }
    }
}

impl fmt::Display for RoutedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// To this route.
    Route(RouteKind),
    /// Plain HTTP on a route that wants TLS: answer with a 308 to https.
    Redirect,
    /// HTTPS to tunnel NAME (its SNI was `NAME.<tunnels.domain>`), served by sluice.
    Tunnel(String),
    /// Nowhere: close it, with the reason for the log.
    Close(&'static str),
}

/// The tunnel an SNI of `NAME.<tunnels.domain>` names, when `[tunnels]` is set.
pub(crate) fn by_tunnel_sni(cfg: &Config, sni: &str) -> Option<String> {
    let domain = &cfg.tunnels.as_ref()?.domain;
    crate::tunnel::name::from_sni(sni, domain)
}

/// The route whose ALPN list holds the protocol the client chose.
pub(crate) fn by_alpn(cfg: &Config, alpn: &[u8]) -> Option<RouteKind> {
    [&cfg.ssh, &cfg.http]
        .into_iter()
        .find(|r| r.alpn.iter().any(|p| p.as_bytes() == alpn))
        .map(|r| r.kind)
}

/// The route bound to the SNI name the client sent.
pub(crate) fn by_sni(cfg: &Config, sni: &str) -> Option<RouteKind> {
    let sni = sni.trim_end_matches('.').to_ascii_lowercase();
    let routes = [&cfg.ssh, &cfg.http];
    // An exact name beats a wildcard, whichever route holds them (as certificate choice does).
    let exact = routes.iter().find(|r| r.sni.contains(&sni));
    let wildcard = || {
        let parent = sni.split_once('.')?.1;
        routes
            .iter()
            .find(|r| r.sni.iter().any(|p| p.strip_prefix("*.") == Some(parent)))
    };
    exact.or_else(wildcard).map(|r| r.kind)
}

/// After TLS: the route for a recognised protocol in the decrypted bytes.
pub(crate) fn by_inner_protocol(cfg: &Config, p: Protocol) -> Decision {
    match p {
        Protocol::Ssh => Decision::Route(RouteKind::Ssh),
        Protocol::Http1 => Decision::Route(RouteKind::Http),
        Protocol::Http2 if cfg.http.alpn.iter().any(|a| a == "h2") => {
            Decision::Route(RouteKind::Http)
        }
        Protocol::Http2 | Protocol::Tls => fallback(cfg.detect.on_unknown, "unknown protocol"),
    }
}

/// After TLS: the decrypted bytes matched nothing.
pub(crate) fn inner_unknown(cfg: &Config) -> Decision {
    fallback(cfg.detect.on_unknown, "unknown protocol")
}

/// After TLS: the client sent nothing within `detect.timeout`.
pub(crate) fn inner_timeout(cfg: &Config) -> Decision {
    fallback(cfg.detect.on_timeout, "silent client")
}

/// Before TLS: a plaintext protocol, subject to the route's plaintext policy.
pub(crate) fn plaintext(cfg: &Config, p: Protocol) -> Decision {
    let kind = match p {
        Protocol::Ssh => RouteKind::Ssh,
        Protocol::Http1 => RouteKind::Http,
        Protocol::Http2 | Protocol::Tls => return Decision::Close("unknown protocol"),
    };
    match cfg.route(kind).plaintext {
        Plaintext::Accept => Decision::Route(kind),
        Plaintext::Redirect => Decision::Redirect,
        Plaintext::Reject => Decision::Close("plaintext refused by route"),
    }
}

/// Before TLS: a silent client goes to `on_timeout` only if that route takes plaintext.
pub(crate) fn plaintext_timeout(cfg: &Config) -> Decision {
    match cfg.detect.on_timeout {
        Fallback::Route(kind) if cfg.route(kind).plaintext == Plaintext::Accept => {
            Decision::Route(kind)
        }
        Fallback::Route(_) => Decision::Close("silent client; on_timeout route refuses plaintext"),
        Fallback::Close => Decision::Close("silent client"),
    }
}

fn fallback(f: Fallback, why: &'static str) -> Decision {
    match f {
        Fallback::Route(kind) => Decision::Route(kind),
        Fallback::Close => Decision::Close(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(text: &str) -> Config {
        Config::parse(text, None, Path::new("/")).unwrap()
    }

    #[test]
    fn alpn_and_sni() {
        let c = cfg("[routes.ssh]\nsni = [\"ssh.example.com\", \"*.tunnels.example.com\"]\nalpn = [\"ssh\", \"x-ssh\"]\n");
        assert_eq!(by_alpn(&c, b"ssh"), Some(RouteKind::Ssh));
        assert_eq!(by_alpn(&c, b"x-ssh"), Some(RouteKind::Ssh));
        assert_eq!(by_alpn(&c, b"http/1.1"), Some(RouteKind::Http));
        assert_eq!(by_alpn(&c, b"h2"), None);
        assert_eq!(by_sni(&c, "SSH.example.com."), Some(RouteKind::Ssh));
        assert_eq!(by_sni(&c, "a.tunnels.example.com"), Some(RouteKind::Ssh));
        assert_eq!(by_sni(&c, "tunnels.example.com"), None);
        assert_eq!(by_sni(&c, "www.example.com"), None);
        // Exact beats wildcard across routes.
        let c = cfg(
            "[routes.ssh]\nsni = [\"*.example.com\"]\n[routes.http]\nsni = [\"www.example.com\"]\n",
        );
        assert_eq!(by_sni(&c, "www.example.com"), Some(RouteKind::Http));
        assert_eq!(by_sni(&c, "git.example.com"), Some(RouteKind::Ssh));
    }

    #[test]
    fn inner_fallbacks() {
        let c = cfg("");
        assert_eq!(
            by_inner_protocol(&c, Protocol::Ssh),
            Decision::Route(RouteKind::Ssh)
        );
        assert_eq!(
            by_inner_protocol(&c, Protocol::Http1),
            Decision::Route(RouteKind::Http)
        );
        // No h2 upstream: the preface is not HTTP we can serve.
        assert_eq!(
            by_inner_protocol(&c, Protocol::Http2),
            Decision::Close("unknown protocol")
        );
        assert_eq!(inner_timeout(&c), Decision::Route(RouteKind::Ssh));
        assert_eq!(inner_unknown(&c), Decision::Close("unknown protocol"));
        let c = cfg("[detect]\non_timeout = \"close\"\non_unknown = \"http\"\n[routes.http]\nupstream = \"h:1\"\nh2 = true\n");
        assert_eq!(
            by_inner_protocol(&c, Protocol::Http2),
            Decision::Route(RouteKind::Http)
        );
        assert_eq!(inner_timeout(&c), Decision::Close("silent client"));
        assert_eq!(inner_unknown(&c), Decision::Route(RouteKind::Http));
    }

    #[test]
    fn plaintext_policies() {
        let c =
            cfg("[routes.http]\nplaintext = \"redirect\"\n[routes.ssh]\nplaintext = \"reject\"\n");
        assert_eq!(plaintext(&c, Protocol::Http1), Decision::Redirect);
        assert_eq!(
            plaintext(&c, Protocol::Ssh),
            Decision::Close("plaintext refused by route")
        );
        assert!(matches!(plaintext_timeout(&c), Decision::Close(_)));
        let c = cfg("");
        assert_eq!(
            plaintext(&c, Protocol::Http1),
            Decision::Route(RouteKind::Http)
        );
        assert_eq!(
            plaintext(&c, Protocol::Ssh),
            Decision::Route(RouteKind::Ssh)
        );
        assert_eq!(plaintext_timeout(&c), Decision::Route(RouteKind::Ssh));
    }
}
