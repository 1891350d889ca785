//! gRPC on the data plane: recognising a gRPC call, and the answers
//! healthgate gives one itself (a short-circuit while a dependency is
//! missing, an upstream failure) as gRPC statuses rather than HTTP errors.
//! `proto` is a minimal protobuf writer for the messages those answers carry.

pub mod proto;
pub mod status;
