//! `walcast serve`: HTTP for a `file://` dataset.
