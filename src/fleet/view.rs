//! The read-only view one instance serves its peers on `GET /fleet/view`:
//! its id and, per dependency, the checked verdict and since when. Nothing
//! else: no host, no cause message, no secret, no operator override.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::policy::PeerState;
use crate::state::{DepHealth, Health};

/// One instance's view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct View {
    /// The instance id (`fleet.instance_id`).
    pub instance: String,
    /// Each dependency, in config order.
    pub dependencies: Vec<ViewDep>,
}

/// One dependency in a view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewDep {
    /// Dependency name (matched by name across peers).
    pub name: String,
    /// The verdict of this instance's own checks (overrides are not shown:
    /// an operator's decision about one pod says nothing about the dependency).
    pub state: PeerState,
    /// When that verdict began (RFC 3339).
    pub since: String,
}

/// The checked verdict as a peer state.
pub fn peer_state(h: DepHealth) -> PeerState {
    match h {
        DepHealth::Unknown => PeerState::Unknown,
        DepHealth::Up => PeerState::Up,
        DepHealth::Down => PeerState::Down,
    }
}

/// This instance's view now.
pub fn view(instance: &str, health: &Health) -> View {
    View {
        instance: instance.to_string(),
        dependencies: health
            .deps()
            .iter()
            .map(|d| {
                let s = d.status();
                ViewDep { name: d.name.clone(), state: peer_state(s.state), since: rfc3339(s.since) }
            })
            .collect(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::state::DepStatus;
    use std::path::Path;

    #[test]
    fn the_view_names_verdicts_only_never_hosts_or_messages() {
        let yaml = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\ndependencies:\n  - name: db\n    type: tcp\n    address: secret-host.internal:3306\n";
        let h = Health::new(&Config::from_yaml(yaml, Path::new("t")).unwrap());
        h.publish(
            0,
            DepStatus {
                state: DepHealth::Down,
                last_message: Some("connect to secret-host.internal:3306 refused".into()),
                ..DepStatus::unknown()
            },
        );
        let json = serde_json::to_string(&view("pod-a", &h)).unwrap();
        assert!(json.contains(r#""instance":"pod-a""#), "{json}");
        assert!(json.contains(r#""name":"db","state":"down""#), "{json}");
        assert!(!json.contains("secret-host") && !json.contains("refused"), "{json}");
    }
}
