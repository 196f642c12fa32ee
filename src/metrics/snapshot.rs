//! What [`Bus::metrics`](crate::Bus::metrics) returns, and two of its three renderings: serde
//! (JSON) and Prometheus text exposition (the aligned table is in `table`).

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerState;
use crate::stats::{BusStats, Stall};

/// A latency distribution, summarised from an HdrHistogram (two significant digits: each
/// percentile is within 1% of the true value). All times are in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Latency {
    /// How many values were recorded (sampled deliveries).
    pub count: u64,
    /// The exact sum of the recorded values.
    pub sum_ns: u64,
    /// The smallest value.
    pub min_ns: u64,
    /// The median.
    pub p50_ns: u64,
    /// The 90th percentile.
    pub p90_ns: u64,
    /// The 99th percentile.
    pub p99_ns: u64,
    /// The 99.9th percentile.
    pub p999_ns: u64,
    /// The largest value (values above 2^36 ns, about 68.7 s, are recorded as that).
    pub max_ns: u64,
}

impl Latency {
    /// The quantiles Prometheus exposition shows, with their values.
    fn quantiles(&self) -> [(&'static str, u64); 4] {
        [
            ("0.5", self.p50_ns),
            ("0.9", self.p90_ns),
            ("0.99", self.p99_ns),
            ("0.999", self.p999_ns),
        ]
    }
}

/// Counters of one event type from one source service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventCounts {
    /// The event's [`Event::NAME`](crate::Event::NAME).
    pub event: String,
    /// The service that published it.
    pub source: String,
    /// Events accepted by a publish (those that matched no subscription included); events
    /// handed back to their publisher are not counted.
    pub published: u64,
    /// Of those, how many matched no subscription.
    pub unmatched: u64,
}

/// Counters and latencies of one subscription (a handler of one service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HandlerMetrics {
    /// The subscription's id.
    pub id: u64,
    /// The subscribing service.
    pub service: String,
    /// The handler's name.
    pub handler: String,
    /// The event type it handles.
    pub event: String,
    /// Whether it is still subscribed.
    pub active: bool,
    /// Deliveries handed to the handler (first attempts, redrives included).
    pub delivered: u64,
    /// Deliveries whose handler returned `Ok` (on any attempt).
    pub succeeded: u64,
    /// Failed attempts: errors and panics.
    pub failed: u64,
    /// Of the failed attempts, how many were panics.
    pub panicked: u64,
    /// Failed attempts scheduled to be tried again.
    pub retried: u64,
    /// Deliveries that ended in the dead-letter ring.
    pub dead_lettered: u64,
    /// Deliveries cancelled because the subscription ended before they ran.
    pub cancelled: u64,
    /// Deliveries whose failure said to drop the event (see
    /// [`BusStats::dropped`](crate::BusStats::dropped)).
    #[serde(default)]
    pub dropped: u64,
    /// Whether it is paused ([`Subscription::pause`](crate::Subscription::pause)).
    #[serde(default)]
    pub paused: bool,
    /// Its deliveries parked now, waiting for it to be resumed or its breaker to close.
    #[serde(default)]
    pub parked: u64,
    /// Where its circuit breaker is, if it has one.
    #[serde(default)]
    pub breaker: Option<BreakerState>,
    /// How many times its circuit breaker opened.
    #[serde(default)]
    pub breaker_opened: u64,
    /// Whether it is ordered ([`SubscribeOptions::ordered`](crate::SubscribeOptions::ordered)).
    #[serde(default)]
    pub ordered: bool,
    /// Its keys that dead letters hold now (their waiting deliveries are in `parked`).
    #[serde(default)]
    pub held_keys: u64,
    /// From publish to the start of the first attempt.
    pub queue_wait: Latency,
    /// How long the handler ran, every attempt.
    pub handler_time: Latency,
    /// From publish to the attempt that succeeded, retries included.
    pub end_to_end: Latency,
}

/// The latencies of one event type: its handlers' distributions merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventLatency {
    /// The event's [`Event::NAME`](crate::Event::NAME).
    pub event: String,
    /// From publish to the start of the first attempt, over all its handlers.
    pub queue_wait: Latency,
    /// How long its handlers ran.
    pub handler_time: Latency,
    /// From publish to success, over all its handlers.
    pub end_to_end: Latency,
}

