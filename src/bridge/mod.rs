//! A bridge to Redis Streams (cargo feature `redis`): chosen event types leave the bus for a
//! stream and come back into another bus, envelope and all.
//!
//! Ground rules: exporting is a subscription whose deliveries are
//! [deferred](crate::Context::defer) to an export thread that pipelines the `XADD`s, one round
//! trip per batch; each delivery settles with its own reply, so a Redis failure is retried and
//! dead-lettered like any handler's; an [ordered](ExportOptions::ordered) export keeps one
//! `XADD` per key in flight and holds a key's later events behind a failed one. Importing is
//! two threads per event type: one reads with `XREADGROUP` under a consumer group (and
//! acknowledges, `XACK`, in the same round trip what has settled), the other decodes each
//! read's entries and publishes them into the bus as a batch with their original envelopes,
//! each with a [`Tracker`]: an entry is acknowledged only once every local
//! delivery of it has settled. An entry that does not decode is dead-lettered with
//! its raw text ([`DeadLetterReason::Undecodable`](crate::DeadLetterReason::Undecodable)) and
//! acknowledged. Entries other consumers left pending past an idle time are claimed
//! (`XAUTOCLAIM`, one pass over the whole pending list); the entries an import holds are
//! refreshed (`XCLAIM … JUSTID`, no delivery counted) so that they never look idle; entries
//! delivered too often are dead-lettered; event ids seen lately are not published twice. An
//! import reads its own pending entries first, every page of them (those of an earlier process
//! of the same [consumer name](ImportOptions::consumer)), and again after a lost connection,
//! which is made again on the next command, the reader backing off up to a second. A consumer
//! group that disappeared is made again from the stream's start (`NOGROUP`).
//!
//! Wire format, version 1: one stream entry per event, field `m`, a JSON object
//! `{"wire":1,"event":NAME,"version":VERSION,"envelope":{…},"payload":{…}}` — the envelope as
//! [`Envelope`]'s serde form writes it, the payload as the event's.

use std::fmt;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use redis::Commands;
use serde::{Deserialize, Serialize};

use crate::bus::{Bus, Core, Mode};
use crate::context::Context;
use crate::dead_letter::{DeadLetter, RedriveError};
use crate::defer::Deferred;
use crate::event::{Envelope, Event, PartitionKey, Stamp};
use crate::guard::Seam;
use crate::handler::{HandlerError, HandlerResult};
use crate::metrics::BridgeCounters;
pub use crate::metrics::ImportStatus;
use crate::subscription::{SubscribeOptions, Subscription};
use crate::sync::{Arc, AtomicBool, AtomicU64, Ordering};
use crate::track::Tracker;

/// The wire format's version.
pub const WIRE_VERSION: u32 = 1;

/// How many entries one read takes at most.
const READ_COUNT: usize = 256;
/// How many pending entries one `XAUTOCLAIM` page looks at.
const CLAIM_COUNT: usize = 256;
/// How many held entries one `XCLAIM … JUSTID` refreshes.
const REFRESH_CHUNK: usize = 512;
/// How often an import observes its group (lag, pending entries) for the metrics.
const OBSERVE_EVERY: Duration = Duration::from_secs(1);
/// How long one read waits for entries before the thread checks whether to stop.
const READ_BLOCK: Duration = Duration::from_millis(100);

/// A bridge failed to connect or to set up a stream.
#[derive(Debug)]
pub struct BridgeError(String);

impl fmt::Display for BridgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "redis bridge: {}", self.0)
    }
}

impl std::error::Error for BridgeError {}

impl From<redis::RedisError> for BridgeError {
    fn from(e: redis::RedisError) -> Self {
        BridgeError(e.to_string())
    }
}

/// One event on the wire.
#[derive(Serialize)]
struct WireOut<'a, E> {
    wire: u32,
    event: &'static str,
    version: u32,
    envelope: &'a Envelope,
    payload: &'a E,
}

#[derive(Deserialize)]
struct WireIn<E> {
    wire: u32,
    event: String,
    version: u32,
    envelope: Envelope,
    payload: E,
}

/// The bridge's counters: the same figures [`Bus::metrics`](crate::Bus::metrics) reports.
pub type BridgeStats = BridgeCounters;

