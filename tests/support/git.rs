//! Test support: git.