/// A point-in-time view of the bus's metrics: counters per event type and source service, per
/// handler, and per shard; latency distributions per handler and per event type.
///
/// Counters are exact. Latencies are recorded for one delivery in
/// [`sample_every`](Self::sample_every); multiply a latency `count` by it to estimate the
/// deliveries it stands for. With metrics off ([`BusBuilder::metrics`](crate::BusBuilder::metrics)),
/// [`enabled`](Self::enabled) is `false` and only the bus-wide [`stats`](Self::stats), the
/// queue depths and the dead-letter figures are filled in.
///
/// It serializes with serde, prints as an aligned table (`Display`), and renders as Prometheus
/// text exposition ([`to_prometheus`](Self::to_prometheus)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Whether metrics were recorded.
    pub enabled: bool,
    /// Latency is recorded for one delivery in this many (1: every delivery).
    pub sample_every: u32,
    /// The bus-wide ledger, as [`Bus::stats`](crate::Bus::stats) returns it.
    pub stats: BusStats,
    /// Per event type and source service, sorted by event then source.
    pub events: Vec<EventCounts>,
    /// Per subscription, in subscription order (ended ones included).
    pub handlers: Vec<HandlerMetrics>,
    /// Per event type, sorted by name.
    pub event_latency: Vec<EventLatency>,
    /// Events waiting in each shard (its channel and its worker's spill queue), by shard.
    pub queue_depth: Vec<u64>,
    /// Retries and delayed events waiting on the timer.
    pub timer_pending: u64,
    /// Dead letters held in the ring now.
    pub dead_letters_held: u64,
    /// Workers whose latest latencies could not be collected because a handler kept them busy
    /// past the collection wait; their earlier latencies are included.
    pub workers_behind: Vec<usize>,
    /// The counters of each Redis bridge on the bus (cargo feature `redis`).
    #[serde(default)]
    pub bridges: Vec<BridgeCounters>,
    /// Each lane, the default one first.
    #[serde(default)]
    pub lanes: Vec<LaneMetrics>,
    /// Deliveries running past their `stall_after` now (see
    /// [`BusBuilder::stall_after`](crate::BusBuilder::stall_after)), with how long each has
    /// run.
    #[serde(default)]
    pub stalls: Vec<Stall>,
}

/// One lane's workers, queues and overload (see [`Lane`](crate::Lane)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LaneMetrics {
    /// Its name.
    pub name: String,
    /// Its worker threads (shards).
    pub workers: usize,
    /// `"block"` or `"shed"`: what it does when a shard is full.
    pub backpressure: String,
    /// Events waiting in its shards' channels.
    pub queue_depth: u64,
    /// Events waiting in its workers' overflow (spill) queues.
    pub overflow_depth: u64,
    /// Its workers busy with a delivery or a callback now.
    pub busy_workers: u64,
    /// Deliveries it shed because a shard was full (dead-lettered with reason `Shed`, or
    /// discarded with dead letters off).
    pub shed: u64,
    /// How long publishers waited for room in its shards, in total, in nanoseconds.
    pub publisher_wait_nanos: u64,
}

/// The counters of one bridge to Redis Streams.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BridgeCounters {
    /// The bridge's stream key prefix.
    pub prefix: String,
    /// Events written to their stream.
    pub exported: u64,
    /// Stream entries published into the bus.
    pub imported: u64,
    /// Entries acknowledged once every local delivery settled.
    pub acked: u64,
    /// Entries taken over from consumers that left them pending.
    pub claimed: u64,
    /// Redelivered entries dropped because their event id was seen already.
    pub duplicates: u64,
    /// Entries that did not decode.
    pub decode_failures: u64,
    /// Connections made again after one was lost.
    pub reconnects: u64,
    /// Consumer groups created again after they disappeared (the stream was deleted, or a
    /// Redis without persistence restarted) while an import read them.
    pub group_recreations: u64,
    /// Entries an import dead-lettered and wrote to the dead-letter stream.
    pub dead_stream_writes: u64,
    /// Entries put back from a dead-letter stream onto their stream.
    pub dead_stream_redriven: u64,
    /// Renewals of an import's lease on its consumer name that found it taken (the process
    /// was paused longer than the lease, and another took the name).
    pub lease_lost: u64,
    /// Consumers of a group removed because they had been idle long, with nothing pending.
    pub consumers_removed: u64,
    /// Reads (`XREADGROUP`) that failed, by kind: the server's error code (`NOGROUP`, …), or
    /// `io` for a lost or silent connection.
    pub read_errors: std::collections::BTreeMap<String, u64>,
    /// Each import's view of its consumer group, as last observed (about once a second).
    pub imports: Vec<ImportStatus>,
}

