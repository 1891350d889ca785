//! gRPC served by healthgate itself: the `grpc.health.v1.Health` service on
//! the admin port ([`health`]), and on the data plane the answers healthgate
//! gives a gRPC call itself (a short-circuit while a dependency is missing,
//! an upstream failure) as gRPC statuses rather than HTTP errors
//! ([`status`]); [`proto`] is a minimal protobuf writer for the messages
//! those answers carry.

pub mod health;
pub mod proto;
pub mod status;
