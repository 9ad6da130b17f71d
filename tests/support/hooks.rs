//! Test support: hooks.