/// How an import's consumer group stands, as the import last observed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ImportStatus {
    /// The stream's key.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// The import's consumer name.
    pub consumer: String,
    /// Entries in the stream not yet delivered to the group (`None` when Redis cannot tell,
    /// as after entries were deleted or trimmed past the group).
    pub lag: Option<u64>,
    /// Entries delivered to the group's consumers and not acknowledged yet.
    pub pending: u64,
    /// How long the oldest pending entry has waited since it was last delivered, in
    /// milliseconds (0 when none is pending).
    pub oldest_pending_idle_ms: u64,
    /// Entries trimmed from the stream (`MAXLEN`, `MINID`) before the group read them: lost to
    /// trimming, never delivered. Exact as of the last time the group had read up to the
    /// stream's last entry.
    pub trimmed_unread: u64,
}

impl BridgeCounters {
    /// The counters with their metric names and help texts, in one list for every rendering
    /// (`read_errors` aside: it is labelled by kind).
    pub(crate) fn fields(&self) -> [(&'static str, &'static str, u64); 12] {
        [
            (
                "exported",
                "Events written to Redis streams.",
                self.exported,
            ),
            (
                "imported",
                "Stream entries published into the bus.",
                self.imported,
            ),
            ("acked", "Stream entries acknowledged.", self.acked),
            (
                "claimed",
                "Stream entries taken over from other consumers.",
                self.claimed,
            ),
            (
                "duplicates",
                "Redelivered entries dropped as duplicates.",
                self.duplicates,
            ),
            (
                "decode_failures",
                "Stream entries that did not decode.",
                self.decode_failures,
            ),
            (
                "reconnects",
                "Connections to Redis made again.",
                self.reconnects,
            ),
            (
                "group_recreations",
                "Consumer groups created again after they disappeared.",
                self.group_recreations,
            ),
            (
                "dead_stream_writes",
                "Dead-lettered entries written to a dead-letter stream.",
                self.dead_stream_writes,
            ),
            (
                "dead_stream_redriven",
                "Entries put back from a dead-letter stream onto their stream.",
                self.dead_stream_redriven,
            ),
            (
                "lease_lost",
                "Lease renewals that found the consumer name taken.",
                self.lease_lost,
            ),
            (
                "consumers_removed",
                "Idle consumers with nothing pending removed from their group.",
                self.consumers_removed,
            ),
        ]
    }
}

impl MetricsSnapshot {
    /// The handler named `handler` of service `service`, if any (the first, if it subscribed
    /// more than once).
    pub fn handler(&self, service: &str, handler: &str) -> Option<&HandlerMetrics> {
        self.handlers
            .iter()
            .find(|h| h.service == service && h.handler == handler)
    }

    /// The counters of event type `event` from service `source`, if any was published.
    pub fn event(&self, event: &str, source: &str) -> Option<&EventCounts> {
        self.events
            .iter()
            .find(|e| e.event == event && e.source == source)
    }

