//! Why the server could not start.

use std::io;
use std::net::SocketAddr;

use crate::tls::TlsError;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Certificates or TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The embedded SSH server could not start.
    #[error(transparent)]
    Ssh(#[from] crate::ssh::SshError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The runtime could not start (threads, an epoll instance).
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
    /// Sockets passed by systemd are unusable.
    #[error(transparent)]
    Activation(#[from] crate::systemd::ActivationError),
    /// A file the config names is unusable (an htpasswd file of a private tunnel).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// `[grants]`: the CA key or the store is unusable.
    #[error(transparent)]
    Grants(crate::grant::GrantError),
    /// The control API's unix socket could not be bound.
    #[error("{}: cannot listen on the control socket: {source}", path.display())]
    ControlSocket {
        /// The socket's path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The store (`sluice.db`, or Redis) could not be opened.
    #[error(transparent)]
    Store(crate::store::StoreError),
    /// The audit trail could not be opened.
    #[error("[audit]: {}: {source}", dir.display())]
    Audit {
        /// Its directory.
        dir: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `[control] tokens` could not be used.
    #[error("[control] tokens: {0}")]
    ControlTokens(#[from] crate::control::tokens::TokensError),
    /// The control API's TLS config could not be built.
    #[error("[control] listen: {0}")]
    ControlTls(rustls::Error),
}
