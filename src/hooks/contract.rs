//! The hook ABI: environment variable names and exit codes (documented in the README).

/// Exit code meaning "transient, retry me" (sysexits EX_TEMPFAIL).
pub const EXIT_TRANSIENT: i32 = 75;
