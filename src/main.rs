//! The `sluice` command line: parse arguments, set up logging, run a subcommand, map errors
//! to sysexits codes (78 for a bad config).

use std::fmt::Display;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice::client::{ConnectError, ConnectOptions, Proxy, Trust};
use sluice::config::{Config, ConfigError};
use sluice::exit::{Exit, EX_CONFIG, EX_OSERR, EX_USAGE};
use tracing::error;

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
    Serve(StateArgs),
    /// Print the embedded SSH server's host key fingerprint (making the key if there is none).
    Hostkey(StateArgs),
    /// Connect to a sluice (or any TLS) server and relay stdin/stdout: an OpenSSH ProxyCommand.
    /// The server is verified by default (system trust store, --ca or --pin).
    Connect(ConnectArgs),
    /// Forwards (-L, -R, -D) over SSH without OpenSSH, through TLS to a sluice (or plain TCP
    /// to any sshd), reconnecting by themselves; as a device with --grant or --config.
    Tunnel(Box<TunnelArgs>),
    /// Print a ready ~/.ssh/config block that reaches HOST through `sluice connect`.
    SshConfig(SshConfigArgs),
    /// Validate a config file (certificates included) and print the routing table.
    Check {
        /// Config file (TOML).
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: PathBuf,
    },
    /// Ask a running sluice's admin endpoint whether it is ready (exit 0) or not (exit 1): an
    /// exec probe for images without curl.
    Healthcheck(HealthArgs),
    /// List the live tunnels of a running sluice (name, port, owner, since, traffic), from its
    /// admin endpoint.
    Tunnels(TunnelsArgs),
    /// Print the public line of the user CA that signs grant certificates (making it if
    /// there is none), for `cert-authority` trust elsewhere.
    Ca(StateArgs),
    /// Issue, list and revoke access grants on a running sluice (its control socket).
    #[command(subcommand)]
    Grant(GrantCommand),
    /// The audit trail: check its chain, search it.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// List the live SSH sessions of a running sluice (its control socket), or end one.
    Sessions(SessionsArgs),
    /// Lock out a key, a grant, a device or a source network: its live sessions end and new
    /// ones are refused until the lock is lifted or expires. `lock list`, `lock lift ID`.
    Lock(LockArgs),
}

