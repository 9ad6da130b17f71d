//! kiln's own load balancer process (`kiln lb`): an HTTP reverse proxy on hyper with an admin
//! endpoint to attach, detach and drain backends.
//!
//! OWNER: provider helper.