    /// The snapshot as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a metrics snapshot serializes")
    }

    /// The snapshot in the Prometheus text exposition format (version 0.0.4).
    ///
    /// Counters are named `microbus_*_total`, with `event` and `service` labels (the source
    /// service for events, the subscribing one for handlers) and a `handler` label; latencies
    /// are summaries in seconds with `quantile` labels 0.5, 0.9, 0.99 and 0.999, and `_sum` and
    /// `_count` series.
    pub fn to_prometheus(&self) -> String {
        let mut out = Prometheus::default();
        out.gauge(
            "microbus_metrics_sample_every",
            "Latency is recorded for one delivery in this many.",
            &[],
            u64::from(self.sample_every),
        );
        let s = &self.stats;
        for term in s.terms() {
            if term.name == "in_flight" {
                out.gauge("microbus_in_flight", term.help, &[], term.value);
            } else {
                let name = format!("microbus_bus_{}_total", term.name);
                out.counter(&name, term.help, &[], term.value);
            }
        }
        for (seam, value) in s.callback_panics.fields() {
            out.counter(
                "microbus_callback_panics_total",
                "Panics caught in user code outside handlers, by seam.",
                &[("seam", seam)],
                value,
            );
        }
        for (shard, depth) in self.queue_depth.iter().enumerate() {
            out.gauge(
                "microbus_queue_depth",
                "Events waiting in a shard.",
                &[("shard", &shard.to_string())],
                *depth,
            );
        }
        for lane in &self.lanes {
            let labels = [("lane", lane.name.as_str())];
            out.gauge(
                "microbus_lane_queue_depth",
                "Events waiting in a lane's channels.",
                &labels,
                lane.queue_depth,
            );
            out.gauge(
                "microbus_lane_overflow_depth",
                "Events waiting in a lane's workers' overflow queues.",
                &labels,
                lane.overflow_depth,
            );
            out.gauge(
                "microbus_lane_busy_workers",
                "A lane's workers busy now.",
                &labels,
                lane.busy_workers,
            );
            out.counter(
                "microbus_lane_shed_total",
                "Deliveries a lane shed because a shard was full.",
                &labels,
                lane.shed,
            );
            out.counter(
                "microbus_lane_publisher_wait_nanoseconds_total",
                "Time publishers waited for room in a lane.",
                &labels,
                lane.publisher_wait_nanos,
            );
        }
        out.gauge(
            "microbus_stalled_deliveries",
            "Deliveries running past their stall_after now.",
            &[],
            self.stalls.len() as u64,
        );
        out.gauge(
            "microbus_timer_pending",
            "Retries and delayed events waiting on the timer.",
            &[],
            self.timer_pending,
        );
        out.gauge(
            "microbus_dead_letters",
            "Dead letters held in the ring.",
            &[],
            self.dead_letters_held,
        );
        for e in &self.events {
            let labels = [("event", e.event.as_str()), ("service", e.source.as_str())];
            out.counter(
                "microbus_events_published_total",
                "Events published, by event type and source service.",
                &labels,
                e.published,
            );
            out.counter(
                "microbus_events_unmatched_total",
                "Events published that matched no subscription.",
                &labels,
                e.unmatched,
            );
        }
        for h in &self.handlers {
            let labels = [
                ("service", h.service.as_str()),
                ("event", h.event.as_str()),
                ("handler", h.handler.as_str()),
            ];
            for (name, help, value) in [
                (
                    "delivered",
                    "Deliveries handed to the handler.",
                    h.delivered,
                ),
                (
                    "succeeded",
                    "Deliveries the handler completed.",
                    h.succeeded,
                ),
                ("failed", "Failed attempts.", h.failed),
                ("panicked", "Failed attempts that panicked.", h.panicked),
                ("retried", "Failed attempts tried again.", h.retried),
                (
                    "dead_lettered",
                    "Deliveries dead-lettered.",
                    h.dead_lettered,
                ),
                (
                    "cancelled",
                    "Deliveries cancelled by the unsubscribe.",
                    h.cancelled,
                ),
                (
                    "dropped",
                    "Deliveries dropped on their failure's word.",
                    h.dropped,
                ),
            ] {
                out.counter(
                    &format!("microbus_handler_{name}_total"),
                    help,
                    &labels,
                    value,
                );
            }
            out.gauge(
                "microbus_handler_parked",
                "Deliveries parked, waiting for the handler to be resumed.",
                &labels,
                h.parked,
            );
            out.gauge(
                "microbus_handler_paused",
                "1 while the handler is paused.",
                &labels,
                u64::from(h.paused),
            );
            if h.ordered {
                out.gauge(
                    "microbus_handler_held_keys",
                    "Keys of an ordered handler that dead letters hold.",
                    &labels,
                    h.held_keys,
                );
            }
            if let Some(state) = h.breaker {
                out.gauge(
                    "microbus_handler_breaker_state",
                    "The handler's circuit breaker: 0 closed, 1 open, 2 half-open.",
                    &labels,
                    match state {
                        BreakerState::Closed => 0,
                        BreakerState::Open => 1,
                        BreakerState::HalfOpen => 2,
                    },
                );
                out.counter(
                    "microbus_handler_breaker_opened_total",
                    "Times the handler's circuit breaker opened.",
                    &labels,
                    h.breaker_opened,
                );
            }
            out.latencies(
                "microbus_handler",
                &labels,
                h.queue_wait,
                h.handler_time,
                h.end_to_end,
            );
        }
        for e in &self.event_latency {
            let labels = [("event", e.event.as_str())];
            out.latencies(
                "microbus_event",
                &labels,
                e.queue_wait,
                e.handler_time,
                e.end_to_end,
            );
        }
        for b in &self.bridges {
            let labels = [("prefix", b.prefix.as_str())];
            for (name, help, value) in b.fields() {
                out.counter(
                    &format!("microbus_bridge_{name}_total"),
                    help,
                    &labels,
                    value,
                );
            }
            for i in &b.imports {
                let labels = [
                    ("prefix", b.prefix.as_str()),
                    ("stream", i.stream.as_str()),
                    ("group", i.group.as_str()),
                ];
                if let Some(lag) = i.lag {
                    out.gauge(
                        "microbus_bridge_import_lag",
                        "Stream entries not yet delivered to the import's group.",
                        &labels,
                        lag,
                    );
                }
                out.gauge(
                    "microbus_bridge_import_pending",
                    "Stream entries delivered to the import's group and not acknowledged.",
                    &labels,
                    i.pending,
                );
                out.counter(
                    "microbus_bridge_import_trimmed_unread_total",
                    "Stream entries trimmed before the import's group read them.",
                    &labels,
                    i.trimmed_unread,
                );
                out.gauge(
                    "microbus_bridge_import_oldest_pending_idle_milliseconds",
                    "How long the oldest pending entry has waited since it was delivered.",
                    &labels,
                    i.oldest_pending_idle_ms,
                );
            }
            for (kind, value) in &b.read_errors {
                out.counter(
                    "microbus_bridge_read_errors_total",
                    "Stream reads that failed, by kind.",
                    &[("prefix", b.prefix.as_str()), ("kind", kind.as_str())],
                    *value,
                );
            }
        }
        out.text
    }
}