#[derive(Args)]
struct SessionsArgs {
    #[command(subcommand)]
    kill: Option<SessionsCommand>,
    #[command(flatten)]
    control: ControlArgs,
    /// Print the API's JSON as it came.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// End a live session; its client gets "closed by an administrator".
    Kill {
        /// The session id (from `sluice sessions`).
        id: u64,
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct LockArgs {
    #[command(subcommand)]
    cmd: Option<LockCommand>,
    #[command(flatten)]
    control: ControlArgs,
    /// A key fingerprint (SHA256:..., as `ssh-keygen -lf` prints it).
    #[arg(long, group = "target")]
    key: Option<String>,
    /// An access grant id (g-...).
    #[arg(long, group = "target")]
    grant: Option<String>,
    /// A grant device id.
    #[arg(long, group = "target")]
    device: Option<String>,
    /// An address or CIDR.
    #[arg(long, group = "target")]
    source: Option<String>,
    /// How long the lock lasts (`30m`, `2h`); default until lifted.
    #[arg(long)]
    ttl: Option<String>,
    /// Why (in the trail and the disconnect message).
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Subcommand)]
enum LockCommand {
    /// List the locks in force.
    List {
        #[command(flatten)]
        control: ControlArgs,
        /// Print the API's JSON as it came.
        #[arg(long)]
        json: bool,
    },
    /// Lift a lock.
    Lift {
        /// The lock id (l-...).
        id: String,
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print the trail's lines (JSON, oldest first) that match every filter given; exit 1 if
    /// none does.
    Search {
        /// The files, oldest first; default: the trail's directory.
        files: Vec<PathBuf>,
        /// Only events this recent (`1h`, `2d`) or since this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only events before this long ago (`30m`) or this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// A key fingerprint (SHA256:...), CA, certificate id or tunnel owner.
        #[arg(long)]
        identity: Option<String>,
        /// A grant device id.
        #[arg(long)]
        device: Option<String>,
        /// A grant id.
        #[arg(long)]
        grant: Option<String>,
        /// A session id (from `sluice sessions`).
        #[arg(long)]
        session: Option<u64>,
        /// Only these events (repeatable): session_killed, forward_opened, ...
        #[arg(long)]
        event: Vec<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Check the trail's hash chain (every file of [audit] dir, oldest first, or FILES in the
    /// order given); names the first line that breaks it. Exit 0 if it holds, 1 if not.
    Verify {
        /// The files, oldest first; default: the trail's directory.
        files: Vec<PathBuf>,
        /// Start from the first line's own place (when the oldest files were deleted).
        #[arg(long)]
        from_first: bool,
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(Subcommand)]
enum GrantCommand {
    /// Issue a grant: prints JSON with the grant, the key (if sluice made it), the
    /// certificate and a ready ssh command.
    Issue(IssueArgs),
    /// List live grants (--all: ended ones too).
    List {
        #[command(flatten)]
        control: ControlArgs,
        /// Ended grants too.
        #[arg(long)]
        all: bool,
        /// Print the API's JSON as it came.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a grant: its certificate is refused from now on and its live sessions end.
    Revoke {
        #[command(flatten)]
        control: ControlArgs,
        /// The grant id (g-...).
        id: String,
    },
}

#[derive(Args)]
struct IssueArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The device id (1-64 of A-Z a-z 0-9 : . _ -): the certificate's principal and login.
    #[arg(long)]
    device: String,
    /// How long the grant lasts (default [grants] default_ttl).
    #[arg(long)]
    ttl: Option<String>,
    /// The device's own public key file (OpenSSH); without one sluice makes a key pair.
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// A fixed port from [ssh] listen_ports.
    #[arg(long)]
    port: Option<u16>,
    /// The tunnel name (default from the device id).
    #[arg(long)]
    name: Option<String>,
    /// End the device's live grant instead of refusing.
    #[arg(long)]
    replace: bool,
    /// Addresses or CIDRs (comma-separated) the certificate may be used from.
    #[arg(long)]
    source_address: Option<String>,
    /// A host:port the device may reach with -W/-L (repeatable; default none).
    #[arg(long)]
    permit_open: Vec<String>,
    /// What the device publishes, for the ssh command printed (default localhost:22).
    #[arg(long)]
    local: Option<String>,
}

/// Where the control socket is.
#[derive(Args)]
struct ControlArgs {
    /// The control socket; default: [control] socket from --config, else control.sock
    /// in the state directory.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Config file (TOML).
    #[arg(long, short, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// The state directory.
    #[arg(long, env = "SLUICE_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args)]
struct TunnelsArgs {
    /// The admin address; default: [admin] listen from --config, else 127.0.0.1:9090.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Take the admin address from this config file (--admin wins if both are given).
    #[arg(long, short, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the admin endpoint's JSON as it came.
    #[arg(long)]
    json: bool,
    /// Give up after this long.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Where `serve` and `hostkey` find their config and state.
#[derive(Args)]
struct StateArgs {
    /// Config file (TOML). Without one: 127.0.0.1:8443 and a self-signed certificate.
    #[arg(long, short, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Where generated state lives (self-signed certificate, host keys).
    #[arg(long, env = "SLUICE_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ConnectArgs {
    /// HOST[:PORT]; the port defaults to 443. `[::1]:8443` for IPv6 addresses.
    target: String,
    /// Deadline for connecting and the TLS handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    #[command(flatten)]
    tls: TlsArgs,
}

/// How `connect` and `tunnel` reach and verify a server over TLS.
#[derive(Args, Clone)]
struct TlsArgs {
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
}

#[derive(Args)]
struct TunnelArgs {
    /// [USER@]HOST[:PORT] of the server; the port defaults to 443 (22 with --no-tls).
    #[arg(required_unless_present_any = ["grant", "config"])]
    target: Option<String>,
    /// Local forward, as ssh -L: [ADDRESS:]PORT:HOST:HOSTPORT (the server connects to
    /// HOST:HOSTPORT).
    #[arg(short = 'L', value_name = "[ADDRESS:]PORT:HOST:HOSTPORT")]
    local: Vec<String>,
    /// Remote forward, as ssh -R: [ADDRESS|NAME:]PORT:HOST:HOSTPORT; a NAME publishes a
    /// tunnel name on a sluice; PORT 0 lets the server choose (and keeps it across reconnects).
    #[arg(short = 'R', value_name = "[ADDRESS|NAME:]PORT:HOST:HOSTPORT")]
    remote: Vec<String>,
    /// A SOCKS5 proxy (CONNECT, no authentication) here, out through the server, as ssh -D.
    #[arg(short = 'D', value_name = "[ADDRESS:]PORT")]
    dynamic: Vec<String>,
    /// A private key file (its FILE-cert.pub is used too, if there); repeatable. Default:
    /// SSH_KEY (a path or the key text), else ssh-agent and ~/.ssh/id_{ed25519,ecdsa,rsa}.
    #[arg(short = 'i', value_name = "FILE")]
    identity: Vec<PathBuf>,
    /// The SSH user; `USER@` in the target wins. Default: the login name.
    #[arg(short = 'l', long, env = "SSH_USER")]
    user: Option<String>,
    /// An access grant, as `sluice grant issue` printed it: the key (or give the
    /// device's own with -i), the certificate, the user, the server, its host keys and the
    /// forwards. -L/-R/-D and a target add to it or override the server.
    #[arg(long, value_name = "FILE")]
    grant: Option<PathBuf>,
    /// A device config (TOML) with the same settings as these flags (server, grant,
    /// identity, local/remote/dynamic, host_keys, keepalive, [tls] ...), for a service.
    #[arg(long, short = 'c', value_name = "FILE", conflicts_with_all = ["target", "grant"])]
    config: Option<PathBuf>,
    /// SSH over plain TCP (to any sshd), without TLS.
    #[arg(long)]
    no_tls: bool,
    /// Accept only a host key with this fingerprint (SHA256:...); repeatable. Default:
    /// ~/.ssh/known_hosts.
    #[arg(long, value_name = "SHA256:...")]
    host_key: Vec<String>,
    /// The known_hosts file to check (and, with --accept-new, to add to).
    #[arg(long, value_name = "FILE")]
    known_hosts: Option<PathBuf>,
    /// Record the host key of a host seen for the first time (OpenSSH's
    /// StrictHostKeyChecking=accept-new); a changed key is still refused.
    #[arg(long)]
    accept_new: bool,
    /// A dead link is noticed within this.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    /// Deadline for one connection attempt (TCP, TLS, SSH, authentication, forwards).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// The first reconnect delay (it doubles, with jitter, up to --backoff-max).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    backoff: Duration,
    /// The longest reconnect delay.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    backoff_max: Duration,
    /// Serve /metrics, /livez and /readyz (ready while connected) here.
    #[arg(long, value_name = "ADDR:PORT")]
    admin: Option<SocketAddr>,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args)]
struct SshConfigArgs {
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
}

#[derive(Args)]
struct HealthArgs {
    /// The admin address; default: [admin] listen from --config, else 127.0.0.1:9090.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Take the admin address from this config file (--admin wins if both are given).
    #[arg(long, short, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Check liveness (/livez) instead of readiness (/readyz).
    #[arg(long)]
    live: bool,
    /// Give up after this long.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            f.report();
            ExitCode::from(f.code)
        }
    }
}

/// Why a command failed: said once, then the process exits with `code`.
struct Failure {
    code: u8,
    message: String,
    /// Through the log (`serve`, once logging is set up) rather than a line on stderr.
    logged: bool,
}

impl Failure {
    fn new(code: u8, message: impl Display) -> Failure {
        Failure {
            code,
            message: message.to_string(),
            logged: false,
        }
    }

    /// An error that knows its exit code, said after `context` ("sluice connect").
    fn of(context: &str, e: &impl Exit) -> Failure {
        Failure::new(e.exit_code(), format!("{context}: {e}"))
    }

    fn logged(mut self) -> Failure {
        self.logged = true;
        self
    }

    fn report(&self) {
        if self.logged {
            error!("{}", self.message);
        } else {
            eprintln!("{}", self.message);
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        // The helpers keep stderr for their own one-line errors and stdout for data: no logging.
        Command::Connect(args) => connect(args),
        Command::Healthcheck(args) => healthcheck(args),
        Command::Tunnels(args) => tunnels(args),
        Command::Grant(cmd) => grant(cmd),
        Command::Audit(cmd) => audit(cmd),
        Command::Sessions(a) => sessions(a),
        Command::Lock(a) => lock(a),
        Command::Tunnel(a) => {
            init_logging(cli.log_format);
            tunnel(*a)
        }
        command => {
            init_logging(cli.log_format);
            match command {
                Command::SshConfig(args) => ssh_config(args),
                Command::Check { config } => check(&config),
                Command::Serve(args) => serve(args),
                Command::Hostkey(args) => hostkey(args),
                Command::Ca(args) => ca(args),
                Command::Connect(_)
                | Command::Healthcheck(_)
                | Command::Tunnels(_)
                | Command::Grant(_)
                | Command::Audit(_)
                | Command::Sessions(_)
                | Command::Tunnel(_)
                | Command::Lock(_) => Ok(()),
            }
        }
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

fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::without_file(
            std::env::var_os("HOME").map(PathBuf::from).as_deref(),
        )),
    }
}

/// A config error, as `check` and `hostkey` say it.
fn config_failure(e: &impl Exit) -> Failure {
    Failure::of("sluice: config error", e)
}

fn check(path: &Path) -> Result<(), Failure> {
    let cfg = load(Some(path)).map_err(|e| config_failure(&e))?;
    let state_dir = sluice::state::resolve(cfg.state_dir.as_deref());
    // Certificates are part of the config: a check that does not load them proves little.
    if let sluice::config::CertSource::Files { .. } = cfg.tls.cert {
        let certs = sluice::tls::load_certs(&cfg, &state_dir).map_err(|e| config_failure(&e))?;
        // A warning, not an error: the certificate may be about to be issued.
        if let Some(t) = &cfg.tunnels {
            let wildcard = format!("*.{}", t.domain);
            if let Err(why) = certs.covers(&wildcard) {
                eprintln!(
                    "sluice check: warning: no certificate in [tls] or [[tls.sni]] covers {wildcard}, so HTTPS visitors of tunnels will fail verification: {why}"
                );
            }
        }
    }
    print!("{}", cfg.describe());
    println!("config OK: {}", path.display());
    Ok(())
}

/// What `sluice healthcheck` asks, validated.
struct Probe {
    addr: SocketAddr,
    live: bool,
    timeout: Duration,
}

impl TryFrom<HealthArgs> for Probe {
    type Error = Failure;

    fn try_from(a: HealthArgs) -> Result<Probe, Failure> {
        let addr = match (a.admin, a.config) {
            (Some(addr), _) => addr,
            (None, Some(path)) => {
                let cfg = Config::load(&path)
                    .map_err(|e| Failure::of("sluice healthcheck: config error", &e))?;
                match cfg.admin {
                    Some(addr) if addr.port() == 0 => return Err(Failure::new(
                        EX_CONFIG,
                        format!("sluice healthcheck: {}: [admin] listen names port 0, so the port is only known to the running daemon (it logs it): use --admin ADDR", path.display()),
                    )),
                    Some(addr) => addr,
                    None => return Err(Failure::new(
                        EX_CONFIG,
                        format!("sluice healthcheck: {} has no [admin] table: nothing to ask", path.display()),
                    )),
                }
            }
            (None, None) => sluice::config::DEFAULT_ADMIN_LISTEN,
        };
        Ok(Probe {
            addr,
            live: a.live,
            timeout: a.timeout,
        })
    }
}

fn healthcheck(args: HealthArgs) -> Result<(), Failure> {
    let probe = Probe::try_from(args)?;
    let path = if probe.live { "/livez" } else { "/readyz" };
    sluice::admin::check(sluice::admin::probe_addr(probe.addr), path, probe.timeout)
        .map_err(|e| Failure::new(1, format!("sluice healthcheck: {e}")))?;
    println!("{} ok", if probe.live { "live" } else { "ready" });
    Ok(())
}

fn tunnels(a: TunnelsArgs) -> Result<(), Failure> {
    let json = a.json;
    let probe = Probe::try_from(HealthArgs {
        admin: a.admin,
        config: a.config,
        live: false,
        timeout: a.timeout,
    })?;
    let body = sluice::admin::fetch(
        sluice::admin::probe_addr(probe.addr),
        "/tunnels",
        probe.timeout,
    )
    .map_err(|e| Failure::new(1, format!("sluice tunnels: {e}")))?;
    if json {
        print!("{body}");
        return Ok(());
    }
    let list: Vec<sluice::tunnel::LiveTunnel> = serde_json::from_str(&body).map_err(|e| {
        Failure::new(
            1,
            format!("sluice tunnels: the admin endpoint's answer is not a tunnel list: {e}"),
        )
    })?;
    if list.is_empty() {
        println!("no live tunnels");
        return Ok(());
    }
    println!(
        "{:<24} {:>5} {:<7} {:<21} {:>8} {:>14} {:>14}  OWNER",
        "NAME", "PORT", "VIA", "SINCE", "VISITS", "TO PUBLISHER", "TO VISITORS"
    );
    for t in list {
        println!(
            "{:<24} {:>5} {:<7} {:<21} {:>8} {:>14} {:>14}  {}",
            t.name,
            t.port,
            t.via,
            t.since,
            t.visits,
            t.bytes_to_publisher,
            t.bytes_to_visitors,
            t.owner
        );
    }
    Ok(())
}

fn ssh_config(a: SshConfigArgs) -> Result<(), Failure> {
    let usage = |m: String| Failure::new(EX_USAGE, format!("sluice ssh-config: {m}"));
    let (host, port) = sluice::client::parse_target(&a.target)
        .map_err(|e| Failure::of("sluice ssh-config", &e))?;
    let alias = a.alias;
    // ssh treats these as patterns: `Host *` would catch every destination.
    if alias.is_empty()
        || alias
            .chars()
            .any(|c| c.is_whitespace() || "#*?!,\"".contains(c))
    {
        return Err(usage(format!("`{alias}` cannot be a Host alias")));
    }
    let mut trust = Vec::new();
    if let Some(p) = a.pin {
        let d = sluice::client::parse_pin(&p).map_err(|m| usage(format!("--pin {m}")))?;
        trust.extend(["--pin".to_string(), sluice::client::format_pin(&d)]);
    }
    if let Some(ca) = a.ca {
        let abs = std::fs::canonicalize(&ca).map_err(|e| {
            Failure::new(
                EX_CONFIG,
                format!("sluice ssh-config: --ca {}: {e}", ca.display()),
            )
        })?;
        trust.extend(["--ca".to_string(), abs.display().to_string()]);
    }
    let program = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "sluice".into());
    print!(
        "{}",
        sluice::client::ssh_config_block(&alias, &host, port, &program, &trust)
    );
    Ok(())
}

impl TlsArgs {
    fn options(
        self,
        host: String,
        port: u16,
        connect_timeout: Duration,
    ) -> Result<ConnectOptions, ConnectError> {
        let a = self;
        let trust = match (a.ca, a.pin, a.insecure) {
            (Some(ca), _, _) => Trust::CaFile(ca),
            (None, Some(p), _) => Trust::Pin(
                sluice::client::parse_pin(&p)
                    .map_err(|m| ConnectError::Usage(format!("--pin {m}")))?,
            ),
            (None, None, true) => Trust::Insecure,
            (None, None, false) => Trust::System,
        };
        let proxy = match (a.proxy, a.no_proxy) {
            (Some(url), _) => Some(Proxy::parse(&url)),
            (None, true) => None,
            (None, false) => Proxy::from_env(&host, port),
        };
        let proxy = proxy
            .transpose()
            .map_err(|m| ConnectError::Usage(format!("proxy: {m}")))?;
        Ok(ConnectOptions {
            client_cert: a.cert.zip(a.key),
            proxy,
            sni: if a.no_sni {
                None
            } else {
                Some(a.sni.unwrap_or_else(|| host.clone()))
            },
            host,
            port,
            alpn: a
                .alpn
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(String::into_bytes)
                .collect(),
            trust,
            connect_timeout,
        })
    }
}

impl TryFrom<ConnectArgs> for ConnectOptions {
    type Error = ConnectError;

