//! What [`Bus::health`](crate::Bus::health) reports: one look at what needs an operator.
//!
//! Ground rules: a leaf; plain data, read from the bus at one moment.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerState;
use crate::stats::Stall;

/// The bus at a glance, for an operator or a readiness probe: open circuit breakers, paused
/// subscriptions, deliveries running past their `stall_after`, lanes whose channels are full,
/// and bridge imports that lag. [`is_ready`](Self::is_ready) says whether nothing but pauses
/// (which someone chose) and import lag stands in the way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Health {
    /// Subscriptions whose circuit breaker is open or half-open.
    pub open_breakers: Vec<HandlerHealth>,
    /// Paused subscriptions.
    pub paused: Vec<HandlerHealth>,
    /// Deliveries running past their `stall_after` now.
    pub stalls: Vec<Stall>,
    /// Lanes with a full shard now, and what they shed so far.
    pub full_lanes: Vec<LaneHealth>,
    /// Bridge imports with entries not yet read or not yet settled.
    pub imports: Vec<ImportLag>,
}

/// A subscription that [`Health`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HandlerHealth {
    /// The subscribing service.
    pub service: String,
    /// The handler's name.
    pub handler: String,
    /// Its lane.
    pub lane: String,
    /// Its circuit breaker's state, if it has one.
    pub breaker: Option<BreakerState>,
    /// Whether it is paused.
    pub paused: bool,
    /// Its deliveries parked now.
    pub parked: u64,
}

/// A lane with a full shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LaneHealth {
    /// The lane.
    pub lane: String,
    /// `"block"` (publishers wait) or `"shed"` (deliveries are shed).
    pub backpressure: String,
    /// Its shards whose channel is full now.
    pub full_shards: usize,
    /// Of its shards in all.
    pub shards: usize,
    /// Deliveries it shed so far.
    pub shed: u64,
}

/// A bridge import behind its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ImportLag {
    /// The bridge's stream prefix.
    pub bridge: String,
    /// The stream.
    pub stream: String,
    /// Entries not yet read by the group (`None` when Redis cannot tell).
    pub lag: Option<u64>,
    /// Entries read and not yet settled (acknowledged).
    pub pending: u64,
}

impl Health {
    /// Whether nothing is stuck: no open breaker, no stall, no full lane.
    pub fn is_ready(&self) -> bool {
        self.open_breakers.is_empty() && self.stalls.is_empty() && self.full_lanes.is_empty()
    }
}

impl fmt::Display for Health {
    /// One line: `ready`, or what stands in the way, then what else there is to know.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for h in &self.open_breakers {
            let state = h.breaker.map_or("open", BreakerState::as_str);
            parts.push(format!(
                "breaker {state} for {} of {} ({} parked)",
                h.handler, h.service, h.parked
            ));
        }
        for s in &self.stalls {
            parts.push(format!(
                "{} of {} stalled on {} {} for {:?}",
                s.handler, s.service, s.event, s.event_id, s.running_for
            ));
        }
        for l in &self.full_lanes {
            parts.push(format!(
                "lane {} full ({} of {} shards, {}; {} shed)",
                l.lane, l.full_shards, l.shards, l.backpressure, l.shed
            ));
        }
        let mut notes = Vec::new();
        for h in &self.paused {
            notes.push(format!(
                "{} of {} paused ({} parked)",
                h.handler, h.service, h.parked
            ));
        }
        for i in &self.imports {
            let lag = i.lag.map_or_else(|| "?".to_owned(), |n| n.to_string());
            notes.push(format!(
                "import {} of {}: {lag} unread, {} pending",
                i.stream, i.bridge, i.pending
            ));
        }
        match parts.is_empty() {
            true => f.write_str("ready")?,
            false => write!(f, "not ready: {}", parts.join("; "))?,
        }
        if !notes.is_empty() {
            write!(f, " ({})", notes.join("; "))?;
        }
        Ok(())
    }
}
