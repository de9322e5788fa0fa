//! Why `sluice connect` failed, and the exit code each failure maps to.

/// Why the helper failed; each maps to a sysexits code.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// A file named in the arguments (a CA bundle) is unusable.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// TLS failed: verification or protocol.
    #[error("{0}")]
    Tls(String),
    /// Reading or writing the streams failed after connecting.
    #[error("{0}")]
    Io(String),
}
