//! `refetch`: drop and re-open the agent's Workload API streams.
//!
//! A reconnect returns the agent's current state at once; if the agent has
//! rotated without us seeing it (a stuck stream), we see the new serial. It
//! cannot make the agent mint a new SVID; the verification decides.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;

use super::{Actuator, ActuatorError};
use crate::model::{Outcome, Step};
use crate::sensors::workload_api::Shared;

/// The built-in refetch actuator.
pub struct RefetchActuator {
    streams: HashMap<String, Arc<Shared>>,
}

impl RefetchActuator {
    /// Over the sensors' shared handles, by agent name.
    pub fn new(streams: HashMap<String, Arc<Shared>>) -> Self {
        Self { streams }
    }
}

#[async_trait]
impl Actuator for RefetchActuator {
    fn name(&self) -> &'static str {
        "refetch"
    }

    fn class(&self) -> super::Class {
        super::Class::Gentle
    }

    /// Only agents have streams to re-open: for a peer or a certificate
    /// file the rung does not apply and the ladder moves on.
    fn prepare(&self, step: &mut Step, _obs: &crate::model::Observations) -> super::Prepared {
        if self.streams.contains_key(&step.target) {
            super::Prepared::Ready
        } else {
            super::Prepared::Skip("not_an_agent")
        }
    }

    async fn execute(&self, step: &Step) -> Result<Outcome, ActuatorError> {
        let shared = self
            .streams
            .get(&step.target)
            .ok_or_else(|| ActuatorError::UnknownTarget(step.target.clone()))?;
        if shared.request_reconnect(step.timeout).await {
            Ok(Outcome::ok(json!({ "reconnects": shared.reconnects() })))
        } else {
            Err(ActuatorError::Timeout(step.timeout))
        }
    }
}
