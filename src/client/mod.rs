//! `sluice connect`: the ProxyCommand TLS helper. Connects, verifies the server (system trust
//! store, `--ca`, or `--pin`), sends SNI and ALPN `ssh`, then relays stdin/stdout. Nothing but
//! data goes to stdout; errors are one or two lines on stderr with a sysexits code.
//!
//! `dial` parses targets and connects TCP, `proxy` goes through HTTP CONNECT proxies (and
//! NO_PROXY), `verify` checks the server's certificate, `pin` formats and parses pins, `error`
//! says what failed; this file puts them together and relays.

mod dial;
mod error;
mod pin;
mod proxy;
pub mod tunnel;
mod verify;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use dial::connect_tcp;
pub use dial::parse_target;
pub use error::ConnectError;
pub use pin::{format_hex, format_pin, parse_pin};
use proxy::via_proxy;
pub use proxy::{no_proxy_matches, parse_connect_reply, read_connect_reply, ConnectReply, Proxy};
pub use verify::Trust;
use verify::{read_pem_certs, tls_error, verifier};

/// What `sluice connect` does.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Host to connect to (name or address).
    pub host: String,
    /// Port.
    pub port: u16,
    /// SNI to send; `None` sends none.
    pub sni: Option<String>,
    /// ALPN ids to offer.
    pub alpn: Vec<Vec<u8>>,
    /// Server verification.
    pub trust: Trust,
    /// Deadline for resolving and connecting (all addresses together) and the handshake.
    pub connect_timeout: Duration,
    /// An HTTP CONNECT proxy to go through.
    pub proxy: Option<Proxy>,
    /// A client certificate chain and key (PEM files) for servers that require one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Connects and verifies; returns the TLS stream.
pub async fn connect(
    opts: &ConnectOptions,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let provider = crate::tls::provider();
    let verifier = Arc::new(verifier(&opts.trust, &provider)?);
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConnectError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let mut config = match &opts.client_cert {
        None => config.with_no_client_auth(),
        Some((cert, key)) => {
            let chain =
                read_pem_certs(cert).map_err(|e| ConnectError::Config(format!("--cert {e}")))?;
            let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
                ConnectError::Config(format!(
                    "--key {}: no usable private key: {e:?}",
                    key.display()
                ))
            })?;
            config
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ConnectError::Config(format!("--cert/--key: {e}")))?
        }
    };
    config.alpn_protocols = opts.alpn.clone();
    config.enable_sni = opts.sni.is_some();
    let name_str = opts.sni.clone().unwrap_or_else(|| opts.host.clone());
    let name = ServerName::try_from(name_str.trim_matches(|c| c == '[' || c == ']').to_string())
        .map_err(|_| ConnectError::Usage(format!("`{name_str}` is not a valid server name")))?;

    let deadline = Instant::now() + opts.connect_timeout;
    let target = format!("{}:{}", opts.host, opts.port);
    let tcp = match &opts.proxy {
        Some(p) => via_proxy(p, &opts.host, opts.port, deadline).await?,
        None => connect_tcp(&opts.host, opts.port, deadline).await?,
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match timeout_at(deadline, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(tls_error(&target, &opts.trust, &verifier, &e)),
        Err(_) => Err(ConnectError::Unavailable(format!(
            "{target}: TLS handshake timed out"
        ))),
    }
}

/// Connects, then relays stdin to the server and the server to stdout. stdin EOF sends
/// close_notify and FIN while replies keep flowing; server EOF ends it once stdout is flushed.
pub async fn run(opts: &ConnectOptions) -> Result<(), ConnectError> {
    let tls = connect(opts).await?;
    let target = format!("{}:{}", opts.host, opts.port);
    let (mut from_server, mut to_server) = tokio::io::split(tls);
    let up = async move {
        let mut stdin = stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stdin.read(&mut buf).await?;
            if n == 0 {
                return to_server.shutdown().await;
            }
            to_server.write_all(&buf[..n]).await?;
            to_server.flush().await?;
        }
    };
    let down = async move {
        let mut stdout = stdout();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(n) => n,
                // A server that closes without close_notify has still said everything.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                stdout.flush().await?;
                return Ok(total);
            }
            total += n as u64;
            stdout.write_all(&buf[..n]).await?;
            stdout.flush().await?;
        }
    };
    let finish = |r: io::Result<u64>| {
        match r {
        // Nothing at all, not even an SSH banner: the server turned us away after TLS.
        Ok(0) => Err(ConnectError::Unavailable(format!(
            "{target}: the server closed the connection without sending anything\n  does its route require a client certificate (--cert/--key)?"
        ))),
        Ok(_) => Ok(()),
        // Whoever read our stdout (ssh) is gone: nothing left to deliver to.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(ConnectError::Io(format!("{target}: {e}"))),
    }
    };
    tokio::pin!(down);
    tokio::select! {
        r = &mut down => finish(r),
        r = up => match r {
            // stdin is done and our side is closed (or the server stopped reading): keep
            // delivering what the server still sends.
            Ok(()) => finish(down.await),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe || e.kind() == io::ErrorKind::ConnectionReset => finish(down.await),
            Err(e) => Err(ConnectError::Io(format!("{target}: {e}"))),
        },
    }
}

/// stdin, read straight from the pipe when it is one (OpenSSH gives a ProxyCommand pipes):
/// tokio's `stdin()` hands every read to a blocking thread, which cost more CPU than the TLS.
fn stdin() -> Box<dyn tokio::io::AsyncRead + Unpin + Send> {
    use std::os::fd::AsFd;
    let pipe = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .and_then(tokio::net::unix::pipe::Receiver::from_owned_fd);
    match pipe {
        Ok(p) => Box::new(p),
        Err(_) => Box::new(tokio::io::stdin()),
    }
}

