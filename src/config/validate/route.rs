//! `[routes.*]` and the fallbacks for silent or unknown clients.

use toml::Spanned;

use super::super::error::ConfigError;
use super::super::file;
use super::super::types::*;
use super::Validator;

impl Validator<'_> {
    pub(super) fn fallback(&self, f: &Spanned<String>) -> Result<Fallback, ConfigError> {
        match f.get_ref().as_str() {
            "ssh" => Ok(Fallback::Route(RouteKind::Ssh)),
            "http" => Ok(Fallback::Route(RouteKind::Http)),
            "close" => Ok(Fallback::Close),
            other => self.err(
                f.span(),
                format!("`{other}` is not a route; expected \"ssh\", \"http\" or \"close\""),
            ),
        }
    }

    pub(super) fn route(&self, kind: RouteKind, r: &file::Route) -> Result<Route, ConfigError> {
        let mut route = Route::default_for(kind);
        if let Some(u) = &r.upstream {
            let addr = u.get_ref().trim();
            let valid = match addr.rsplit_once(':') {
                Some((host, port)) => {
                    !host.is_empty()
                        && port.parse::<u16>().is_ok_and(|p| p != 0)
                        && (!host.contains(':') || host.starts_with('['))
                }
                None => false,
            };
            if !valid {
                return self.err(u.span(), format!("`{addr}` is not host:port, e.g. \"127.0.0.1:8080\", \"[::1]:22\" or \"backend.internal:8080\""));
            }
            route.upstream = Some(Upstream {
                addr: addr.to_string(),
                proxy_protocol: r.proxy_protocol.as_ref().map(|p| *p.get_ref()),
                connect_timeout: match &r.connect_timeout {
                    Some(t) => self.duration(t, MIN_TIMEOUT, 10 * MINUTE)?,
                    None => DEFAULT_CONNECT_TIMEOUT,
                },
            });
        } else if let Some(span) = r
            .proxy_protocol
            .as_ref()
            .map(|p| p.span())
            .or(r.connect_timeout.as_ref().map(|t| t.span()))
        {
            return self.err(span, "only applies to an `upstream`, and none is set");
        }
        if let Some(t) = &r.idle_timeout {
            route.idle_timeout = self.duration(t, MIN_TIMEOUT, 30 * DAY)?;
        }
        if let Some(t) = &r.half_closed_timeout {
            route.half_closed_timeout = self.duration(t, MIN_TIMEOUT, 30 * DAY)?;
        }
        if let Some(p) = &r.plaintext {
            route.plaintext = match (p.get_ref().as_str(), kind) {
                ("accept", _) => Plaintext::Accept,
                ("reject", _) => Plaintext::Reject,
                ("redirect", RouteKind::Http) => Plaintext::Redirect,
                ("redirect", RouteKind::Ssh) => return self.err(p.span(), "\"redirect\" is for the http route only; use \"accept\" or \"reject\""),
                (other, _) => return self.err(p.span(), format!("`{other}` is not a plaintext policy; expected \"accept\", \"reject\" or \"redirect\"")),
            };
        }
        if let Some(req) = r.require_client_cert.as_ref().filter(|v| *v.get_ref()) {
            route.require_client_cert = true;
            // Without TLS there is no certificate: plaintext would walk around the requirement.
            match &r.plaintext {
                None => route.plaintext = Plaintext::Reject,
                Some(p) if route.plaintext != Plaintext::Reject => return self.err(
                    p.span(),
                    "a route that requires client certificates takes no plaintext; use \"reject\"",
                ),
                Some(_) => {}
            }
            let _ = req;
        }
        for n in &r.sni {
            route.sni.push(self.server_name(n)?);
        }
        match kind {
            RouteKind::Http => {
                if let Some(a) = &r.alpn {
                    return self.err(a.span(), "the http route's ALPN is http/1.1 (and h2 with `h2 = true`); it is not configurable");
                }
                let h2 = r.h2.as_ref().is_some_and(|h| *h.get_ref());
                if h2 && route.upstream.is_none() {
                    let span = r.h2.as_ref().map(|h| h.span()).unwrap_or(0..0);
                    return self.err(span, "h2 needs an `upstream` that speaks HTTP/2; the built-in status page speaks HTTP/1.1 only");
                }
                route.alpn = default_alpn(kind, h2);
            }
            RouteKind::Ssh => {
                if let Some(h) = &r.h2 {
                    return self.err(h.span(), "h2 is for the http route only");
                }
                if let Some(a) = &r.alpn {
                    route.alpn.clear();
                    for p in a.get_ref() {
                        let v = p.get_ref();
                        if v.is_empty() || v.len() > 255 {
                            return self.err(p.span(), "an ALPN id is 1 to 255 bytes");
                        }
                        if v == "http/1.1" || v == "h2" {
                            return self.err(p.span(), format!("`{v}` is HTTP's ALPN id"));
                        }
                        route.alpn.push(v.clone());
                    }
                }
            }
        }
        Ok(route)
    }
}
