//! The admin state as the facts of the gRPC health service: the same
//! answers as `/readyz`, `/livez`, `/startupz` and each dependency's
//! effective verdict in `/status`.

use crate::grpc::health::{Facts, Source};
use crate::state::DepHealth;

use super::Admin;

impl Facts for Admin {
    fn ready(&self) -> bool {
        Admin::ready(self, self.health.service_state().0)
    }

    fn live(&self) -> bool {
        self.heartbeats.stalled(self.live.load().config.liveness_stall).is_empty()
    }

    fn started(&self) -> bool {
        self.health.first_round_done()
    }

    fn dependency(&self, name: &str) -> Option<DepHealth> {
        let bit = self.health.deps().iter().find(|d| d.name == name)?.bit;
        Some(self.health.effective(bit))
    }
}

impl Source for Admin {
    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.health.subscribe_changes()
    }
}
