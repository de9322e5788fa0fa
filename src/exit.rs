//! Exit codes (sysexits.h) and the errors that know theirs, so `main` maps none by hand.

/// The command line was wrong.
pub const EX_USAGE: u8 = 64;
/// An input file could not be read.
pub const EX_NOINPUT: u8 = 66;
/// A service the command needs is not there (the server, the proxy).
pub const EX_UNAVAILABLE: u8 = 69;
/// sluice itself failed.
pub const EX_SOFTWARE: u8 = 70;
/// The operating system refused (a port, a thread, signal handlers).
pub const EX_OSERR: u8 = 71;
/// A file or directory could not be made.
pub const EX_CANTCREAT: u8 = 73;
/// Reading or writing failed.
pub const EX_IOERR: u8 = 74;
/// The peer spoke TLS wrongly or could not be verified.
pub const EX_PROTOCOL: u8 = 76;
/// Permission denied: a key or host key refused.
pub const EX_NOPERM: u8 = 77;
/// The configuration is wrong: a file, a key, a certificate (systemd does not restart on it
/// with `RestartPreventExitStatus=78`).
pub const EX_CONFIG: u8 = 78;

/// An error that ends a command, with the code the process exits with.
pub trait Exit: std::fmt::Display {
    /// The sysexits code.
    fn exit_code(&self) -> u8;
}

impl Exit for crate::config::ConfigError {
    fn exit_code(&self) -> u8 {
        EX_CONFIG
    }
}

impl Exit for crate::tls::TlsError {
    fn exit_code(&self) -> u8 {
        use crate::tls::TlsError;
        match self {
            TlsError::Config(_) | TlsError::SelfSigned { .. } => EX_CONFIG,
            TlsError::Rustls(_) => EX_SOFTWARE,
        }
    }
}

impl Exit for crate::ssh::SshError {
    fn exit_code(&self) -> u8 {
        use crate::ssh::SshError;
        match self {
            SshError::HostKey(_) | SshError::Config(_) => EX_CONFIG,
            SshError::SocketDir { .. } | SshError::Store(_) => EX_CANTCREAT,
        }
    }
}

impl Exit for crate::ssh::HostKeyError {
    fn exit_code(&self) -> u8 {
        EX_CONFIG
    }
}

impl Exit for crate::server::ServeError {
    fn exit_code(&self) -> u8 {
        use crate::server::ServeError;
        match self {
            ServeError::Tls(e) => e.exit_code(),
            ServeError::Ssh(e) => e.exit_code(),
            ServeError::Bind { .. } | ServeError::Runtime(_) | ServeError::Signals(_) => EX_OSERR,
            ServeError::Grants(crate::grant::GrantError::Store(
                crate::store::StoreError::Redis { .. },
            )) => EX_UNAVAILABLE,
            ServeError::Activation(_)
            | ServeError::Config(_)
            | ServeError::Grants(_)
            | ServeError::ControlTokens(_) => EX_CONFIG,
            ServeError::ControlTls(_) => EX_SOFTWARE,
            ServeError::Store(crate::store::StoreError::Redis { .. }) => EX_UNAVAILABLE,
            ServeError::Store(_) | ServeError::Audit { .. } => EX_CANTCREAT,
            ServeError::ControlSocket { .. } => EX_OSERR,
        }
    }
}

impl Exit for crate::client::ConnectError {
    fn exit_code(&self) -> u8 {
        use crate::client::ConnectError;
        match self {
            ConnectError::Usage(_) => EX_USAGE,
            ConnectError::Unavailable(_) => EX_UNAVAILABLE,
            ConnectError::Io(_) => EX_IOERR,
            ConnectError::Tls(_) => EX_PROTOCOL,
            ConnectError::Config(_) => EX_CONFIG,
        }
    }
}

impl Exit for crate::client::tunnel::TunnelError {
    fn exit_code(&self) -> u8 {
        use crate::client::tunnel::TunnelError;
        match self {
            TunnelError::Config(_) => EX_CONFIG,
            TunnelError::Bind { .. } => EX_OSERR,
            TunnelError::HostKey(_) | TunnelError::Auth(_) => EX_NOPERM,
            TunnelError::Tls(_) => EX_PROTOCOL,
            TunnelError::Forward(_) | TunnelError::Unavailable(_) => EX_UNAVAILABLE,
        }
    }
}