impl Counters {
    fn read(&self) -> BridgeCounters {
        BridgeCounters {
            prefix: String::new(),
            exported: self.exported.load(Ordering::Relaxed),
            imported: self.imported.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            decode_failures: self.decode_failures.load(Ordering::Relaxed),
            claimed: self.claimed.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            group_recreations: self.group_recreations.load(Ordering::Relaxed),
            dead_stream_writes: self.dead_stream_writes.load(Ordering::Relaxed),
            dead_stream_redriven: self.dead_stream_redriven.load(Ordering::Relaxed),
            lease_lost: self.lease_lost.load(Ordering::Relaxed),
            consumers_removed: self.consumers_removed.load(Ordering::Relaxed),
            read_errors: self.read_errors.lock().clone(),
            imports: self
                .imports
                .lock()
                .iter()
                .map(|s| s.lock().clone())
                .collect(),
        }
    }

    /// Counts a failed read by its kind.
    fn read_error(&self, e: &redis::RedisError) {
        let kind = match e.code() {
            Some(code) => code.to_owned(),
            None if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                "io".to_owned()
            }
            None => format!("{:?}", e.kind()).to_lowercase(),
        };
        *self.read_errors.lock().entry(kind).or_default() += 1;
    }
}

#[derive(Default)]
struct Counters {
    exported: AtomicU64,
    imported: AtomicU64,
    acked: AtomicU64,
    decode_failures: AtomicU64,
    claimed: AtomicU64,
    duplicates: AtomicU64,
    reconnects: AtomicU64,
    group_recreations: AtomicU64,
    dead_stream_writes: AtomicU64,
    dead_stream_redriven: AtomicU64,
    lease_lost: AtomicU64,
    consumers_removed: AtomicU64,
    read_errors: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Each import's last observation of its group.
    imports: Mutex<Vec<Arc<Mutex<ImportStatus>>>>,
}

/// A connection that is made again when it is lost: the next command after a failure
/// reconnects (counted).
struct Link {
    client: redis::Client,
    connection: Option<redis::Connection>,
    counters: Arc<Counters>,
}

/// How long connecting, sending a command or waiting for its reply may take before the
/// connection counts as lost: a server that stops answering does not hang the bridge's threads
/// (reads block for at most [`READ_BLOCK`] by design).
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection with [`IO_TIMEOUT`] on each step.
fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let connection = client.get_connection_with_timeout(IO_TIMEOUT)?;
    connection.set_read_timeout(Some(IO_TIMEOUT))?;
    connection.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(connection)
}

impl Link {
    fn new(client: redis::Client, counters: Arc<Counters>) -> Result<Link, BridgeError> {
        let connection = connect(&client)?;
        Ok(Link {
            client,
            connection: Some(connection),
            counters,
        })
    }

    /// Runs `command`, connecting first if the connection was lost; a failure that is not a
    /// reply from the server drops the connection.
    fn run<T>(
        &mut self,
        command: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let connection = match &mut self.connection {
            Some(connection) => connection,
            None => {
                let connection = connect(&self.client)?;
                self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                self.connection.insert(connection)
            }
        };
        let result = command(connection);
        if let Err(e) = &result
            && (e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal())
        {
            self.connection = None;
        }
        result
    }
}

/// A bridge between a bus and Redis Streams under a key prefix: `<prefix>:<Event::NAME>`.
pub struct Bridge {
    bus: Bus,
    client: redis::Client,
    prefix: String,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Bridge {
    /// Connects to the Redis server at `url` (for example `redis://127.0.0.1:6379`).
    ///
    /// # Errors
    ///
    /// A [`BridgeError`] when the URL is malformed or the server does not answer.
    pub fn connect(bus: &Bus, url: &str, prefix: &str) -> Result<Bridge, BridgeError> {
        let client = redis::Client::open(url)?;
        let mut connection = connect(&client)?;
        let _: String = redis::cmd("PING").query(&mut connection)?;
        let counters: Arc<Counters> = Arc::default();
        // The bus reports the bridge's counters in its metrics for as long as the bridge lives.
        let (weak, name) = (Arc::downgrade(&counters), prefix.to_owned());
        bus.core().bridges.lock().push(Box::new(move || {
            weak.upgrade().map(|c| BridgeCounters {
                prefix: name.clone(),
                ..c.read()
            })
        }));
        Ok(Bridge {
            bus: bus.clone(),
            client,
            prefix: prefix.to_owned(),
            stop: Arc::default(),
            counters,
            threads: Mutex::new(Vec::new()),
        })
    }

    fn stream<E: Event>(&self) -> String {
        format!("{}:{}", self.prefix, E::NAME)
    }

    /// The bridge's counters (also in [`Bus::metrics`](crate::Bus::metrics)).
    pub fn stats(&self) -> BridgeStats {
        BridgeCounters {
            prefix: self.prefix.clone(),
            ..self.counters.read()
        }
    }

    /// Stops the import threads after they acknowledged what has settled. Export threads
    /// belong to their subscriptions and keep running.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.lock().drain(..) {
            let _ = thread.join();
        }
    }
}

