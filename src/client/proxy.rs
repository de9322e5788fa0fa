//! HTTP CONNECT proxies: the proxy URL, NO_PROXY matching, and the proxy's reply.

use std::io;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::dial::{connect_tcp, parse_target};
use super::error::ConnectError;
use super::pin;

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
pub(super) async fn via_proxy(
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