    fn try_from(a: ConnectArgs) -> Result<ConnectOptions, ConnectError> {
        let (host, port) = sluice::client::parse_target(&a.target)?;
        a.tls.options(host, port, a.connect_timeout)
    }
}

/// The device config's settings in place of the flags they stand for.
fn apply_device(a: &mut TunnelArgs, d: sluice::client::tunnel::DeviceConfig) {
    a.target = d.server;
    a.user = d.user.or(a.user.take());
    a.grant = d.grant;
    a.identity = d.identity;
    a.no_tls = d.no_tls;
    a.local = d.local;
    a.remote = d.remote;
    a.dynamic = d.dynamic;
    a.host_key = d.host_keys;
    a.known_hosts = d.known_hosts;
    a.accept_new = d.accept_new;
    a.keepalive = d.keepalive.unwrap_or(a.keepalive);
    a.connect_timeout = d.connect_timeout.unwrap_or(a.connect_timeout);
    a.backoff = d.backoff.unwrap_or(a.backoff);
    a.backoff_max = d.backoff_max.unwrap_or(a.backoff_max);
    a.admin = d.admin;
    a.tls.ca = d.ca;
    a.tls.pin = d.pin;
    a.tls.insecure = d.insecure;
    a.tls.sni = d.sni;
    a.tls.no_sni = d.no_sni;
    a.tls.proxy = d.proxy;
    a.tls.no_proxy = d.no_proxy;
    (a.tls.cert, a.tls.key) = d.client_cert.unzip();
}

fn tunnel(mut a: TunnelArgs) -> Result<(), Failure> {
    use sluice::client::tunnel::{self, Forward, HostKeys, KeySource, Transport};
    let usage = |m: String| Failure::new(EX_USAGE, format!("sluice tunnel: {m}"));
    if let Some(path) = a.config.clone() {
        let d = tunnel::DeviceConfig::load(&path).map_err(|e| config_failure(&e))?;
        apply_device(&mut a, d);
    }
    let fail = |e: tunnel::TunnelError| Failure::of("sluice tunnel", &e).logged();
    let bundle = match &a.grant {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                Failure::new(
                    EX_CONFIG,
                    format!("sluice tunnel: --grant {}: {e}", p.display()),
                )
            })?;
            Some(
                tunnel::Bundle::parse(&text, &p.display().to_string())
                    .map_err(|e| Failure::of("sluice tunnel", &e))?,
            )
        }
    };
    let given = a
        .target
        .clone()
        .or_else(|| bundle.as_ref().map(|b| b.server.clone()))
        .ok_or_else(|| usage("no server: give [USER@]HOST[:PORT] or --grant".into()))?;
    let (user_at, target) = match given.rsplit_once('@') {
        Some((u, t)) => (Some(u.to_string()), t.to_string()),
        None => (None, given.clone()),
    };
    let (host, port) = sluice::client::parse_target(&target).map_err(|e| usage(e.to_string()))?;
    // `parse_target` defaults to 443; plain SSH means 22 unless a port was given.
    let port = if a.no_tls && !target_has_port(&target) {
        22
    } else {
        port
    };
    let user = user_at
        .or(bundle.as_ref().map(|b| b.user.clone()))
        .or(a.user.clone())
        .or_else(|| std::env::var("USER").ok())
        .ok_or_else(|| usage("no user: give USER@HOST, -l USER or SSH_USER".into()))?;
    let mut forwards = bundle
        .as_ref()
        .map(|b| b.forwards.clone())
        .unwrap_or_default();
    for s in &a.local {
        forwards.push(Forward::local(s).map_err(usage)?);
    }
    for s in &a.remote {
        forwards.push(Forward::remote(s).map_err(usage)?);
    }
    for s in &a.dynamic {
        forwards.push(Forward::dynamic(s).map_err(usage)?);
    }
    if forwards.is_empty() {
        return Err(usage(
            "nothing to do: give at least one -L, -R or -D".into(),
        ));
    }
    let load = |s: &KeySource| tunnel::load_key(s).map_err(|e| Failure::of("sluice tunnel", &e));
    let mut keys = Vec::new();
    match bundle.as_ref().map(|b| &b.key) {
        Some(tunnel::BundleKey::Both(k)) => keys.push(load(k)?),
        Some(tunnel::BundleKey::CertificateOnly(cert)) => {
            // The device's own key, from -i, with the bundle's certificate.
            let [path] = a.identity.as_slice() else {
                return Err(usage(
                    "the grant holds no private key (the device brought its own): give it with -i FILE".into(),
                ));
            };
            let key = load(&KeySource::File(path.clone()))?;
            keys.push(
                key.with_certificate(cert, "--grant")
                    .map_err(|e| Failure::of("sluice tunnel", &e))?,
            );
        }
        None => {}
    }
    let mut sources: Vec<KeySource> = Vec::new();
    if bundle.is_none() {
        sources.extend(a.identity.iter().cloned().map(KeySource::File));
        if sources.is_empty() {
            if let Some(v) = std::env::var("SSH_KEY").ok().filter(|v| !v.is_empty()) {
                sources.push(KeySource::from_env_value(&v));
            }
        }
    }
    // Without an explicit key: the agent, then OpenSSH's default files.
    let explicit = !sources.is_empty() || !keys.is_empty();
    let agent = !explicit && std::env::var_os("SSH_AUTH_SOCK").is_some();
    if !explicit {
        sources.extend(tunnel::default_files().into_iter().map(KeySource::File));
    }
    for s in &sources {
        keys.push(load(s)?);
    }
    let pinned = if a.host_key.is_empty() {
        bundle
            .as_ref()
            .map(|b| b.host_keys.clone())
            .unwrap_or_default()
    } else {
        a.host_key.clone()
    };
    let host_keys = if pinned.is_empty() {
        let path = a
            .known_hosts
            .clone()
            .or_else(tunnel::known_hosts_path)
            .ok_or_else(|| {
                usage("no HOME for ~/.ssh/known_hosts: give --known-hosts or --host-key".into())
            })?;
        HostKeys::KnownHosts {
            path,
            accept_new: a.accept_new,
        }
    } else {
        HostKeys::Pinned(pinned)
    };
    let transport = if a.no_tls {
        Transport::Tcp
    } else {
        let c = a
            .tls
            .clone()
            .options(host.clone(), port, a.connect_timeout)
            .map_err(|e| Failure::of("sluice tunnel", &e))?;
        if matches!(c.trust, Trust::Insecure) {
            eprintln!("sluice tunnel: WARNING: --insecure: the server's TLS certificate is not verified (the SSH host key still is)");
        }
        Transport::Tls(Box::new(c))
    };
    let opts = tunnel::Options {
        host,
        port,
        transport,
        user,
        credentials: tunnel::Credentials { keys, agent },
        host_keys,
        forwards,
        keepalive: a.keepalive,
        backoff: tunnel::Backoff {
            first: a.backoff,
            max: a.backoff_max.max(a.backoff),
        },
        connect_timeout: a.connect_timeout,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(EX_OSERR, format!("sluice tunnel: cannot start: {e}")))?;
    rt.block_on(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        let (state_tx, state) =
            tokio::sync::watch::channel(tunnel::State::Connecting { attempt: 0 });
        let signals = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!(target: "sluice::tunnel", "stopping: closing channels");
            signals.cancel();
        });
        let liveness = sluice::admin::Liveness::default();
        tokio::spawn(liveness.register().run());
        if let Some(addr) = a.admin {
            let listener = sluice::admin::bind(addr).map_err(|e| {
                Failure::new(EX_OSERR, format!("sluice tunnel: --admin {addr}: {e}"))
            })?;
            let readiness = sluice::admin::Readiness::ready();
            tokio::spawn(follow_state(state.clone(), readiness.clone()));
            tokio::spawn(sluice::admin::serve(
                listener,
                readiness,
                liveness.clone(),
                stop.clone(),
                std::sync::Arc::new(Vec::new),
            ));
        }
        // systemd (Type=notify): ready once the local listeners are bound and the first
        // attempt starts; the state as STATUS=; the watchdog while the runtime turns.
        tokio::spawn(notify_states(state, liveness));
        let r = tunnel::run(opts, stop, state_tx).await;
        sluice::systemd::stopping();
        r.map_err(fail)
    })
}

