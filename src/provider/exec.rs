//! The exec provider: each operation is an executable in the repo speaking JSON on stdin/stdout.
//!
//! OWNER: provider helper.
