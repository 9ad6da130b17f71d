//! Deciding, per fleet, what a commit needs: bake? reconcile? roll? Or nothing.
//!
//! OWNER: lead.
