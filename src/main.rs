//! The `sluice` command line: parse arguments, set up logging, run a subcommand, map errors
//! to sysexits codes (78 for a bad config).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluice::config::{Config, ConfigError};
use sluice::server::{ServeError, Server};
use sluice::tls::TlsError;
use tracing::{error, info};

/// sysexits codes.
const EX_SOFTWARE: u8 = 70;
const EX_OSERR: u8 = 71;
const EX_CANTCREAT: u8 = 73;
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(name = "sluice", version, about = "One TLS port for HTTPS and SSH")]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SLUICE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: terminate TLS, tell SSH from HTTP, relay to the routes' targets.
    Serve {
        /// Config file (TOML). Without one: 127.0.0.1:8443 and a self-signed certificate.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// Where generated state lives (self-signed certificate, host keys).
        #[arg(long, env = "SLUICE_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Print the embedded SSH server's host key fingerprint (making the key if there is none).
    Hostkey {
        /// Config file (TOML); without one, the default key in the state directory.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// Where generated state lives.
        #[arg(long, env = "SLUICE_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Connect to a sluice (or any TLS) server and relay stdin/stdout: an OpenSSH ProxyCommand.
    /// The server is verified by default (system trust store, --ca or --pin).
    Connect {
        /// HOST[:PORT]; the port defaults to 443. `[::1]:8443` for IPv6 addresses.
        target: String,
        /// Server name to send (SNI) and to verify; default: HOST.
        #[arg(long, conflicts_with = "no_sni")]
        sni: Option<String>,
        /// Send no SNI.
        #[arg(long)]
        no_sni: bool,
        /// ALPN ids to offer, comma-separated.
        #[arg(long, default_value = "ssh", value_delimiter = ',')]
        alpn: Vec<String>,
        /// Trust only these PEM certificates (CA certificates, or the server's own).
        #[arg(long, conflicts_with_all = ["pin", "insecure"])]
        ca: Option<PathBuf>,
        /// Trust the server whose certificate has this SHA-256: sha256:BASE64, sha256//BASE64,
        /// or AB:CD:.. hex as `openssl x509 -fingerprint -sha256` and `sluice serve` print it.
        #[arg(long, conflicts_with = "insecure")]
        pin: Option<String>,
        /// Do not verify the server at all (dangerous; says so on stderr).
        #[arg(long)]
        insecure: bool,
        /// Deadline for connecting and the TLS handshake.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        connect_timeout: std::time::Duration,
        /// Go through this HTTP proxy with CONNECT: http://[user:pass@]host:port. Default:
        /// HTTPS_PROXY (or ALL_PROXY) unless NO_PROXY covers HOST.
        #[arg(long, conflicts_with = "no_proxy")]
        proxy: Option<String>,
        /// Ignore HTTPS_PROXY and ALL_PROXY.
        #[arg(long)]
        no_proxy: bool,
        /// Client certificate chain (PEM) for servers that require one; needs --key.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Private key (PEM) for --cert.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
    /// Print a ready ~/.ssh/config block that reaches HOST through `sluice connect`.
    SshConfig {
        /// The name to use with ssh (`ssh ALIAS`).
        alias: String,
        /// HOST[:PORT] of the sluice server; the port defaults to 443.
        target: String,
        /// Pin the server's certificate (any spelling `sluice connect --pin` takes).
        #[arg(long, conflicts_with = "ca")]
        pin: Option<String>,
        /// Trust only this PEM file.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Validate a config file (certificates included) and print the routing table.
    Check {
        /// Config file (TOML).
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: PathBuf,
    },
    /// Ask a running sluice's admin endpoint whether it is ready (exit 0) or not (exit 1): an
    /// exec probe for images without curl.
    Healthcheck {
        /// The admin address; default: [admin] listen from --config, else 127.0.0.1:9090.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Take the admin address from this config file (--admin wins if both are given).
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// Check liveness (/livez) instead of readiness (/readyz).
        #[arg(long)]
        live: bool,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The helper keeps stderr for its own one-line errors and stdout for data: no logging.
    if let Command::Connect {
        target,
        sni,
        no_sni,
        alpn,
        ca,
        pin,
        insecure,
        connect_timeout,
        proxy,
        no_proxy,
        cert,
        key,
    } = cli.command
    {
        let client_cert = cert.zip(key);
        return connect(
            target,
            sni,
            no_sni,
            alpn,
            ca,
            pin,
            insecure,
            connect_timeout,
            proxy,
            no_proxy,
            client_cert,
        );
    }
    if let Command::Healthcheck {
        admin,
        config,
        live,
        timeout,
    } = cli.command
    {
        return healthcheck(admin, config, live, timeout);
    }
    init_logging(cli.log_format);
    if let Command::SshConfig {
        alias,
        target,
        pin,
        ca,
    } = cli.command
    {
        return ssh_config(&alias, &target, pin, ca);
    }
    match cli.command {
        Command::Connect { .. } | Command::SshConfig { .. } | Command::Healthcheck { .. } => {
            unreachable!("handled above")
        }
        Command::Check { config } => check(&config),
        Command::Serve { config, state_dir } => serve(config, state_dir),
        Command::Hostkey { config, state_dir } => hostkey(config, state_dir),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn load(path: Option<&PathBuf>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::embedded_default()),
    }
}

fn check(path: &PathBuf) -> ExitCode {
    let cfg = match load(Some(path)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let state_dir = sluice::state::resolve(cfg.state_dir.as_deref());
    // Certificates are part of the config: a check that does not load them proves little.
    if let sluice::config::CertSource::Files { .. } = cfg.tls.cert {
        if let Err(e) = sluice::tls::load_certs(&cfg, &state_dir) {
            eprintln!("sluice: config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    }
    print!("{}", cfg.describe());
    println!("config OK: {}", path.display());
    ExitCode::SUCCESS
}

fn healthcheck(
    admin: Option<std::net::SocketAddr>,
    config: Option<PathBuf>,
    live: bool,
    timeout: std::time::Duration,
) -> ExitCode {
    let addr = match (admin, config) {
        (Some(a), _) => a,
        (None, Some(path)) => match Config::load(&path) {
            Ok(cfg) => match cfg.admin {
                Some(a) if a.port() == 0 => {
                    eprintln!(
                        "sluice healthcheck: {}: [admin] listen names port 0, so the port is only known to the running daemon (it logs it): use --admin ADDR",
                        path.display()
                    );
                    return ExitCode::from(EX_CONFIG);
                }
                Some(a) => a,
                None => {
                    eprintln!(
                        "sluice healthcheck: {} has no [admin] table: nothing to ask",
                        path.display()
                    );
                    return ExitCode::from(EX_CONFIG);
                }
            },
            Err(e) => {
                eprintln!("sluice healthcheck: config error: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        },
        (None, None) => sluice::config::DEFAULT_ADMIN_LISTEN
            .parse()
            .expect("constant address parses"),
    };
    let path = if live { "/livez" } else { "/readyz" };
    match sluice::admin::check(sluice::admin::probe_addr(addr), path, timeout) {
        Ok(()) => {
            println!("{} ok", if live { "live" } else { "ready" });
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ssh_config(alias: &str, target: &str, pin: Option<String>, ca: Option<PathBuf>) -> ExitCode {
    let (host, port) = match sluice::client::parse_target(target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sluice ssh-config: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    // ssh treats these as patterns: `Host *` would catch every destination.
    if alias.is_empty()
        || alias
            .chars()
            .any(|c| c.is_whitespace() || "#*?!,\"".contains(c))
    {
        eprintln!("sluice ssh-config: `{alias}` cannot be a Host alias");
        return ExitCode::from(64);
    }
    let mut trust = Vec::new();
    if let Some(p) = pin {
        match sluice::client::parse_pin(&p) {
            Ok(d) => trust.extend(["--pin".to_string(), sluice::client::format_pin(&d)]),
            Err(m) => {
                eprintln!("sluice ssh-config: --pin {m}");
                return ExitCode::from(64);
            }
        }
    }
    if let Some(ca) = ca {
        let abs = match std::fs::canonicalize(&ca) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("sluice ssh-config: --ca {}: {e}", ca.display());
                return ExitCode::from(78);
            }
        };
        trust.extend(["--ca".to_string(), abs.display().to_string()]);
    }
    let program = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "sluice".into());
    print!(
        "{}",
        sluice::client::ssh_config_block(alias, &host, port, &program, &trust)
    );
    ExitCode::SUCCESS
}

#[allow(clippy::too_many_arguments)]
fn connect(
    target: String,
    sni: Option<String>,
    no_sni: bool,
    alpn: Vec<String>,
    ca: Option<PathBuf>,
    pin: Option<String>,
    insecure: bool,
    connect_timeout: std::time::Duration,
    proxy: Option<String>,
    no_proxy: bool,
    client_cert: Option<(PathBuf, PathBuf)>,
) -> ExitCode {
    use sluice::client::{ConnectError, ConnectOptions, Proxy, Trust};
    let fail = |e: ConnectError| {
        eprintln!("sluice connect: {e}");
        ExitCode::from(e.exit_code())
    };
    let (host, port) = match sluice::client::parse_target(&target) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let trust = match (ca, pin, insecure) {
        (Some(ca), _, _) => Trust::CaFile(ca),
        (None, Some(p), _) => match sluice::client::parse_pin(&p) {
            Ok(d) => Trust::Pin(d),
            Err(m) => return fail(ConnectError::Usage(format!("--pin {m}"))),
        },
        (None, None, true) => {
            eprintln!("sluice connect: WARNING: --insecure: the server is not verified; anyone on the path can read and change this connection");
            Trust::Insecure
        }
        (None, None, false) => Trust::System,
    };
    let proxy = match (proxy, no_proxy) {
        (Some(url), _) => Some(Proxy::parse(&url)),
        (None, true) => None,
        (None, false) => Proxy::from_env(&host, port),
    };
    let proxy = match proxy.transpose() {
        Ok(p) => p,
        Err(m) => return fail(ConnectError::Usage(format!("proxy: {m}"))),
    };
    let opts = ConnectOptions {
        client_cert,
        proxy,
        sni: if no_sni {
            None
        } else {
            Some(sni.unwrap_or_else(|| host.clone()))
        },
        host,
        port,
        alpn: alpn
            .into_iter()
            .filter(|a| !a.is_empty())
            .map(String::into_bytes)
            .collect(),
        trust,
        connect_timeout,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(ConnectError::Io(format!("cannot start: {e}"))),
    };
    let result = rt.block_on(sluice::client::run(&opts));
    // stdin is read on a blocking thread that cannot be cancelled: do not wait for it, or a
    // server that closes first would leave ssh and this helper waiting on each other.
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn hostkey(config: Option<PathBuf>, state_dir: Option<PathBuf>) -> ExitCode {
    let cfg = match load(config.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let state_dir = sluice::state::resolve(state_dir.as_deref().or(cfg.state_dir.as_deref()));
    let path = sluice::ssh::host_key_path(&cfg.embedded_ssh, &state_dir);
    match sluice::ssh::load_or_create_host_key(&path) {
        Ok(key) => {
            let fp = key.public_key().fingerprint(russh::keys::HashAlg::Sha256);
            let public = key.public_key().to_openssh().unwrap_or_default();
            println!("{fp} {}", path.display());
            println!("{public}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::from(EX_CONFIG)
        }
    }
}

fn serve(config: Option<PathBuf>, state_dir: Option<PathBuf>) -> ExitCode {
    let cfg = match load(config.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            error!("config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let state_dir = sluice::state::resolve(state_dir.as_deref().or(cfg.state_dir.as_deref()));
    // Connections run on their own per-core threads (see listen); this runtime only carries
    // signals, reloads, the admin endpoint and watchers.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    rt.block_on(async move {
        // Handlers first: a signal that arrives while certificates load must not kill sluice.
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (|| -> std::io::Result<_> {
            Ok((
                signal(SignalKind::hangup())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })();
        let (hup, term, int) = match signals {
            Ok(s) => s,
            Err(e) => {
                error!("cannot install signal handlers: {e}");
                return ExitCode::from(EX_OSERR);
            }
        };
        let server = match Server::bind(cfg.clone(), state_dir).await {
            Ok(s) => s,
            Err(ServeError::Tls(TlsError::Config(e))) => {
                error!("config error: {e}");
                return ExitCode::from(EX_CONFIG);
            }
            Err(e @ ServeError::Tls(TlsError::SelfSigned { .. })) => {
                error!("{e}");
                return ExitCode::from(EX_CONFIG);
            }
            Err(e @ ServeError::Tls(_)) => {
                error!("{e}");
                return ExitCode::from(EX_SOFTWARE);
            }
            Err(e @ ServeError::Ssh(sluice::ssh::SshError::SocketDir { .. })) => {
                error!("{e}");
                return ExitCode::from(EX_CANTCREAT);
            }
            Err(ServeError::Ssh(e)) => {
                error!("config error: {e}");
                return ExitCode::from(EX_CONFIG);
            }
            Err(e @ ServeError::Bind { .. }) => {
                error!("{e}");
                return ExitCode::from(EX_OSERR);
            }
            Err(e @ ServeError::Activation(_)) => {
                error!("{e}");
                return ExitCode::from(EX_CONFIG);
            }
        };
        announce(&server, &cfg);
        // READY before anything can say RELOADING (a SIGHUP may already be queued).
        sluice::systemd::ready();
        sluice::systemd::status("serving");
        sluice::systemd::spawn_watchdog(server.liveness());
        reload_on_sighup(server.reloader(), server.readiness(), hup);
        let shutdown = shutdown_signal(server.force_close_token(), term, int);
        server.run(shutdown).await;
        ExitCode::SUCCESS
    })
}

fn announce(server: &Server, cfg: &Config) {
    let addrs = server.local_addrs();
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    if server.socket_activated() {
        info!(listen = %list.join(", "), version = env!("CARGO_PKG_VERSION"), "sluice is serving on sockets from systemd (socket activation; `listen` is not used)");
    } else {
        info!(listen = %list.join(", "), version = env!("CARGO_PKG_VERSION"), "sluice is serving");
    }
    if !cfg.trusted_proxies.is_empty() {
        info!(
            count = cfg.trusted_proxies.len(),
            "PROXY protocol headers accepted from trusted_proxies"
        );
    }
    for r in [&cfg.ssh, &cfg.http] {
        info!(route = r.kind.as_str(), target = %r.target_description(), "route");
    }
    if let Some(ssh) = server.ssh() {
        info!(fingerprint = %ssh.host_fingerprint(), "embedded SSH server host key");
    }
    // kTLS would let the kernel encrypt and splice TLS legs; sluice does TLS in user space today.
    match sluice::sys::ktls_probe() {
        Ok(()) => info!("kTLS: offered by this kernel (not used yet: TLS runs in user space)"),
        Err(e) => info!("kTLS: not offered by this kernel ({e}); TLS runs in user space"),
    }
    let certs = server.certs().current();
    info!(sha256 = %certs.fingerprint, "TLS certificate fingerprint");
    if certs.self_signed {
        let cert = server.state_dir().join(sluice::tls::SELF_SIGNED_CERT);
        if let Some(a) = addrs.first() {
            let host = if a.ip().is_loopback() {
                "localhost".to_string()
            } else {
                a.ip().to_string()
            };
            let port = a.port();
            info!(
                "self-signed certificate {}; try: curl --cacert {} https://{host}:{port}/ ; ssh -N -o ProxyCommand='openssl s_client -quiet -verify_return_error -CAfile {} -connect %h:%p -servername {host} -alpn ssh' -p {port} tunnel@{host}{}",
                cert.display(),
                cert.display(),
                cert.display(),
                if server.ssh().is_some_and(|s| s.keys().counts() == (0, 0)) { " (once your public key is in an [ssh] authorized_keys file)" } else { "" }
            );
        }
    }
}

/// SIGHUP re-reads the config file, the certificates and the authorized keys; a reload that
/// fails anywhere changes nothing. systemd hears RELOADING=1 then READY=1 either way.
fn reload_on_sighup(
    reloader: sluice::server::Reloader,
    readiness: sluice::admin::Readiness,
    mut hup: tokio::signal::unix::Signal,
) {
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if !readiness.is_ready() {
                info!("SIGHUP ignored: shutting down");
                continue;
            }
            sluice::systemd::reloading();
            match reloader.reload().await {
                Ok(summary) => {
                    info!("SIGHUP: reloaded: {summary}");
                    sluice::systemd::status("serving; last reload succeeded");
                }
                Err(e) => {
                    tracing::warn!(
                        "SIGHUP: reload refused, the running configuration stays in force: {e}"
                    );
                    sluice::systemd::status("serving; last reload FAILED, see the log");
                }
            }
            sluice::systemd::ready();
        }
    });
}

/// Resolves on the first SIGTERM or SIGINT; a second one cancels `force` (close everything now).
async fn shutdown_signal(
    force: tokio_util::sync::CancellationToken,
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
) {
    {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        sluice::systemd::stopping();
        info!(
            signal = name,
            "shutdown requested; a second signal closes open connections at once"
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: closing open connections now");
            force.cancel();
        });
    }
}
