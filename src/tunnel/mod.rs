//! Tunnels by name: a machine that can only dial out publishes `NAME:PORT` over its SSH
//! session (`ssh -R NAME:PORT:...`) and visitors reach it by name. This module owns the names
//! (pure rules in `name`) and the live registry (`registry`); the SSH server registers and
//! opens channels, `ssh::permit` decides which names a key may publish.

pub mod access;
pub(crate) mod http;
pub mod name;
mod registry;

pub use registry::LiveTunnel;
pub(crate) use registry::{Published, Refused, Registry, Traffic, Via};
