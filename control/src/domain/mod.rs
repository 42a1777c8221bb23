//! The control plane's domain, free of gRPC and storage: the ids a call is made of
//! ([`ids`]), what a call is ([`record`]), the rules of its life ([`call`]) and of
//! Twilio's view of it ([`twilio`]), and campaigns ([`campaign`], with their [`calling_window`]). The services and the stores import it; it imports
//! neither.

pub mod call;
pub mod calling_window;
pub mod campaign;
pub mod ids;
pub mod record;
pub mod twilio;