/// stdout, written straight to the pipe when it is one (see `stdin`).
fn stdout() -> Box<dyn tokio::io::AsyncWrite + Unpin + Send> {
    use std::os::fd::AsFd;
    let pipe = io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .and_then(tokio::net::unix::pipe::Sender::from_owned_fd);
    match pipe {
        Ok(p) => Box::new(p),
        Err(_) => Box::new(tokio::io::stdout()),
    }
}

/// Quotes `s` for the shell OpenSSH runs a ProxyCommand with, and escapes `%` for ssh itself.
fn shell_word(s: &str) -> String {
    let s = s.replace('%', "%%");
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@,".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A `~/.ssh/config` block that reaches `host:port` through `sluice connect`.
pub fn ssh_config_block(
    alias: &str,
    host: &str,
    port: u16,
    program: &str,
    trust_args: &[String],
) -> String {
    let mut cmd = vec![shell_word(program), "connect".to_string()];
    cmd.extend(trust_args.iter().map(|a| shell_word(a)));
    // Brackets keep an IPv6 HostName apart from the port; names are fine in them too.
    cmd.push("[%h]:%p".to_string());
    let host_name = host;
    format!(
        "Host {alias}\n  HostName {host_name}\n  Port {port}\n  ProxyCommand {}\n  ServerAliveInterval 30\n  ServerAliveCountMax 3\n",
        cmd.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_config_quoting() {
        let b = ssh_config_block(
            "work",
            "sluice.example.org",
            443,
            "/usr/local/bin/sluice",
            &["--pin".into(), "sha256:ab+/c=".into()],
        );
        assert_eq!(
            b,
            "Host work\n  HostName sluice.example.org\n  Port 443\n  ProxyCommand /usr/local/bin/sluice connect --pin sha256:ab+/c= [%h]:%p\n  ServerAliveInterval 30\n  ServerAliveCountMax 3\n"
        );
        let b = ssh_config_block(
            "x",
            "h",
            8443,
            "/opt/my tools/100%/sluice",
            &["--ca".into(), "/etc/it's.pem".into()],
        );
        assert!(
            b.contains(
                "ProxyCommand '/opt/my tools/100%%/sluice' connect --ca '/etc/it'\\''s.pem' [%h]:%p"
            ),
            "{b}"
        );
    }

    #[test]
    fn proxies() {
        assert_eq!(
            Proxy::parse("http://proxy.corp:3128").unwrap(),
            Proxy {
                host: "proxy.corp".into(),
                port: 3128,
                credentials: None
            }
        );
        assert_eq!(
            Proxy::parse("http://me%40corp:p%3Ass@10.0.0.1:8080/").unwrap(),
            Proxy {
                host: "10.0.0.1".into(),
                port: 8080,
                credentials: Some("me@corp:p:ss".into())
            }
        );
        assert_eq!(Proxy::parse("proxy:3128").unwrap().port, 3128);
        assert_eq!(Proxy::parse("http://proxy").unwrap().port, 80);
        assert!(Proxy::parse("https://proxy:443")
            .unwrap_err()
            .contains("only http://"));
        assert!(Proxy::parse("socks5://p:1080").is_err());
        for (list, host, hit) in [
            ("*", "a.example", true),
            ("example.org", "ssh.example.org", true),
            (".example.org", "example.org", true),
            ("example.org.", "example.org", true),
            ("example.org", "badexample.org", false),
            ("localhost,127.0.0.0/8", "127.0.0.1", true),
            ("10.0.0.0/8 internal", "10.1.2.3", true),
            ("2.3", "10.1.2.3", false),
            ("internal:443", "host.internal", true),
            ("internal:8443", "host.internal", false),
            ("[::1]", "::1", true),
            ("[::1]:443", "::1", true),
            ("", "a", false),
        ] {
            assert_eq!(no_proxy_matches(list, host, 443), hit, "{list} / {host}");
        }
        assert_eq!(Proxy::parse("http://[::1]").unwrap().port, 80);
        assert_eq!(Proxy::parse("http://::1").unwrap().port, 80);
        // Found by fuzzing: a host without a port was not checked at all.
        for bad in [
            "http://proxy\0",
            "http://pro xy",
            "http://[::1]x",
            "http://a\r\nb",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Proxy::parse("http://[::1]:3128").unwrap(),
            Proxy {
                host: "::1".into(),
                port: 3128,
                credentials: None
            }
        );
    }

    #[test]
    fn connect_replies() {
        for ok in [
            &b"HTTP/1.1 200 Connection established\r\n\r\n"[..],
            b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ] {
            assert_eq!(parse_connect_reply(ok), ConnectReply::Established);
        }
        assert_eq!(
            parse_connect_reply(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n"),
            ConnectReply::AuthRequired
        );
        assert_eq!(
            parse_connect_reply(b"HTTP/1.1 403 Access violation\r\nServer: x\r\n\r\n"),
            ConnectReply::Refused("HTTP/1.1 403 Access violation".into())
        );
        assert_eq!(
            parse_connect_reply(b"\xffjunk\r\n\r\n"),
            ConnectReply::Refused("\u{fffd}junk".into())
        );
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("example.org").unwrap(),
            ("example.org".into(), 443)
        );
        assert_eq!(
            parse_target("example.org:8443").unwrap(),
            ("example.org".into(), 8443)
        );
        assert_eq!(parse_target("[::1]:22").unwrap(), ("::1".into(), 22));
        assert_eq!(parse_target("[::1]").unwrap(), ("::1".into(), 443));
        assert_eq!(parse_target("::1").unwrap(), ("::1".into(), 443));
        for bad in ["", ":443", "h:0", "h:x", "[::1", "[::1]x"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