/// Tells systemd: READY=1 at the first state `run` reports (then the watchdog pings start),
/// and each state as STATUS=.
async fn notify_states(
    mut state: tokio::sync::watch::Receiver<sluice::client::tunnel::State>,
    liveness: sluice::admin::Liveness,
) {
    use sluice::client::tunnel::State;
    let mut ready = false;
    while state.changed().await.is_ok() {
        let text = match &*state.borrow_and_update() {
            State::Connecting { attempt: 0 } => "connecting".to_string(),
            State::Connecting { attempt } => format!("connecting (attempt {})", attempt + 1),
            State::Connected => "connected".to_string(),
            State::Waiting { delay, why } => format!(
                "reconnecting in {}: {why}",
                humantime::format_duration(Duration::from_millis(
                    u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)
                ))
            ),
            State::Stopped => "stopped".to_string(),
        };
        if !ready {
            sluice::systemd::ready();
            sluice::systemd::spawn_watchdog(liveness.clone());
            ready = true;
        }
        sluice::systemd::status(&text);
    }
}

/// `/readyz` says ready while the tunnel is connected.
async fn follow_state(
    mut state: tokio::sync::watch::Receiver<sluice::client::tunnel::State>,
    readiness: sluice::admin::Readiness,
) {
    loop {
        let connected = matches!(
            *state.borrow_and_update(),
            sluice::client::tunnel::State::Connected
        );
        readiness.set(connected);
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Whether `HOST[:PORT]` names a port.
fn target_has_port(t: &str) -> bool {
    match t.strip_prefix('[') {
        Some(rest) => rest.contains("]:"),
        None => t.matches(':').count() == 1,
    }
}

fn connect(args: ConnectArgs) -> Result<(), Failure> {
    let fail = |e: ConnectError| Failure::of("sluice connect", &e);
    let opts = ConnectOptions::try_from(args).map_err(fail)?;
    if matches!(opts.trust, Trust::Insecure) {
        eprintln!("sluice connect: WARNING: --insecure: the server is not verified; anyone on the path can read and change this connection");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(ConnectError::Io(format!("cannot start: {e}"))))?;
    let result = rt.block_on(sluice::client::run(&opts));
    // stdin is read on a blocking thread that cannot be cancelled: do not wait for it, or a
    // server that closes first would leave ssh and this helper waiting on each other.
    rt.shutdown_background();
    result.map_err(fail)
}

fn hostkey(a: StateArgs) -> Result<(), Failure> {
    let cfg = load(a.config.as_deref()).map_err(|e| config_failure(&e))?;
    let state_dir = sluice::state::resolve(a.state_dir.as_deref().or(cfg.state_dir.as_deref()));
    let path = sluice::ssh::host_key_path(&cfg.embedded_ssh, &state_dir);
    let key = sluice::ssh::load_or_create_host_key(&path).map_err(|e| Failure::of("sluice", &e))?;
    let fp = key.public_key().fingerprint(russh::keys::HashAlg::Sha256);
    let public = key.public_key().to_openssh().unwrap_or_default();
    println!("{fp} {}", path.display());
    println!("{public}");
    Ok(())
}

fn ca(a: StateArgs) -> Result<(), Failure> {
    let cfg = load(a.config.as_deref()).map_err(|e| config_failure(&e))?;
    let state_dir = sluice::state::resolve(a.state_dir.as_deref().or(cfg.state_dir.as_deref()));
    let path = cfg
        .grants
        .as_ref()
        .and_then(|g| g.ca_key.clone())
        .unwrap_or_else(|| state_dir.join(sluice::grant::ca::CA_FILE));
    let ca = sluice::grant::UserCa::load_or_create(&path)
        .map_err(|e| Failure::new(1, format!("sluice ca: {e}")))?;
    println!("{}", ca.public_line());
    Ok(())
}

impl ControlArgs {
    fn socket(&self) -> Result<PathBuf, Failure> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        let cfg = match &self.config {
            Some(p) => {
                Some(Config::load(p).map_err(|e| Failure::of("sluice grant: config error", &e))?)
            }
            None => None,
        };
        let state_dir = sluice::state::resolve(
            self.state_dir
                .as_deref()
                .or(cfg.as_ref().and_then(|c| c.state_dir.as_deref())),
        );
        let settings = cfg.map(|c| c.control).unwrap_or_default();
        Ok(sluice::control::socket_path(&settings, &state_dir))
    }
}

/// One request to the control API; the body of a 2xx answer, else a failure with its message.
fn control(
    socket: &Path,
    method: http::Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<serde_json::Value, Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(1, format!("sluice: {e}")))?;
    let (status, bytes) = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(30),
                sluice::control::request(socket, method, uri, body),
            )
            .await
        })
        .map_err(|_| Failure::new(1, "sluice: the control API did not answer within 30s"))?
        .map_err(|e| Failure::new(sluice::exit::EX_UNAVAILABLE, format!("sluice: {e}")))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    if status.is_success() {
        return Ok(value);
    }
    let e = &value["error"];
    let message = match (e["field"].as_str(), e["message"].as_str()) {
        (Some(f), Some(m)) => format!("{f}: {m}"),
        (None, Some(m)) => m.to_string(),
        _ => value.to_string(),
    };
    let code = if status.is_client_error() {
        EX_USAGE
    } else {
        sluice::exit::EX_UNAVAILABLE
    };
    Err(Failure::new(
        code,
        format!("sluice: {} {message}", status.as_u16()),
    ))
}

