//! `sluice serve` as a process: its runtime, signals (SIGHUP reloads, SIGTERM/SIGINT drain,
//! a second one closes everything), systemd notifications, and what it says at start.

use std::path::PathBuf;

use tracing::info;

use crate::config::Config;
use crate::server::{ServeError, Server};

/// Serves `cfg` until a shutdown signal and the drain that follows. Blocks the calling thread.
pub fn run(cfg: Config, state_dir: PathBuf) -> Result<(), ServeError> {
    // Connections run on their own per-core threads (see server::accept); this runtime only
    // carries signals, reloads, the admin endpoint and watchers.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(async move {
        // Handlers first: a signal that arrives while certificates load must not kill sluice.
        use tokio::signal::unix::{signal, SignalKind};
        let (hup, term, int) = (|| -> std::io::Result<_> {
            Ok((
                signal(SignalKind::hangup())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })()
        .map_err(ServeError::Signals)?;
        let server = Server::bind(cfg.clone(), state_dir).await?;
        announce(&server, &cfg);
        // READY before anything can say RELOADING (a SIGHUP may already be queued).
        crate::systemd::ready();
        crate::systemd::status("serving");
        crate::systemd::spawn_watchdog(server.liveness());
        reload_on_sighup(server.reloader(), server.readiness(), hup);
        let shutdown = shutdown_signal(server.force_close_token(), term, int);
        server.run(shutdown).await;
        Ok(())
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
    if cfg.source.is_none() {
        for k in &cfg.embedded_ssh.authorized_keys {
            info!(file = %k.path.display(), "no config file: admitting your own authorized_keys (a config file admits only the keys it names)");
        }
    }
    if let Some(t) = &cfg.tunnels {
        info!(domain = %t.domain, "tunnels: ssh -R NAME:80:HOST:PORT publishes https://NAME.{}/", t.domain);
    }
    if let Some(ssh) = server.ssh() {
        info!(fingerprint = %ssh.host_fingerprint(), "embedded SSH server host key");
    }
    // kTLS would let the kernel encrypt and splice TLS legs; sluice does TLS in user space today.
    match crate::sys::ktls_probe() {
        Ok(()) => info!("kTLS: offered by this kernel (not used yet: TLS runs in user space)"),
        Err(e) => info!("kTLS: not offered by this kernel ({e}); TLS runs in user space"),
    }
    let certs = server.certs().current();
    info!(sha256 = %certs.fingerprint, "TLS certificate fingerprint");
    if certs.self_signed {
        let cert = server.state_dir().join(crate::tls::SELF_SIGNED_CERT);
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
            if let Some(t) = &cfg.tunnels {
                info!(
                    "publish a local web server on port 3000: ssh -N -R myapp:80:localhost:3000 -o ProxyCommand='{} connect --ca {} %h:%p' -p {port} tunnel@{host} ; then: curl --cacert {} https://myapp.{}:{port}/",
                    std::env::current_exe().map_or_else(|_| "sluice".into(), |p| p.display().to_string()),
                    cert.display(),
                    cert.display(),
                    t.domain
                );
            }
        }
    }
}

/// SIGHUP re-reads the config file, the certificates and the authorized keys; a reload that
/// fails anywhere changes nothing. systemd hears RELOADING=1 then READY=1 either way.
fn reload_on_sighup(
    reloader: crate::server::Reloader,
    readiness: crate::admin::Readiness,
    mut hup: tokio::signal::unix::Signal,
) {
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if !readiness.is_ready() {
                info!("SIGHUP ignored: shutting down");
                continue;
            }
            crate::systemd::reloading();
            match reloader.reload().await {
                Ok(summary) => {
                    info!("SIGHUP: reloaded: {summary}");
                    crate::systemd::status("serving; last reload succeeded");
                }
                Err(e) => {
                    tracing::warn!(
                        "SIGHUP: reload refused, the running configuration stays in force: {e}"
                    );
                    crate::systemd::status("serving; last reload FAILED, see the log");
                }
            }
            crate::systemd::ready();
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
        crate::systemd::stopping();
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
