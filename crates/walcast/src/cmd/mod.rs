//! The `walcast` binary's commands (main.rs parses the command line and
//! runs one): their flags in `args`, the longer commands each in a file.

pub(crate) mod args;
pub(crate) mod publish;
pub(crate) mod read;
pub(crate) mod write;

/// Resolves at Ctrl-C: what stops a long-running command.
pub(crate) async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}
