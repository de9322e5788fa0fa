//! `sluice::client::tunnel` as a library: a `-L` forward kept up from Rust code, no OpenSSH.
//!
//! ```sh
//! cargo run --example tunnel -- tunnel@sluice.example.org:443 ~/.ssh/id_ed25519 \
//!     SHA256:... 127.0.0.1:8701:127.0.0.1:8701 [CA.pem]
//! ```
//!
//! The arguments: the server, a key file, the server's SSH host key fingerprint (`sluice
//! hostkey` prints it), the forward, and optionally a CA file for the server's certificate
//! (default: the system's CAs). It runs until Ctrl-C, reconnecting whenever the link drops.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use sluice::client::tunnel::{
    self, Backoff, Credentials, Forward, HostKeys, KeySource, Options, State, Transport,
};
use sluice::client::{ConnectOptions, Trust};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, key, host_key, forward, rest @ ..] = args.as_slice() else {
        return Err(
            "usage: tunnel USER@HOST[:PORT] KEY_FILE SHA256:HOSTKEY FORWARD [CA.pem]".into(),
        );
    };
    let (user, target) = server.split_once('@').ok_or("USER@HOST[:PORT]")?;
    let (host, port) = sluice::client::parse_target(target)?;
    let tls = ConnectOptions {
        host: host.clone(),
        port,
        sni: Some(host.clone()),
        alpn: vec![b"ssh".to_vec()],
        trust: rest
            .first()
            .map_or(Trust::System, |ca| Trust::CaFile(PathBuf::from(ca))),
        connect_timeout: Duration::from_secs(10),
        proxy: None,
        client_cert: None,
    };
    let opts = Options {
        host,
        port,
        transport: Transport::Tls(Box::new(tls)),
        user: user.to_string(),
        credentials: Credentials {
            keys: vec![tunnel::load_key(&KeySource::File(PathBuf::from(key)))?],
            agent: false,
        },
        host_keys: HostKeys::Pinned(vec![host_key.clone()]),
        forwards: vec![Forward::local(forward)?],
        keepalive: Duration::from_secs(30),
        backoff: Backoff::default(),
        connect_timeout: Duration::from_secs(15),
    };

    let stop = tokio_util::sync::CancellationToken::new();
    let on_ctrl_c = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_ctrl_c.cancel();
    });
    // The tunnel reports each state change; an application can show it or act on it.
    let (state_tx, mut state) = tokio::sync::watch::channel(State::Connecting { attempt: 0 });
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            eprintln!("tunnel: {:?}", *state.borrow_and_update());
        }
    });
    tunnel::run(opts, stop, state_tx).await?;
    Ok(())
}
