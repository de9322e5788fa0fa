//! `-L`, `-R` and `-D` specifications, in OpenSSH's syntax.

use std::fmt;

/// A host (a name, an address, a tunnel name, or empty for "all") and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Without brackets.
    pub host: String,
    /// Port (0: any, where a listener may choose).
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One forward.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Forward {
    /// `-L`: listen here, open `direct-tcpip` channels to `target` on the server's side.
    Local {
        /// Where to listen (default 127.0.0.1).
        listen: Endpoint,
        /// Where the server connects.
        target: Endpoint,
    },
    /// `-R`: the server listens (or publishes a tunnel name) and sends connections here.
    Remote {
        /// What to ask the server for: an address and port, or a tunnel name and its port.
        listen: Endpoint,
        /// Where this side connects.
        target: Endpoint,
    },
    /// `-D`: a SOCKS5 proxy here; every CONNECT goes out through the server.
    Dynamic {
        /// Where to listen (default 127.0.0.1).
        listen: Endpoint,
    },
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Forward::Local { listen, target } => write!(f, "-L {listen}:{target}"),
            Forward::Remote { listen, target } => write!(f, "-R {listen}:{target}"),
            Forward::Dynamic { listen } => write!(f, "-D {listen}"),
        }
    }
}

/// What an `-R` with no address asks for: OpenSSH sends `localhost` (the server's loopback).
pub(super) const REMOTE_DEFAULT_ADDRESS: &str = "localhost";
/// Where `-L` and `-D` listen without an address: loopback, as OpenSSH does.
pub(super) const LOCAL_DEFAULT_ADDRESS: &str = "127.0.0.1";

/// Splits on `:` outside brackets; a bracketed part loses its brackets.
fn fields(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    let mut bracketed = false;
    while let Some(c) = chars.next() {
        match c {
            '[' if cur.is_empty() && !bracketed => bracketed = true,
            ']' if bracketed => {
                bracketed = false;
                match chars.next() {
                    None => {}
                    Some(':') => {
                        out.push(std::mem::take(&mut cur));
                        continue;
                    }
                    Some(_) => return Err("`]` must be followed by `:`".into()),
                }
                out.push(std::mem::take(&mut cur));
                return Ok(out);
            }
            ':' if !bracketed => out.push(std::mem::take(&mut cur)),
            c if c.is_control() || c.is_whitespace() => {
                return Err("no spaces or control characters".into())
            }
            c => cur.push(c),
        }
    }
    if bracketed {
        return Err("an unclosed `[`".into());
    }
    out.push(cur);
    Ok(out)
}

fn port(s: &str, what: &str, zero_ok: bool) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) if !zero_ok => Err(format!("{what} `0`: a port from 1 to 65535")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{what} `{s}` is not a port (0-65535)")),
    }
}

fn host(s: &str, what: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err(format!("{what} is empty"));
    }
    Ok(s.to_string())
}

/// A listen address as given: empty and `*` mean every address.
fn bind(s: Option<&str>, default: &str) -> String {
    match s {
        None => default.to_string(),
        Some("") | Some("*") => String::new(),
        Some(h) => h.to_string(),
    }
}

/// `[bind_address:]port:host:hostport`.
fn two_sided(s: &str, default_bind: &str, zero_ok: bool) -> Result<(Endpoint, Endpoint), String> {
    let f = fields(s)?;
    let (b, p, h, hp) = match f.as_slice() {
        [p, h, hp] => (None, p, h, hp),
        [b, p, h, hp] => (Some(b.as_str()), p, h, hp),
        _ => return Err("expected [ADDRESS:]PORT:HOST:HOSTPORT".into()),
    };
    Ok((
        Endpoint {
            host: bind(b, default_bind),
            port: port(p, "port", zero_ok)?,
        },
        Endpoint {
            host: host(h, "host")?,
            port: port(hp, "host port", false)?,
        },
    ))
}

impl Forward {
    /// `-L [bind_address:]port:host:hostport`.
    pub fn local(s: &str) -> Result<Forward, String> {
        let (listen, target) =
            two_sided(s, LOCAL_DEFAULT_ADDRESS, true).map_err(|e| format!("-L {s}: {e}"))?;
        Ok(Forward::Local { listen, target })
    }

    /// `-R [bind_address|NAME:]port:host:hostport`; port 0 lets the server choose.
    pub fn remote(s: &str) -> Result<Forward, String> {
        let (listen, target) =
            two_sided(s, REMOTE_DEFAULT_ADDRESS, true).map_err(|e| format!("-R {s}: {e}"))?;
        Ok(Forward::Remote { listen, target })
    }

    /// `-D [bind_address:]port`.
    pub fn dynamic(s: &str) -> Result<Forward, String> {
        let f = fields(s).map_err(|e| format!("-D {s}: {e}"))?;
        let (b, p) = match f.as_slice() {
            [p] => (None, p),
            [b, p] => (Some(b.as_str()), p),
            _ => return Err(format!("-D {s}: expected [ADDRESS:]PORT")),
        };
        Ok(Forward::Dynamic {
            listen: Endpoint {
                host: bind(b, LOCAL_DEFAULT_ADDRESS),
                port: port(p, "port", true).map_err(|e| format!("-D {s}: {e}"))?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn openssh_syntax() {
        assert_eq!(
            Forward::local("8701:127.0.0.1:8701").unwrap(),
            Forward::Local {
                listen: ep("127.0.0.1", 8701),
                target: ep("127.0.0.1", 8701)
            }
        );
        assert_eq!(
            Forward::local("*:80:[2001:db8::1]:8080").unwrap(),
            Forward::Local {
                listen: ep("", 80),
                target: ep("2001:db8::1", 8080)
            }
        );
        assert_eq!(
            Forward::local("[::1]:0:db.internal:5432").unwrap(),
            Forward::Local {
                listen: ep("::1", 0),
                target: ep("db.internal", 5432)
            }
        );
        assert_eq!(
            Forward::remote("myapp:80:localhost:3000").unwrap(),
            Forward::Remote {
                listen: ep("myapp", 80),
                target: ep("localhost", 3000)
            }
        );
        assert_eq!(
            Forward::remote("0:localhost:22").unwrap(),
            Forward::Remote {
                listen: ep("localhost", 0),
                target: ep("localhost", 22)
            }
        );
        assert_eq!(
            Forward::dynamic("1080").unwrap(),
            Forward::Dynamic {
                listen: ep("127.0.0.1", 1080)
            }
        );
        assert_eq!(
            Forward::dynamic("[::]:1080").unwrap(),
            Forward::Dynamic {
                listen: ep("::", 1080)
            }
        );
        let shown = Forward::local("[::1]:0:db:5432").unwrap().to_string();
        assert_eq!(shown, "-L [::1]:0:db:5432");
    }

    #[test]
    fn mistakes_are_named() {
        for (bad, says) in [
            ("8701", "expected"),
            ("a:b:c:d:e", "expected"),
            ("x:host:80", "not a port"),
            ("80:host:0", "host port `0`"),
            ("80::80", "host is empty"),
            ("80:host:70000", "not a port"),
            ("[::1:80:h:1", "unclosed"),
            ("[::1]x:80:h:1", "followed by"),
            ("80:ho st:1", "spaces"),
        ] {
            let e = Forward::local(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.starts_with(&format!("-L {bad}:")), "{e}");
        }
        assert!(Forward::dynamic("a:b:c").unwrap_err().contains("expected"));
        assert!(Forward::dynamic("http").unwrap_err().contains("not a port"));
    }
}
