//! Test kit for callbridge: the outside world, faked over real sockets, and the pieces
//! every cross-process test needs.
//!
//! Layout:
//! - [`redis_server`]: a throwaway `redis-server` (unix socket or loopback port), killed on drop.
//! - [`fake_realtime`]: a fake OpenAI Realtime server speaking the GA protocol.
//! - [`sim_caller`]: a simulated Twilio caller speaking Media Streams, signing like Twilio.
//! - [`procs`]: spawns the real `callbridge-control` / `callbridge-relay` binaries.

pub mod redis_server;