/// A time given as a duration before now (`1h`) or an RFC 3339 time.
fn when(flag: &str, v: &str) -> Result<std::time::SystemTime, Failure> {
    if let Ok(d) = humantime::parse_duration(v) {
        return Ok(std::time::SystemTime::now()
            .checked_sub(d)
            .unwrap_or(std::time::UNIX_EPOCH));
    }
    humantime::parse_rfc3339_weak(v).map_err(|_| {
        Failure::new(
            EX_USAGE,
            format!("sluice audit search: {flag} {v}: a duration (1h, 2d) or a time (2026-12-01T10:00:00Z)"),
        )
    })
}

/// The trail's files: those given, else every file in the trail's directory.
fn audit_files(
    what: &str,
    files: Vec<PathBuf>,
    state: &StateArgs,
) -> Result<Vec<PathBuf>, Failure> {
    let files = if files.is_empty() {
        let cfg = match &state.config {
            Some(p) => Some(
                Config::load(p)
                    .map_err(|e| Failure::of(&format!("sluice audit {what}: config error"), &e))?,
            ),
            None => None,
        };
        let state_dir = sluice::state::resolve(
            state
                .state_dir
                .as_deref()
                .or(cfg.as_ref().and_then(|c| c.state_dir.as_deref())),
        );
        let settings = cfg
            .and_then(|c| c.audit)
            .unwrap_or_else(|| sluice::config::AuditSettings::defaults(None));
        let dir = sluice::audit::dir(&settings, &state_dir);
        sluice::audit::files_in(&dir).map_err(|e| {
            Failure::new(
                sluice::exit::EX_NOINPUT,
                format!("sluice audit {what}: {}: {e}", dir.display()),
            )
        })?
    } else {
        files
    };
    if files.is_empty() {
        return Err(Failure::new(
            sluice::exit::EX_NOINPUT,
            format!("sluice audit {what}: no audit files"),
        ));
    }
    Ok(files)
}