impl fmt::Debug for Bridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bridge")
            .field("prefix", &self.prefix)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Decodes one entry, an older version of `E` through its upcaster (registered with
/// [`Bus::upcast`], run under the bus's guard); on failure, the envelope if that much decoded,
/// and why.
#[allow(clippy::result_large_err)] // The error carries the envelope that did decode.
fn decode<E: Event>(core: &Core, bytes: &[u8]) -> Result<WireIn<E>, (Option<Envelope>, String)> {
    match decode_current::<E>(bytes) {
        Err((Some(envelope), why)) => {
            // Perhaps an older version with an upcaster.
            let Ok(old) = serde_json::from_slice::<WireIn<serde_json::Value>>(bytes) else {
                return Err((Some(envelope), why));
            };
            let upcast = (old.wire == WIRE_VERSION && old.event == E::NAME)
                .then(|| core.rebuilders.upcaster::<E>(old.version))
                .flatten();
            let Some(upcast) = upcast else {
                if old.version == E::VERSION {
                    return Err((Some(envelope), why));
                }
                return Err((
                    Some(envelope),
                    format!(
                        "expected {} v{} (wire {WIRE_VERSION}), got {} v{} (wire {}), with no \
                         upcaster from it",
                        E::NAME,
                        E::VERSION,
                        old.event,
                        old.version,
                        old.wire
                    ),
                ));
            };
            let version = old.version;
            let payload = old.payload;
            match core.panics.run(Seam::Serde, || upcast(payload)) {
                Some(Ok(payload)) => Ok(WireIn {
                    wire: old.wire,
                    event: old.event,
                    version: E::VERSION,
                    envelope: old.envelope,
                    payload,
                }),
                Some(Err(e)) => Err((
                    Some(old.envelope),
                    format!("{} v{version} does not upcast: {e}", E::NAME),
                )),
                None => Err((
                    Some(old.envelope),
                    format!("the upcaster of {} v{version} panicked", E::NAME),
                )),
            }
        }
        other => other,
    }
}

/// Decodes one entry of today's version of `E`.
#[allow(clippy::result_large_err)] // The error carries the envelope that did decode.
fn decode_current<E: Event>(bytes: &[u8]) -> Result<WireIn<E>, (Option<Envelope>, String)> {
    if bytes.is_empty() {
        return Err((None, "no field `m` in the entry".to_owned()));
    }
    match serde_json::from_slice::<WireIn<E>>(bytes) {
        Ok(w) if w.wire == WIRE_VERSION && w.event == E::NAME && w.version == E::VERSION => Ok(w),
        Ok(w) => Err((
            Some(w.envelope),
            format!(
                "expected {} v{} (wire {WIRE_VERSION}), got {} v{} (wire {})",
                E::NAME,
                E::VERSION,
                w.event,
                w.version,
                w.wire
            ),
        )),
        Err(e) => {
            let envelope = serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| serde_json::from_value::<Envelope>(v.get("envelope")?.clone()).ok());
            Err((
                envelope,
                format!("does not decode as {} v{}: {e}", E::NAME, E::VERSION),
            ))
        }
    }
}

/// Publishes a dead letter the import made of an entry (delivered too often) into the bus, with
/// its envelope, to the subscriptions of `E` there are now: how such a letter is redriven.
fn republish<E: Event>(core: &dyn std::any::Any, letter: &DeadLetter) -> Result<(), RedriveError> {
    let id = letter.id();
    let Some(core) = core.downcast_ref::<Core>() else {
        unreachable!("a republisher is given the bus's core")
    };
    let raw: String =
        serde_json::from_str(letter.payload_json()).map_err(|_| RedriveError::NotRedrivable(id))?;
    let wire = decode::<E>(core, raw.as_bytes()).map_err(|_| RedriveError::NotRedrivable(id))?;
    let source = wire.envelope.source_id();
    core.publish(
        source,
        wire.payload,
        Stamp::Given(wire.envelope),
        None,
        Mode::Block,
    )
    .map(|_| ())
    .map_err(|_| RedriveError::Shutdown(id))
}

mod export;
mod import;

pub use export::ExportOptions;
pub use import::ImportOptions;
