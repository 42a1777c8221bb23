//! The control plane's domain, free of gRPC and storage: what a call is ([`record`]) and
//! the rules of its life ([`call`]). The services and the stores import it; it imports
//! neither.

pub mod call;
pub mod record;