/// Writes Prometheus text exposition, one `# HELP`/`# TYPE` pair per metric name.
#[derive(Default)]
struct Prometheus {
    text: String,
    described: std::collections::HashSet<String>,
}

impl Prometheus {
    fn describe(&mut self, name: &str, help: &str, kind: &str) {
        if self.described.insert(name.to_owned()) {
            let _ = writeln!(self.text, "# HELP {name} {help}");
            let _ = writeln!(self.text, "# TYPE {name} {kind}");
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"");
                for c in value.chars() {
                    match c {
                        '\\' => self.text.push_str("\\\\"),
                        '"' => self.text.push_str("\\\""),
                        '\n' => self.text.push_str("\\n"),
                        c => self.text.push(c),
                    }
                }
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        self.describe(name, help, "counter");
        self.sample(name, labels, value);
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        self.describe(name, help, "gauge");
        self.sample(name, labels, value);
    }

    fn summary(&mut self, name: &str, help: &str, labels: &[(&str, &str)], latency: Latency) {
        self.describe(name, help, "summary");
        for (quantile, value) in latency.quantiles() {
            let mut with_quantile = labels.to_vec();
            with_quantile.push(("quantile", quantile));
            self.sample(name, &with_quantile, Seconds(value));
        }
        self.sample(&format!("{name}_sum"), labels, Seconds(latency.sum_ns));
        self.sample(&format!("{name}_count"), labels, latency.count);
    }

    fn latencies(
        &mut self,
        prefix: &str,
        labels: &[(&str, &str)],
        queue_wait: Latency,
        handler_time: Latency,
        end_to_end: Latency,
    ) {
        self.summary(
            &format!("{prefix}_queue_wait_seconds"),
            "From publish to the start of the first attempt.",
            labels,
            queue_wait,
        );
        self.summary(
            &format!("{prefix}_run_seconds"),
            "How long handlers ran, every attempt.",
            labels,
            handler_time,
        );
        self.summary(
            &format!("{prefix}_end_to_end_seconds"),
            "From publish to success, retries included.",
            labels,
            end_to_end,
        );
    }
}

/// Nanoseconds printed as seconds, exactly.
struct Seconds(u64);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, nanos) = (self.0 / 1_000_000_000, self.0 % 1_000_000_000);
        if nanos == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{nanos:09}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::table::Human;

    #[test]
    fn seconds_print_exactly() {
        assert_eq!(Seconds(0).to_string(), "0");
        assert_eq!(Seconds(1_500_000_000).to_string(), "1.5");
        assert_eq!(Seconds(1).to_string(), "0.000000001");
        assert_eq!(Seconds(12_345).to_string(), "0.000012345");
    }

    #[test]
    fn durations_print_in_human_units() {
        assert_eq!(Human(850).to_string(), "850ns");
        assert_eq!(Human(12_340).to_string(), "12.3µs");
        assert_eq!(Human(4_560_000).to_string(), "4.56ms");
        assert_eq!(Human(1_200_000_000).to_string(), "1.20s");
        assert_eq!(Human(150_000).to_string(), "150µs");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = Prometheus::default();
        out.counter("m_total", "Help.", &[("handler", "a\"b\\c\nd")], 3);
        assert_eq!(
            out.text,
            "# HELP m_total Help.\n# TYPE m_total counter\nm_total{handler=\"a\\\"b\\\\c\\nd\"} 3\n"
        );
    }
}
