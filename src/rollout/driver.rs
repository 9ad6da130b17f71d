//! The driver: runs one rollout to a terminal or paused state, persisting before each effect.
//!
//! OWNER: rollout helper.