fn audit(cmd: AuditCommand) -> Result<(), Failure> {
    match cmd {
        AuditCommand::Verify {
            files,
            from_first,
            state,
        } => {
            let files = audit_files("verify", files, &state)?;
            match sluice::audit::verify(&files, from_first) {
                Ok(n) => {
                    println!("ok: {n} lines in {} files, the chain holds", files.len());
                    Ok(())
                }
                Err(e) => Err(Failure::new(1, format!("sluice audit verify: {e}"))),
            }
        }
        AuditCommand::Search {
            files,
            since,
            until,
            identity,
            device,
            grant,
            session,
            event,
            state,
        } => {
            let filter = sluice::audit::Filter {
                since: since.as_deref().map(|v| when("--since", v)).transpose()?,
                until: until.as_deref().map(|v| when("--until", v)).transpose()?,
                identity,
                device,
                grant,
                session,
                events: event,
            };
            let files = audit_files("search", files, &state)?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let n = sluice::audit::search(&files, &filter, |l| {
                let _ = writeln!(out, "{l}");
            })
            .map_err(|e| {
                Failure::new(
                    sluice::exit::EX_NOINPUT,
                    format!("sluice audit search: {e}"),
                )
            })?;
            if n == 0 {
                return Err(Failure::new(1, "sluice audit search: no matching events"));
            }
            Ok(())
        }
    }
}

