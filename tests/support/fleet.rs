//! Test support: fleet.
