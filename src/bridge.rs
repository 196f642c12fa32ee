//! A bridge to Redis Streams (cargo feature `redis`): chosen event types leave the bus for a
//! stream and come back into another bus, envelope and all.
//!
//! Ground rules: exporting is a subscription (an `XADD` per event, so a Redis failure is
//! retried and dead-lettered like any handler's). Importing is a thread per event type that
//! reads with `XREADGROUP` under a consumer group, publishes each entry into the bus with its
//! original envelope and a [`Tracker`](crate::Tracker), and acknowledges it (`XACK`) only once
//! every local delivery of it has settled. An entry that does not decode is dead-lettered with
//! its raw text ([`DeadLetterReason::Undecodable`](crate::DeadLetterReason::Undecodable)) and
//! acknowledged.
//!
//! Wire format, version 1: one stream entry per event, field `m`, a JSON object
//! `{"wire":1,"event":NAME,"version":VERSION,"envelope":{…},"payload":{…}}` — the envelope as
//! [`Envelope`]'s serde form writes it, the payload as the event's.

use std::fmt;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use redis::Commands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use crate::event::{Envelope, Event};
use crate::handler::{Context, HandlerError, HandlerResult};
use crate::registry::{SubscribeOptions, Subscription};
use crate::sync::{Arc, AtomicBool, AtomicU64, Ordering};

/// The wire format's version.
pub const WIRE_VERSION: u32 = 1;

/// How many entries one read takes at most.
const READ_COUNT: usize = 64;
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

/// The bridge's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BridgeStats {
    /// Events written to their stream.
    pub exported: u64,
    /// Stream entries published into the bus.
    pub imported: u64,
    /// Entries acknowledged once every local delivery settled.
    pub acked: u64,
    /// Entries that did not decode.
    pub decode_failures: u64,
}

#[derive(Default)]
struct Counters {
    exported: AtomicU64,
    imported: AtomicU64,
    acked: AtomicU64,
    decode_failures: AtomicU64,
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
        let mut connection = client.get_connection()?;
        let _: String = redis::cmd("PING").query(&mut connection)?;
        Ok(Bridge {
            bus: bus.clone(),
            client,
            prefix: prefix.to_owned(),
            stop: Arc::default(),
            counters: Arc::default(),
            threads: Mutex::new(Vec::new()),
        })
    }

    fn stream<E: Event>(&self) -> String {
        format!("{}:{}", self.prefix, E::NAME)
    }

    /// Forwards every event of type `E` published on the bus to its stream. The subscription is
    /// named `redis-export`; a failed `XADD` fails the delivery, which is retried and
    /// dead-lettered as the bus's retry policy says.
    ///
    /// # Errors
    ///
    /// A [`BridgeError`] when no connection can be made or the bus is shut down.
    pub fn export<E: Event>(&self) -> Result<Subscription, BridgeError> {
        let connection = Mutex::new(self.client.get_connection()?);
        let stream = self.stream::<E>();
        let counters = self.counters.clone();
        let handler = move |event: &E, ctx: &Context<'_>| -> HandlerResult {
            let message = serde_json::to_string(&WireOut {
                wire: WIRE_VERSION,
                event: E::NAME,
                version: E::VERSION,
                envelope: ctx.envelope(),
                payload: event,
            })
            .map_err(HandlerError::permanent)?;
            let _: String = connection
                .lock()
                .xadd(&stream, "*", &[("m", message)])
                .map_err(HandlerError::from)?;
            counters.exported.fetch_add(1, Ordering::Relaxed);
            Ok(())
        };
        self.bus
            .subscribe_with(SubscribeOptions::default().named("redis-export"), handler)
            .map_err(|e| BridgeError(e.to_string()))
    }

    /// Reads the stream of `E` under consumer group `group` (created at the stream's start if
    /// it does not exist) and publishes each entry into the bus with its original envelope;
    /// an entry is acknowledged once every local delivery of it has settled.
    ///
    /// # Errors
    ///
    /// A [`BridgeError`] when no connection can be made or the group cannot be created.
    pub fn import<E: Event>(&self, group: &str) -> Result<(), BridgeError> {
        let mut connection = self.client.get_connection()?;
        let stream = self.stream::<E>();
        let created: redis::RedisResult<()> =
            connection.xgroup_create_mkstream(&stream, group, "0");
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e.into());
        }
        let (bus, stop, counters) = (self.bus.clone(), self.stop.clone(), self.counters.clone());
        let group = group.to_owned();
        let consumer = format!("{}-{}", bus.service_name(), std::process::id());
        let thread = std::thread::Builder::new()
            .name(format!("microbus-redis-import-{}", E::NAME))
            .spawn(move || {
                import_loop::<E>(
                    &bus,
                    &mut connection,
                    &stream,
                    &group,
                    &consumer,
                    &stop,
                    &counters,
                );
            })
            .map_err(|e| BridgeError(e.to_string()))?;
        self.threads.lock().push(thread);
        Ok(())
    }

    /// The bridge's counters.
    pub fn stats(&self) -> BridgeStats {
        let c = &self.counters;
        BridgeStats {
            exported: c.exported.load(Ordering::Relaxed),
            imported: c.imported.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            decode_failures: c.decode_failures.load(Ordering::Relaxed),
        }
    }

    /// Stops the import threads after they acknowledged what has settled.
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

