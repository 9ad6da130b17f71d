//! The rollout engine: a persisted state machine. `step` decides (pure), `driver` performs one
//! side effect at a time, writing the intent before and the result after.

pub mod capacity;
pub mod driver;
pub mod state;
pub mod step;
