//! gRPC served by healthgate itself: the `grpc.health.v1.Health` service on the admin port ([`health`]).

pub mod health;
