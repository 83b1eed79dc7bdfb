//! The integration tests of the `walcast` crate, in one test binary (one link
//! instead of one per file). Each module is one area; `support` holds the
//! helpers they share. Run one area with e.g.
//! `cargo test -p walcast --test it -- e2e:: --test-threads=1`.

mod support;

mod backends;
mod caching_proxy;
mod cli_args;
mod e2e;
mod examples;
mod handle;
mod hostile_http;
mod inspect;
mod lazy_read;
mod local_readonly;
mod long_poll;
mod messages;
mod metrics;
mod private_http;
mod publisher;
mod serve;
mod signed_cli;
mod soak;
mod tokens;
