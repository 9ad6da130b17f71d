//! The pure transition function: `step(&Rollout, &Policy, &Observed, now) -> Next`.
//!
//! OWNER: rollout helper.