/// The name under which undecodable entries are dead-lettered.
const IMPORT: &str = "redis-import";

/// Decodes one entry; on failure, the envelope if that much decoded, and why.
#[allow(clippy::result_large_err)] // The error carries the envelope that did decode.
fn decode<E: Event>(bytes: &[u8]) -> Result<WireIn<E>, (Option<Envelope>, String)> {
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

fn import_loop<E: Event>(
    bus: &Bus,
    connection: &mut redis::Connection,
    stream: &str,
    group: &str,
    consumer: &str,
    stop: &AtomicBool,
    counters: &Counters,
) {
    let (ack_tx, ack_rx) = crossbeam_channel::unbounded::<String>();
    let options = StreamReadOptions::default()
        .group(group, consumer)
        .count(READ_COUNT)
        .block(READ_BLOCK.as_millis() as usize);
    let mut outstanding = 0usize;
    loop {
        let acks: Vec<String> = ack_rx.try_iter().collect();
        if !acks.is_empty() {
            let acked: redis::RedisResult<u64> = connection.xack(stream, group, &acks);
            if acked.is_ok() {
                counters
                    .acked
                    .fetch_add(acks.len() as u64, Ordering::Relaxed);
                outstanding -= acks.len();
            }
        }
        if stop.load(Ordering::SeqCst) {
            if outstanding == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let reply: redis::RedisResult<Option<StreamReadReply>> =
            connection.xread_options(&[stream], &[">"], &options);
        let Ok(Some(reply)) = reply else {
            continue;
        };
        for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
            let bytes = entry.get::<Vec<u8>>("m").unwrap_or_default();
            let wire = match decode::<E>(&bytes) {
                Ok(wire) => wire,
                Err((envelope, why)) => {
                    // Kept with its raw text and acknowledged: it would never decode.
                    counters.decode_failures.fetch_add(1, Ordering::Relaxed);
                    bus.core()
                        .bury_undecodable(E::NAME, E::VERSION, envelope, &bytes, IMPORT, why);
                    let _ = ack_tx.send(entry.id.clone());
                    outstanding += 1;
                    continue;
                }
            };
            match bus.publish_envelope_tracked(wire.payload, wire.envelope) {
                Ok(tracker) => {
                    counters.imported.fetch_add(1, Ordering::Relaxed);
                    outstanding += 1;
                    let ack_tx = ack_tx.clone();
                    let id = entry.id.clone();
                    tracker.on_complete(move |_| {
                        let _ = ack_tx.send(id);
                    });
                }
                // The bus is shutting down: the entry stays pending for another consumer.
                Err(_) => return,
            }
        }
    }
}