fn grant(cmd: GrantCommand) -> Result<(), Failure> {
    match cmd {
        GrantCommand::Issue(a) => {
            let socket = a.control.socket()?;
            let public_key = match &a.public_key {
                Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                    Failure::new(
                        sluice::exit::EX_NOINPUT,
                        format!("sluice grant issue: {}: {e}", p.display()),
                    )
                })?),
                None => None,
            };
            let mut body = serde_json::json!({ "device": a.device, "replace": a.replace, "permit_open": a.permit_open });
            let set = |body: &mut serde_json::Value, k: &str, v: Option<serde_json::Value>| {
                if let Some(v) = v {
                    body[k] = v;
                }
            };
            set(&mut body, "ttl", a.ttl.map(Into::into));
            set(&mut body, "public_key", public_key.map(Into::into));
            set(&mut body, "port", a.port.map(Into::into));
            set(&mut body, "name", a.name.map(Into::into));
            set(
                &mut body,
                "source_address",
                a.source_address.map(Into::into),
            );
            set(&mut body, "local", a.local.map(Into::into));
            let v = control(
                &socket,
                http::Method::POST,
                "/v1/grants",
                Some(body.to_string().into_bytes()),
            )?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
        GrantCommand::List {
            control: c,
            all,
            json,
        } => {
            let socket = c.socket()?;
            let uri = if all {
                "/v1/grants?all=true"
            } else {
                "/v1/grants"
            };
            let v = control(&socket, http::Method::GET, uri, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(());
            }
            let list: Vec<sluice::grant::GrantView> = serde_json::from_value(v["grants"].clone())
                .map_err(|e| {
                Failure::new(1, format!("sluice grant list: not a grant list: {e}"))
            })?;
            if list.is_empty() {
                println!("no {}grants", if all { "" } else { "live " });
                return Ok(());
            }
            println!(
                "{:<24} {:<20} {:<9} {:>6} {:<24} {:<21} FIRST USED",
                "GRANT", "DEVICE", "STATE", "PORT", "NAME", "EXPIRES"
            );
            for g in list {
                println!(
                    "{:<24} {:<20} {:<9} {:>6} {:<24} {:<21} {}",
                    g.id,
                    g.device,
                    g.state,
                    g.port,
                    g.name.as_deref().unwrap_or("-"),
                    g.expires,
                    g.first_used.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        GrantCommand::Revoke { control: c, id } => {
            if id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(Failure::new(
                    EX_USAGE,
                    format!("sluice grant revoke: `{id}` is not a grant id (g-...)"),
                ));
            }
            let socket = c.socket()?;
            let v = control(
                &socket,
                http::Method::DELETE,
                &format!("/v1/grants/{id}"),
                None,
            )?;
            println!(
                "revoked {id}; live sessions ended: {}",
                v["sessions_ended"].as_u64().unwrap_or(0)
            );
            Ok(())
        }
    }
}

