//! Test support: daemon.