fn sessions(a: SessionsArgs) -> Result<(), Failure> {
    if let Some(SessionsCommand::Kill { id, control: c }) = a.kill {
        let v = control(
            &c.socket()?,
            http::Method::DELETE,
            &format!("/v1/sessions/{id}"),
            None,
        )?;
        let s = &v["session"];
        println!(
            "ended session {id} (user {}, key {}, from {})",
            s["user"].as_str().unwrap_or("-"),
            s["key"].as_str().unwrap_or("-"),
            s["source"].as_str().unwrap_or("-")
        );
        return Ok(());
    }
    let v = control(
        &a.control.socket()?,
        http::Method::GET,
        "/v1/sessions",
        None,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let snap: sluice::sessions::Snapshot = serde_json::from_value(v)
        .map_err(|e| Failure::new(1, format!("sluice sessions: not a session list: {e}")))?;
    if snap.sessions.is_empty() {
        println!("no live SSH sessions");
    } else {
        println!(
            "{:>6} {:<16} {:<50} {:<22} {:<21} {:>12} {:>12}",
            "ID", "USER", "KEY", "SOURCE", "SINCE", "BYTES UP", "BYTES DOWN"
        );
    }
    for s in &snap.sessions {
        let i = &s.identity;
        println!(
            "{:>6} {:<16} {:<50} {:<22} {:<21} {:>12} {:>12}",
            s.id, i.user, i.key, s.source, s.since, s.bytes_up, s.bytes_down
        );
        if let Some(c) = &i.certificate {
            println!(
                "       certificate {} serial {} CA {}",
                c.key_id, c.serial, c.ca
            );
        }
        if let (Some(g), Some(d)) = (&i.grant, &i.device) {
            println!("       grant {g} device {d}");
        }
        for l in &s.listeners {
            println!("       listens {l}");
        }
        for t in &s.tunnels {
            println!(
                "       tunnel {}:{} visits {} bytes to publisher {} to visitors {}",
                t.name, t.port, t.visits, t.bytes_to_publisher, t.bytes_to_visitors
            );
        }
        for c in &s.channels {
            println!(
                "       channel {} {:?} {} since {} up {} down {}",
                c.id, c.kind, c.target, c.since, c.bytes_up, c.bytes_down
            );
        }
    }
    let other: Vec<String> = snap
        .connections
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    if !other.is_empty() {
        println!("open connections by route: {}", other.join(", "));
    }
    Ok(())
}

fn lock(a: LockArgs) -> Result<(), Failure> {
    let print = |l: &sluice::lock::LockView| {
        println!(
            "{:<20} {:<7} {:<50} {:<21} {:<21} {:<30} {}",
            l.id,
            l.kind,
            l.value,
            l.created,
            l.expires.as_deref().unwrap_or("until lifted"),
            l.by,
            l.reason
        );
    };
    match a.cmd {
        Some(LockCommand::List { control: c, json }) => {
            let v = control(&c.socket()?, http::Method::GET, "/v1/locks", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(());
            }
            let list: Vec<sluice::lock::LockView> = serde_json::from_value(v["locks"].clone())
                .map_err(|e| Failure::new(1, format!("sluice lock list: not a lock list: {e}")))?;
            if list.is_empty() {
                println!("no locks");
                return Ok(());
            }
            println!(
                "{:<20} {:<7} {:<50} {:<21} {:<21} {:<30} REASON",
                "LOCK", "KIND", "VALUE", "CREATED", "EXPIRES", "BY"
            );
            list.iter().for_each(print);
            Ok(())
        }
        Some(LockCommand::Lift { id, control: c }) => {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(Failure::new(
                    EX_USAGE,
                    format!("sluice lock lift: `{id}` is not a lock id (l-...)"),
                ));
            }
            control(
                &c.socket()?,
                http::Method::DELETE,
                &format!("/v1/locks/{id}"),
                None,
            )?;
            println!("lifted {id}");
            Ok(())
        }
        None => {
            let mut body = serde_json::json!({});
            for (k, v) in [
                ("key", a.key),
                ("grant", a.grant),
                ("device", a.device),
                ("source", a.source),
                ("ttl", a.ttl),
                ("reason", a.reason),
            ] {
                if let Some(v) = v {
                    body[k] = v.into();
                }
            }
            if ["key", "grant", "device", "source"]
                .iter()
                .all(|k| body.get(k).is_none())
            {
                return Err(Failure::new(
                    EX_USAGE,
                    "sluice lock: say what to lock: --key FP, --grant ID, --device ID or --source CIDR",
                ));
            }
            let v = control(
                &a.control.socket()?,
                http::Method::POST,
                "/v1/locks",
                Some(body.to_string().into_bytes()),
            )?;
            let l: sluice::lock::LockView = serde_json::from_value(v["lock"].clone())
                .map_err(|e| Failure::new(1, format!("sluice lock: not a lock: {e}")))?;
            println!(
                "locked {} {} as {}; live sessions ended: {}",
                l.kind,
                l.value,
                l.id,
                v["sessions_ended"].as_u64().unwrap_or(0)
            );
            Ok(())
        }
    }
}

fn serve(a: StateArgs) -> Result<(), Failure> {
    let cfg = load(a.config.as_deref())
        .map_err(|e| Failure::new(EX_CONFIG, format!("config error: {e}")).logged())?;
    let state_dir = sluice::state::resolve(a.state_dir.as_deref().or(cfg.state_dir.as_deref()));
    sluice::daemon::run(cfg, state_dir).map_err(|e| {
        let what = if e.exit_code() == EX_CONFIG {
            "config error: "
        } else {
            ""
        };
        Failure::new(e.exit_code(), format!("{what}{e}")).logged()
    })
}
