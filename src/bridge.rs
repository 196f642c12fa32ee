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
use crate::dead_letter::{DeadLetter, RedriveError};
use crate::defer::Deferred;
use crate::event::{Envelope, Event, PartitionKey, Stamp};
use crate::guard::Seam;
use crate::handler::{Context, HandlerError, HandlerResult};
use crate::metrics::BridgeCounters;
pub use crate::metrics::ImportStatus;
use crate::registry::{SubscribeOptions, Subscription};
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

    /// Forwards every event of type `E` published on the bus to its stream.
    ///
    /// The subscription, named `redis-export`, encodes each event on the worker and
    /// [defers](Context::defer) its delivery to an export thread, which sends what has
    /// gathered as one pipeline of `XADD`s (up to 512, one round trip) and settles each
    /// delivery with its own reply: confirmed, it succeeds; refused or lost with the
    /// connection, it fails and is retried (the handler runs again) and dead-lettered as the
    /// bus's retry policy says. An `XADD` that reached the server before the connection broke
    /// is sent again: the stream then holds the event twice, which an import drops by event id.
    /// The thread lives as long as the subscription, or until the bus has stopped.
    ///
    /// # Errors
    ///
    /// A [`BridgeError`] when no connection can be made or the bus is shut down.
    pub fn export<E: Event>(&self) -> Result<Subscription, BridgeError> {
        self.export_with::<E>(ExportOptions::new())
    }

    /// As [`export`](Self::export), with `options`: how the stream is bounded.
    ///
    /// # Errors
    ///
    /// As [`export`](Self::export).
    pub fn export_with<E: Event>(
        &self,
        options: ExportOptions,
    ) -> Result<Subscription, BridgeError> {
        let mut link = Link::new(self.client.clone(), self.counters.clone())?;
        let (tx, rx) = crossbeam_channel::bounded::<Outgoing>(EXPORT_QUEUE);
        let exporter = Exporter {
            ordered: options.ordered,
            trim: options.trim,
            stream: self.stream::<E>(),
            rx,
            core: self.bus.core().clone(),
            counters: self.counters.clone(),
        };
        std::thread::Builder::new()
            .name(format!("microbus-redis-export-{}", E::NAME))
            .spawn(move || exporter.run(&mut link))
            .map_err(|e| BridgeError(e.to_string()))?;
        let handler = move |event: &E, ctx: &Context<'_>| -> HandlerResult {
            let message = serde_json::to_string(&WireOut {
                wire: WIRE_VERSION,
                event: E::NAME,
                version: E::VERSION,
                envelope: ctx.envelope(),
                payload: event,
            })
            .map_err(HandlerError::permanent)?;
            // Waits while the export thread is a full queue behind: backpressure.
            let envelope = ctx.envelope();
            tx.send(Outgoing {
                message,
                key: envelope.key(),
                event: envelope.id(),
                last: ctx.attempt() >= ctx.sub.retry.attempts(),
                done: ctx.defer(),
            })
            .map_err(|_| HandlerError::msg("the export thread has stopped"))?;
            Ok(())
        };
        self.bus
            .subscribe_with(SubscribeOptions::default().named("redis-export"), handler)
            .map_err(|e| BridgeError(e.to_string()))
    }

    /// Reads the stream of `E` under consumer group `group` with the default
    /// [`ImportOptions`]; see [`import_with`](Self::import_with).
    ///
    /// # Errors
    ///
    /// As [`import_with`](Self::import_with).
    pub fn import<E: Event>(&self, group: &str) -> Result<(), BridgeError> {
        self.import_with::<E>(ImportOptions::new(group))
    }

    /// Reads the stream of `E` under the consumer group of `options` (created at the stream's
    /// start if it does not exist) and publishes each entry into the bus with its original
    /// envelope; an entry is acknowledged once every local delivery of it has settled. Entries
    /// another consumer left pending longer than the claim time (it died) are taken over;
    /// entries delivered more often than the limit are dead-lettered; an event id seen again
    /// within the window is acknowledged without being published twice.
    ///
    /// The thread starts publishing at once: subscribe what the imported events lead to
    /// (handlers, and the exports of the events they publish) first. An event that matches no
    /// subscription when it is published is counted as unmatched, not kept for later.
    ///
    /// # Errors
    ///
    /// A [`BridgeError`] when no connection can be made or the group cannot be created.
    pub fn import_with<E: Event>(&self, options: ImportOptions) -> Result<(), BridgeError> {
        let mut link = Link::new(self.client.clone(), self.counters.clone())?;
        let stream = self.stream::<E>();
        // Dead letters of this type that the import makes (or that a file brings back) can be
        // redriven: published again.
        self.bus
            .core()
            .republishers
            .lock()
            .insert((E::NAME, E::VERSION), republish::<E>);
        let created: redis::RedisResult<()> =
            link.run(|c| c.xgroup_create_mkstream(&stream, &options.group, "0"));
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e.into());
        }
        // This process's claim on its consumer name (see `lease`).
        let token = crate::event::EventId::new().to_string();
        let status = Arc::new(Mutex::new(ImportStatus {
            stream: stream.clone(),
            group: options.group.clone(),
            ..ImportStatus::default()
        }));
        self.counters.imports.lock().push(status.clone());
        let consumer = {
            let base = options
                .consumer
                .clone()
                .unwrap_or_else(|| format!("{}-{}", host_name(), self.bus.service_name()));
            lease(&mut link, &stream, &options.group, &base, &token)?
        };
        status.lock().consumer = consumer.clone();
        let (settle, settled) = crossbeam_channel::unbounded();
        let (pages, to_publish) = crossbeam_channel::bounded(1);
        let publisher = Publisher {
            bus: self.bus.clone(),
            options: options.clone(),
            counters: self.counters.clone(),
            recent: Recent::default(),
            settle,
        };
        let importer = Importer {
            bus: self.bus.clone(),
            status,
            stream,
            consumer,
            token,
            options,
            stop: self.stop.clone(),
            counters: self.counters.clone(),
            held: std::collections::HashSet::new(),
            pages,
            settled,
        };
        let publishing = std::thread::Builder::new()
            .name(format!("microbus-redis-publish-{}", E::NAME))
            .spawn(move || publisher.run::<E>(to_publish))
            .map_err(|e| BridgeError(e.to_string()))?;
        // Without its reader, the publishing thread finds its channel closed and ends.
        let reading = std::thread::Builder::new()
            .name(format!("microbus-redis-import-{}", E::NAME))
            .spawn(move || importer.run(&mut link))
            .map_err(|e| BridgeError(e.to_string()))?;
        self.threads.lock().extend([reading, publishing]);
        Ok(())
    }

    /// Puts the entries of `E`'s dead-letter stream (see [`ImportOptions::dead_letter_stream`])
    /// back on its stream, oldest first, each moved in one transaction (`XADD` to the stream,
    /// `XDEL` from the dead-letter stream): every consumer group reads them again, as new
    /// entries. Run it once what made them fail is mended (an upcaster registered, a handler
    /// fixed). Returns how many it moved.
    ///
    /// # Errors
    ///
    /// A [`BridgeError`] when Redis fails; the entries moved before stay moved.
    pub fn redrive_dead<E: Event>(&self) -> Result<u64, BridgeError> {
        let mut link = Link::new(self.client.clone(), self.counters.clone())?;
        let stream = self.stream::<E>();
        let dead = dead_stream(&stream);
        let mut moved = 0;
        loop {
            let page: redis::streams::StreamRangeReply =
                link.run(|c| c.xrange_count(&dead, "-", "+", 256))?;
            if page.ids.is_empty() {
                return Ok(moved);
            }
            for entry in page.ids {
                let raw = entry.get::<Vec<u8>>("m").unwrap_or_default();
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .xadd(&stream, "*", &[("m", raw.as_slice())])
                    .ignore()
                    .xdel(&dead, &[&entry.id])
                    .ignore();
                let _: () = link.run(|c| pipe.query(c))?;
                moved += 1;
                self.counters
                    .dead_stream_redriven
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
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

/// How many encoded events wait for the export thread at most.
const EXPORT_QUEUE: usize = 4096;
/// The most `XADD`s in one pipeline.
const PIPELINE: usize = 512;

/// An encoded event on its way to the stream, and its delivery.
struct Outgoing {
    message: String,
    done: Deferred,
    /// The event's partition key, and its id.
    key: Option<PartitionKey>,
    event: crate::event::EventId,
    /// Whether this is the delivery's last attempt: failed, it is dead-lettered, not retried.
    last: bool,
}

/// How an export bounds its stream, and whether it keeps each key's order through failures.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    trim: Option<Trim>,
    ordered: bool,
}

#[derive(Debug, Clone, Copy)]
enum Trim {
    MaxLen(usize),
    MaxAge(Duration),
}

impl ExportOptions {
    /// A stream that is never trimmed (it grows until something else trims it).
    pub fn new() -> ExportOptions {
        ExportOptions::default()
    }

    /// Keeps about the last `entries` entries (`XADD … MAXLEN ~ entries`: Redis trims whole
    /// nodes, so a few more may stay). Entries trimmed before a consumer group read them are
    /// lost to it, and counted ([`ImportStatus::trimmed_unread`]).
    pub fn max_len(mut self, entries: usize) -> ExportOptions {
        self.trim = Some(Trim::MaxLen(entries));
        self
    }

    /// Keeps about the entries of the last `age` (`XADD … MINID ~ <now − age>`); see
    /// [`max_len`](Self::max_len).
    pub fn max_age(mut self, age: Duration) -> ExportOptions {
        self.trim = Some(Trim::MaxAge(age));
        self
    }

    /// Keeps the events of each [partition key](crate::Publish::key) in publish order on the
    /// stream, through failures: one `XADD` per key is in flight at a time, and once one
    /// fails, the key's later events wait (their deliveries outstanding, no attempt spent)
    /// until its retry is confirmed — or, if that was its last attempt, until it is
    /// dead-lettered, as [`Bus::flush`](crate::Bus::flush) and the shutdown deadline see them.
    /// Unkeyed events are pipelined as without it; a key with events in quick succession
    /// costs a round trip per event.
    pub fn ordered(mut self) -> ExportOptions {
        self.ordered = true;
        self
    }
}

/// With an [ordered](ExportOptions::ordered) export, a key with an `XADD` in flight, or one
/// that failed and waits for its retry: the key's later events wait behind it, in order.
#[derive(Default)]
struct Hold {
    /// The event whose retry releases the key (its `XADD` failed).
    failed: Option<crate::event::EventId>,
    waiting: std::collections::VecDeque<Outgoing>,
}

/// One export thread's state.
struct Exporter {
    ordered: bool,
    trim: Option<Trim>,
    stream: String,
    rx: crossbeam_channel::Receiver<Outgoing>,
    core: Arc<Core>,
    counters: Arc<Counters>,
}

impl Exporter {
    /// Sends what has gathered as one pipeline, settles each delivery with its reply, and
    /// goes round again; stops when the subscription is gone or the bus has stopped.
    fn run(self, link: &mut Link) {
        let mut holds: std::collections::HashMap<PartitionKey, Hold> =
            std::collections::HashMap::new();
        // Events a confirmed (or dead-lettered) one released: they go first.
        let mut released: Vec<Outgoing> = Vec::new();
        let mut incoming: Vec<Outgoing> = Vec::with_capacity(PIPELINE);
        loop {
            if released.is_empty() {
                match self.rx.recv_timeout(READ_BLOCK) {
                    Ok(first) => incoming.push(first),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        if self.core.is_stopped() {
                            return;
                        }
                        continue;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                }
            }
            let room = PIPELINE - released.len() - incoming.len();
            incoming.extend(self.rx.try_iter().take(room));
            let mut batch = std::mem::take(&mut released);
            for out in incoming.drain(..) {
                let Some(key) = out.key.filter(|_| self.ordered) else {
                    batch.push(out);
                    continue;
                };
                match holds.get_mut(&key) {
                    None => {
                        holds.insert(key, Hold::default());
                        batch.push(out);
                    }
                    // The retry of the event that failed: it goes, the others wait.
                    Some(hold) if hold.failed == Some(out.event) => {
                        hold.failed = None;
                        batch.push(out);
                    }
                    Some(hold) => hold.waiting.push_back(out),
                }
            }
            if batch.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let min_id = match self.trim {
                Some(Trim::MaxAge(age)) => {
                    let now = crate::event::unix_nanos() / 1_000_000;
                    let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
                    Some(format!("{}-0", now.saturating_sub(age)))
                }
                _ => None,
            };
            for out in &batch {
                let mut xadd = redis::cmd("XADD");
                xadd.arg(&self.stream);
                match (self.trim, &min_id) {
                    (Some(Trim::MaxLen(n)), _) => {
                        xadd.arg("MAXLEN").arg("~").arg(n);
                    }
                    (Some(Trim::MaxAge(_)), Some(min_id)) => {
                        xadd.arg("MINID").arg("~").arg(min_id);
                    }
                    _ => {}
                }
                xadd.arg("*").arg("m").arg(&out.message);
                pipe.add_command(xadd);
            }
            let replies: redis::RedisResult<Vec<redis::RedisResult<String>>> =
                link.run(|c| pipe.query(c));
            let replies: Vec<Result<(), HandlerError>> = match replies {
                Ok(replies) if replies.len() == batch.len() => replies
                    .into_iter()
                    .map(|reply| reply.map(drop).map_err(HandlerError::msg))
                    .collect(),
                Ok(replies) => {
                    let why = format!("{} replies to {} XADDs", replies.len(), batch.len());
                    batch.iter().map(|_| Err(HandlerError::msg(&why))).collect()
                }
                Err(e) => batch.iter().map(|_| Err(HandlerError::msg(&e))).collect(),
            };
            for (out, reply) in batch.into_iter().zip(replies) {
                // Under an ordered export, a key goes on once its event is on the stream or
                // will be dead-lettered; after a failure to be retried, it waits for the retry.
                let key = out.key.filter(|_| self.ordered);
                let retried = reply.is_err() && !out.last;
                if let Some(hold) = key.and_then(|key| holds.get_mut(&key)) {
                    if retried {
                        hold.failed = Some(out.event);
                    } else if let Some(next) = hold.waiting.pop_front() {
                        released.push(next);
                    } else if let Some(key) = key {
                        holds.remove(&key);
                    }
                }
                match reply {
                    Ok(()) => {
                        self.counters.exported.fetch_add(1, Ordering::Relaxed);
                        out.done.succeed();
                    }
                    Err(e) => out.done.fail(e),
                }
            }
        }
    }
}

/// The name under which entries that are not published are dead-lettered.
const IMPORT: &str = "redis-import";

/// The dead-letter stream of stream `stream`.
fn dead_stream(stream: &str) -> String {
    format!("{stream}:dead")
}

/// How an import reads its stream.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    group: String,
    consumer: Option<String>,
    claim_idle: Duration,
    max_deliveries: u32,
    dedup_window: usize,
    dead_letter_stream: bool,
    seen_ttl: Option<Duration>,
    consumer_idle: Duration,
}

impl ImportOptions {
    /// Reads under consumer group `group`, taking over entries pending for 30 s, dead-lettering
    /// entries delivered more than 5 times, and remembering the last 100,000 event ids.
    pub fn new(group: &str) -> ImportOptions {
        ImportOptions {
            group: group.to_owned(),
            consumer: None,
            claim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            dedup_window: 100_000,
            dead_letter_stream: false,
            seen_ttl: None,
            consumer_idle: Duration::from_secs(3600),
        }
    }

    /// Reads as consumer `name` of the group (by default `<host>-<service>`: this machine's
    /// name and the bus's service name). A process that starts again under the same name first
    /// reads the entries it was given and had not acknowledged (its own pending list, every
    /// page of it). The name is leased (`SET <stream>:consumer:<group>:<name> NX PX`, 5 s,
    /// renewed while the import runs, released when it stops): a process starting while the
    /// lease is held waits up to one lease for it (a crashed process's lease expires), and if a
    /// live process keeps renewing it — a second replica on the same host — it reads as
    /// `<name>-2` (or the next free suffix) instead, so that two processes never share a name
    /// by accident.
    pub fn consumer(mut self, name: &str) -> ImportOptions {
        self.consumer = Some(name.to_owned());
        self
    }

    /// Takes over entries another consumer has left pending (unacknowledged) this long.
    pub fn claim_idle(mut self, idle: Duration) -> ImportOptions {
        self.claim_idle = idle;
        self
    }

    /// Dead-letters an entry once it has been delivered more than `n` times.
    pub fn max_deliveries(mut self, n: u32) -> ImportOptions {
        self.max_deliveries = n;
        self
    }

    /// Removes from the group the consumers idle longer than `idle` with nothing pending and
    /// no live lease on their name (processes long gone), looking every half of `idle` (at
    /// least every second, at most every minute); counted. An hour by default.
    pub fn remove_idle_consumers(mut self, idle: Duration) -> ImportOptions {
        self.consumer_idle = idle;
        self
    }

    /// Also writes the entries the import dead-letters (undecodable, delivered too often) to
    /// the stream's dead-letter stream, `<prefix>:<NAME>:dead` — field `m` the raw entry,
    /// `reason` (`undecodable` or `retries_exhausted`), `error`, `entry` (its id) and `group` —
    /// before it acknowledges them, so that they outlive the process; [`Bridge::redrive_dead`]
    /// puts them back on the stream. Off by default (they go to the bus's dead letters only).
    pub fn dead_letter_stream(mut self, on: bool) -> ImportOptions {
        self.dead_letter_stream = on;
        self
    }

    /// Also keeps the event ids it handled in Redis for `ttl` (`SET <stream>:seen:<group>:<id>
    /// NX PX`), recorded when an entry's deliveries have settled, just before its `XACK`, and
    /// never when it is read: an entry read again — after a restart, by another consumer of the
    /// group, or exported twice — is dropped if its event was handled. The in-memory window
    /// ([`dedup_window`](Self::dedup_window)) alone is empty after a restart.
    ///
    /// What each mode guarantees: without it, an event is handled at least once, and twice
    /// at most when it comes back within the window of the same process; with it, an event
    /// whose deliveries settled is not handled again within `ttl`, by any process of the
    /// group — duplicates are at most the entries in flight (read, not yet settled) when a
    /// consumer died. It costs an `EXISTS` per entry read and a `SET` per entry acknowledged,
    /// pipelined.
    pub fn dedup_in_redis(mut self, ttl: Duration) -> ImportOptions {
        self.seen_ttl = Some(ttl);
        self
    }

    /// How many recent event ids are remembered to drop redelivered duplicates.
    pub fn dedup_window(mut self, ids: usize) -> ImportOptions {
        self.dedup_window = ids;
        self
    }
}

/// The event ids published lately, oldest first.
#[derive(Default)]
struct Recent {
    order: std::collections::VecDeque<crate::event::EventId>,
    set: std::collections::HashSet<crate::event::EventId>,
}

impl Recent {
    /// Remembers `id`; `false` when it was remembered already.
    fn insert(&mut self, id: crate::event::EventId, window: usize) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        while self.order.len() > window {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
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
                .then(|| core.registry.upcaster::<E>(old.version))
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
fn republish<E: Event>(core: &Core, letter: &DeadLetter) -> Result<(), RedriveError> {
    let id = letter.id();
    let raw: String =
        serde_json::from_str(letter.payload_json()).map_err(|_| RedriveError::NotRedrivable(id))?;
    let wire = decode::<E>(core, raw.as_bytes()).map_err(|_| RedriveError::NotRedrivable(id))?;
    let source = wire.envelope.source_id();
    core.publish(
        source,
        wire.payload,
        Stamp::Given(wire.envelope),
        Mode::Block,
    )
    .map_err(|_| RedriveError::Shutdown(id))
}

/// How long a lease on a consumer name lasts; the import renews it about every third of that.
const LEASE: Duration = Duration::from_secs(5);

/// This machine's name, for the default consumer name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The key that holds the lease on consumer `name` of `group` on `stream`.
fn lease_key(stream: &str, group: &str, name: &str) -> String {
    format!("{stream}:consumer:{group}:{name}")
}

/// Takes the lease on consumer name `base` for this process (`SET … NX PX`, value `token`):
/// waiting up to one lease for it — a process of the same name that died leaves its lease to
/// expire, and a restart gets its name, and its pending entries, back. If a live process keeps
/// renewing it (a second replica on the same host), the name is `base-2`, `base-3`, … instead,
/// the first free one.
fn lease(
    link: &mut Link,
    stream: &str,
    group: &str,
    base: &str,
    token: &str,
) -> Result<String, BridgeError> {
    let mut take = |name: &str| -> Result<bool, BridgeError> {
        let key = lease_key(stream, group, name);
        let reply: Option<String> = link.run(|c| {
            redis::cmd("SET")
                .arg(&key)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(LEASE.as_millis() as u64)
                .query(c)
        })?;
        Ok(reply.is_some())
    };
    let deadline = std::time::Instant::now() + LEASE + Duration::from_millis(500);
    loop {
        if take(base)? {
            return Ok(base.to_owned());
        }
        if std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in 2.. {
        let name = format!("{base}-{n}");
        if take(&name)? {
            return Ok(name);
        }
    }
    unreachable!("a free name is found")
}

/// Renews this process's lease on its consumer name (only if it still holds it), or lets it
/// go (`release`).
fn renew_lease(link: &mut Link, key: &str, token: &str, release: bool) -> bool {
    const RENEW: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
        return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";
    const RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
        return redis.call('del', KEYS[1]) else return 0 end";
    let done: redis::RedisResult<i64> = link.run(|c| {
        redis::cmd("EVAL")
            .arg(if release { RELEASE } else { RENEW })
            .arg(1)
            .arg(key)
            .arg(token)
            .arg(LEASE.as_millis() as u64)
            .query(c)
    });
    matches!(done, Ok(1))
}

/// A stream entry as the import reads it: its id and its field `m` (empty when it has none).
struct Entry {
    id: String,
    m: Vec<u8>,
}

/// The entries of an `XREADGROUP` or `XAUTOCLAIM` reply's list of entries, read off the reply as
/// it is (an entry deleted since it was delivered has no fields).
fn entries_of(list: redis::Value) -> Vec<Entry> {
    use redis::Value;
    let Value::Array(items) = list else {
        return Vec::new();
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut item) = item else {
            continue;
        };
        let fields = item.pop();
        let id = match item.pop() {
            Some(Value::BulkString(id)) => String::from_utf8(id).ok(),
            Some(Value::SimpleString(id)) => Some(id),
            _ => None,
        };
        let Some(id) = id else {
            continue;
        };
        let mut m = Vec::new();
        if let Some(Value::Array(fields)) = fields {
            let mut fields = fields.into_iter();
            while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                if let (Value::BulkString(name), Value::BulkString(value)) = (name, value)
                    && name == b"m"
                {
                    m = value;
                    break;
                }
            }
        }
        entries.push(Entry { id, m });
    }
    entries
}

/// The entries of an `XREADGROUP` reply (of one stream; none when it timed out).
fn read_entries(reply: redis::Value) -> Vec<Entry> {
    use redis::Value;
    let streams = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(streams) => streams.into_iter().map(|(_, entries)| entries).collect(),
        _ => Vec::new(),
    };
    streams.into_iter().flat_map(entries_of).collect()
}

/// One import thread's state.
struct Importer {
    bus: Bus,
    /// What it last observed of its group (lag, pending, oldest pending idle time).
    status: Arc<Mutex<ImportStatus>>,
    stream: String,
    consumer: String,
    /// The value of this process's lease on `consumer`.
    token: String,
    options: ImportOptions,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    /// Entries taken and not acknowledged yet: a claim leaves them alone (the claim resets
    /// their idle time, and they would come back as their own duplicates).
    held: std::collections::HashSet<String>,
    /// The entries read, each with how often it was delivered and whether Redis has seen its
    /// event, on their way to the publishing thread.
    pages: crossbeam_channel::Sender<Page>,
    /// What became of the entries handed over.
    settled: crossbeam_channel::Receiver<Settle>,
}

/// Entries to acknowledge, each with its event's id when the dedup kept in Redis is to record
/// it as seen first.
type Acks = Vec<(String, Option<crate::event::EventId>)>;

/// A read sent ahead of its reply (see [`Importer::send_read`]).
struct Sent {
    /// The acknowledgements sent with it.
    acks: Acks,
    /// How many replies come before the read's own.
    before: usize,
    /// Whether it reads this consumer's own pending list (from an id) rather than new entries.
    recovering: bool,
}

/// One read's entries for the publishing thread: each with its delivery count and whether
/// the dedup kept in Redis has seen its event.
type Page = Vec<(Entry, u64, bool)>;

/// What the publishing thread tells the reader of an entry.
enum Settle {
    /// Acknowledge it (recording its event as seen, with the dedup kept in Redis).
    Ack(String, Option<crate::event::EventId>),
    /// Leave it pending for another consumer: a delivery never ran.
    Leave(String),
    /// Dead-lettered (the reason, and why): acknowledged once the dead-letter stream, if the
    /// import writes one, has it.
    Buried(Entry, &'static str, String),
}

/// The publishing half of an import: decodes what the reader hands over, drops duplicates,
/// dead-letters what cannot be published, and publishes the rest; on its own thread, so that
/// decoding overlaps the next read's round trip.
struct Publisher {
    bus: Bus,
    options: ImportOptions,
    counters: Arc<Counters>,
    recent: Recent,
    settle: crossbeam_channel::Sender<Settle>,
}

/// What becomes of one entry.
enum Taken<E> {
    /// To publish (with its envelope), and acknowledge when its deliveries settle.
    Publish(E, Envelope),
    /// Acknowledge now: a duplicate.
    Ack,
    /// Dead-lettered (the reason, and why).
    Buried(&'static str, String),
}

impl Importer {
    /// Reads until the bridge or the bus stops, then lets go of the consumer name.
    fn run(mut self, link: &mut Link) {
        let key = lease_key(&self.stream, &self.options.group, &self.consumer);
        let token = self.token.clone();
        self.read(link, &key);
        renew_lease(link, &key, &token, true);
    }

    fn read(&mut self, link: &mut Link, lease: &str) {
        let mut last_claim = std::time::Instant::now();
        let mut last_refresh = std::time::Instant::now();
        let mut last_observed: Option<std::time::Instant> = None;
        let mut last_renewed = std::time::Instant::now();
        let mut last_swept = std::time::Instant::now();
        let mut acks: Acks = Vec::new();
        let mut buried = Vec::new();
        let mut backoff = Duration::ZERO;
        // Reads sent ahead of their replies, oldest first: while the publishing thread
        // decodes one page and this thread parses the next reply, Redis prepares the one
        // after. Every other command waits until none is in flight.
        let mut in_flight: std::collections::VecDeque<Sent> = std::collections::VecDeque::new();
        // First the entries this consumer was given and did not acknowledge — left by an
        // earlier process of the same name, or given in a reply lost with a connection: its
        // own pending list, page after page from id 0 (`Some(after)`: the next page starts
        // after `after`). Again after every lost connection.
        let mut recover_from: Option<String> = Some("0".to_owned());
        loop {
            if !backoff.is_zero() {
                std::thread::sleep(backoff);
            }
            for settled in self.settled.try_iter() {
                match settled {
                    Settle::Ack(id, event) => acks.push((id, event)),
                    Settle::Leave(id) => {
                        self.held.remove(&id);
                    }
                    Settle::Buried(entry, reason, why) => buried.push((entry, reason, why)),
                }
            }
            // Stopping (the bridge stopped, or the bus is shutting down): take nothing more,
            // acknowledge what settles; once the bus has stopped, what is still held (a
            // handler past the deadline) stays pending for another consumer.
            let stopping = self.stop.load(Ordering::SeqCst) || self.bus.core().is_closing();
            let sweep_every =
                (self.options.consumer_idle / 2).clamp(OBSERVE_EVERY, Duration::from_secs(60));
            let refresh = last_refresh.elapsed() >= self.options.claim_idle / 4;
            let claim = last_claim.elapsed() >= self.options.claim_idle / 2;
            let sweep = last_swept.elapsed() >= sweep_every;
            let observe = last_observed.is_none_or(|at| at.elapsed() >= OBSERVE_EVERY);
            let renew = last_renewed.elapsed() >= LEASE / 3;
            let aside =
                stopping || !buried.is_empty() || refresh || claim || sweep || observe || renew;
            let mut entries = Vec::new();
            if aside && in_flight.is_empty() {
                if !buried.is_empty() {
                    // Kept in the dead-letter stream first, then acknowledged: a crash in
                    // between leaves the entry pending, never lost.
                    let kept = !self.options.dead_letter_stream || self.write_dead(link, &buried);
                    for (entry, _, _) in buried.drain(..) {
                        if kept {
                            acks.push((entry.id, None));
                        } else {
                            self.held.remove(&entry.id);
                        }
                    }
                }
                if stopping {
                    if !acks.is_empty() {
                        let mut pipe = redis::pipe();
                        self.stage_acks(&mut pipe, &acks);
                        let acked: redis::RedisResult<()> = link.run(|c| pipe.query(c));
                        if acked.is_ok() {
                            self.acked(&mut acks);
                        }
                    }
                    if self.held.is_empty()
                        || (self.bus.core().is_stopped() && self.settled.is_empty())
                    {
                        return;
                    }
                    backoff = Duration::from_millis(1);
                    continue;
                }
                // The entries it holds must not look idle to other consumers (nor to its own
                // claims): they are running, waiting for a retry, or parked.
                if refresh {
                    last_refresh = std::time::Instant::now();
                    self.refresh(link);
                }
                if claim {
                    last_claim = std::time::Instant::now();
                    entries.extend(self.claim(link));
                }
                if sweep {
                    last_swept = std::time::Instant::now();
                    self.remove_idle_consumers(link);
                }
                if observe {
                    last_observed = Some(std::time::Instant::now());
                    self.observe(link);
                }
                if renew {
                    last_renewed = std::time::Instant::now();
                    if !renew_lease(link, lease, &self.token, false) {
                        self.counters.lease_lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // How many reads to keep in flight: none while something else waits for the
            // connection, one while paging through its own pending list (each page starts
            // where the last ended) or when each page needs another round trip (the dedup
            // kept in Redis), two otherwise.
            let depth = if aside && !in_flight.is_empty() {
                0
            } else if recover_from.is_some() || self.options.seen_ttl.is_some() {
                1
            } else {
                2
            };
            let mut reply = None;
            while in_flight.len() < depth {
                let from = recover_from.as_deref().unwrap_or(">");
                match self.send_read(link, &mut acks, from) {
                    Ok(sent) => in_flight.push_back(sent),
                    Err(e) => {
                        reply = Some((Err(e), false));
                        break;
                    }
                }
            }
            let (reply, recovering) = match reply {
                Some(failed) => failed,
                None => match in_flight.pop_front() {
                    Some(sent) => {
                        let recovering = sent.recovering;
                        (self.receive(link, sent, &mut acks), recovering)
                    }
                    None => continue,
                },
            };
            if reply.is_err() && link.connection.is_none() {
                // The connection is gone, and with it the replies to what was sent ahead.
                for sent in in_flight.drain(..) {
                    acks.extend(sent.acks);
                }
            }
            match reply {
                Ok(reply) => {
                    backoff = Duration::ZERO;
                    let page = read_entries(reply);
                    if recovering {
                        // An empty page: the whole own pending list has been read.
                        recover_from = page.last().map(|e| e.id.clone());
                    }
                    entries.extend(
                        page.into_iter()
                            .filter(|e| !self.held.contains(&e.id))
                            .map(|e| (e, 1)),
                    );
                }
                Err(e) if e.code() == Some("NOGROUP") => {
                    // The stream was deleted, or a Redis without persistence restarted: the
                    // group is made again from the stream's start, which loses nothing still
                    // in it (what was handled already is dropped by event id).
                    self.counters.read_error(&e);
                    if in_flight.is_empty() {
                        self.recreate_group(link);
                    }
                    recover_from = Some("0".to_owned());
                    backoff = Duration::from_millis(10);
                }
                // Lost the server: try again, waiting longer each time, up to a second.
                Err(e) => {
                    self.counters.read_error(&e);
                    recover_from = Some("0".to_owned());
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                }
            }
            if entries.is_empty() {
                continue;
            }
            let seen = self.seen_in_redis(link, &entries);
            let page: Page = entries
                .into_iter()
                .map(|(entry, deliveries)| {
                    self.held.insert(entry.id.clone());
                    let seen = seen.contains(&entry.id);
                    (entry, deliveries, seen)
                })
                .collect();
            // Waits while the publishing thread is a page behind.
            if self.pages.send(page).is_err() {
                return;
            }
        }
    }

    /// Sends the acknowledgements of `acks` (taking them) and a read from `from`, without
    /// waiting for the replies.
    fn send_read(&self, link: &mut Link, acks: &mut Acks, from: &str) -> redis::RedisResult<Sent> {
        let mut pipe = redis::pipe();
        let before = self.stage_acks(&mut pipe, acks);
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.options.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(from);
        let packed = pipe.get_packed_pipeline();
        link.run(|c| c.send_packed_command(&packed))?;
        Ok(Sent {
            acks: std::mem::take(acks),
            before,
            recovering: from != ">",
        })
    }

    /// Receives the replies to `sent`: its acknowledgements (done, or back into `acks` to be
    /// sent again when one failed), then its read's, which it returns.
    fn receive(
        &mut self,
        link: &mut Link,
        mut sent: Sent,
        acks: &mut Acks,
    ) -> redis::RedisResult<redis::Value> {
        let mut acked = true;
        for _ in 0..sent.before {
            match link
                .run(|c| c.recv_response())
                .and_then(redis::Value::extract_error)
            {
                Ok(_) => {}
                Err(e) if link.connection.is_none() => {
                    acks.append(&mut sent.acks);
                    return Err(e);
                }
                Err(_) => acked = false,
            }
        }
        if acked {
            self.acked(&mut sent.acks);
        } else {
            acks.append(&mut sent.acks);
        }
        link.run(|c| c.recv_response())
            .and_then(redis::Value::extract_error)
    }

    /// Observes the group: its lag and pending count (`XINFO GROUPS`), and how long the first
    /// of its pending entries has waited since it was delivered (`XPENDING`, extended form).
    fn observe(&self, link: &mut Link) {
        let (stream, group) = (&self.stream, &self.options.group);
        let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
            link.run(|c| c.xinfo_groups(stream));
        let Some(info) = groups
            .ok()
            .and_then(|g| g.groups.into_iter().find(|g| &g.name == group))
        else {
            return;
        };
        let oldest: redis::RedisResult<redis::Value> = link.run(|c| {
            redis::cmd("XPENDING")
                .arg(stream)
                .arg(group)
                .arg("-")
                .arg("+")
                .arg(1)
                .query(c)
        });
        let idle = match oldest {
            Ok(redis::Value::Array(rows)) => match rows.first() {
                Some(redis::Value::Array(row)) => match row.get(2) {
                    Some(redis::Value::Int(ms)) => u64::try_from(*ms).unwrap_or(0),
                    _ => 0,
                },
                _ => 0,
            },
            _ => 0,
        };
        // Redis counts every entry added against the group's reads: once the group has read
        // up to the stream's last entry, what its lag still counts was trimmed unread.
        let mut both = redis::pipe();
        both.atomic().xinfo_groups(stream).xinfo_stream(stream);
        let caught_up: redis::RedisResult<(
            redis::streams::StreamInfoGroupsReply,
            redis::streams::StreamInfoStreamReply,
        )> = link.run(|c| both.query(c));
        let trimmed = caught_up.ok().and_then(|(groups, info)| {
            let g = groups.groups.into_iter().find(|g| &g.name == group)?;
            (g.last_delivered_id == info.last_generated_id)
                .then_some(g.lag)
                .flatten()
        });
        let mut status = self.status.lock();
        status.lag = info.lag.map(|n| n as u64);
        status.pending = info.pending as u64;
        status.oldest_pending_idle_ms = idle;
        if let Some(trimmed) = trimmed {
            status.trimmed_unread = trimmed as u64;
        }
    }

    /// The key that says event `id` was handled by the group.
    fn seen_key(&self, id: crate::event::EventId) -> String {
        format!("{}:seen:{}:{id}", self.stream, self.options.group)
    }

    /// Of `entries`, those whose event the group handled already, as Redis remembers
    /// ([`ImportOptions::dedup_in_redis`]; none without it, or when Redis does not answer).
    fn seen_in_redis(
        &self,
        link: &mut Link,
        entries: &[(Entry, u64)],
    ) -> std::collections::HashSet<String> {
        #[derive(Deserialize)]
        struct IdOnly {
            envelope: EnvelopeId,
        }
        #[derive(Deserialize)]
        struct EnvelopeId {
            id: crate::event::EventId,
        }
        let mut seen = std::collections::HashSet::new();
        if self.options.seen_ttl.is_none() || entries.is_empty() {
            return seen;
        }
        let ids: Vec<(&str, crate::event::EventId)> = entries
            .iter()
            .filter_map(|(entry, _)| {
                let id = serde_json::from_slice::<IdOnly>(&entry.m).ok()?.envelope.id;
                Some((entry.id.as_str(), id))
            })
            .collect();
        let mut pipe = redis::pipe();
        for (_, id) in &ids {
            pipe.exists(self.seen_key(*id));
        }
        let found: redis::RedisResult<Vec<bool>> = link.run(|c| pipe.query(c));
        if let Ok(found) = found {
            for ((entry, _), found) in ids.into_iter().zip(found) {
                if found {
                    seen.insert(entry.to_owned());
                }
            }
        }
        seen
    }

    /// Writes the entries it dead-lettered to the dead-letter stream, with the reason and why;
    /// whether the stream has them.
    fn write_dead(&self, link: &mut Link, buried: &[(Entry, &'static str, String)]) -> bool {
        let dead = dead_stream(&self.stream);
        let mut pipe = redis::pipe();
        for (entry, reason, why) in buried {
            pipe.xadd(
                &dead,
                "*",
                &[
                    ("m", entry.m.as_slice()),
                    ("reason", reason.as_bytes()),
                    ("error", why.as_bytes()),
                    ("entry", entry.id.as_bytes()),
                    ("group", self.options.group.as_bytes()),
                ],
            )
            .ignore();
        }
        let written: redis::RedisResult<()> = link.run(|c| pipe.query(c));
        if written.is_ok() {
            self.counters
                .dead_stream_writes
                .fetch_add(buried.len() as u64, Ordering::Relaxed);
        }
        written.is_ok()
    }

    /// Removes the group's consumers that are idle past the bound, hold nothing and have no
    /// live lease on their name.
    fn remove_idle_consumers(&self, link: &mut Link) {
        let (stream, group) = (&self.stream, &self.options.group);
        let consumers: redis::RedisResult<redis::streams::StreamInfoConsumersReply> =
            link.run(|c| c.xinfo_consumers(stream, group));
        let Ok(consumers) = consumers else {
            return;
        };
        let idle = self.options.consumer_idle.as_millis();
        for consumer in consumers.consumers {
            if consumer.name == self.consumer
                || consumer.pending > 0
                || (consumer.idle as u128) < idle
            {
                continue;
            }
            let key = lease_key(stream, group, &consumer.name);
            let live: redis::RedisResult<bool> = link.run(|c| c.exists(&key));
            if !matches!(live, Ok(false)) {
                continue;
            }
            let removed: redis::RedisResult<i64> = link.run(|c| {
                redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(stream)
                    .arg(group)
                    .arg(&consumer.name)
                    .query(c)
            });
            if removed.is_ok() {
                self.counters
                    .consumers_removed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Makes the consumer group again (from the stream's start), counted when it was gone.
    fn recreate_group(&self, link: &mut Link) {
        let (stream, group) = (&self.stream, &self.options.group);
        let created: redis::RedisResult<()> =
            link.run(|c| c.xgroup_create_mkstream(stream, group, "0"));
        if created.is_ok() {
            self.counters
                .group_recreations
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Resets the idle time of the entries it holds, without counting a delivery (`XCLAIM …
    /// JUSTID`): so that neither another consumer nor its own claim takes them while they run.
    fn refresh(&self, link: &mut Link) {
        if self.held.is_empty() {
            return;
        }
        let held: Vec<&String> = self.held.iter().collect();
        for ids in held.chunks(REFRESH_CHUNK) {
            let _: redis::RedisResult<redis::Value> = link.run(|c| {
                redis::cmd("XCLAIM")
                    .arg(&self.stream)
                    .arg(&self.options.group)
                    .arg(&self.consumer)
                    .arg(0)
                    .arg(ids)
                    .arg("JUSTID")
                    .query(c)
            });
        }
    }

    /// Takes over entries other consumers left pending past the claim time, with how often
    /// each was delivered: one pass over the whole pending list, page by page.
    fn claim(&mut self, link: &mut Link) -> Vec<(Entry, u64)> {
        let idle = u64::try_from(self.options.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let (stream, group, consumer) = (&self.stream, &self.options.group, &self.consumer);
        let mut cursor = "0-0".to_owned();
        let mut claimed = Vec::new();
        loop {
            let page: redis::RedisResult<redis::streams::StreamAutoClaimReply> = link.run(|c| {
                c.xautoclaim_options(
                    stream,
                    group,
                    consumer,
                    idle,
                    &cursor,
                    redis::streams::StreamAutoClaimOptions::default().count(CLAIM_COUNT),
                )
            });
            let Ok(page) = page else {
                break;
            };
            claimed.extend(page.claimed);
            cursor = page.next_stream_id;
            if cursor == "0-0" || self.stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let others: Vec<_> = claimed
            .into_iter()
            .filter(|entry| !self.held.contains(&entry.id))
            .map(|entry| Entry {
                m: entry.get::<Vec<u8>>("m").unwrap_or_default(),
                id: entry.id,
            })
            .collect();
        self.counters
            .claimed
            .fetch_add(others.len() as u64, Ordering::Relaxed);
        others
            .into_iter()
            .map(|entry| {
                let deliveries = self.deliveries(link, &entry.id);
                (entry, deliveries)
            })
            .collect()
    }

    /// How many times entry `id` has been delivered (from the group's pending list).
    fn deliveries(&self, link: &mut Link, id: &str) -> u64 {
        let pending: redis::RedisResult<redis::Value> = link.run(|c| {
            redis::cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.options.group)
                .arg(id)
                .arg(id)
                .arg(1)
                .query(c)
        });
        match pending {
            Ok(redis::Value::Array(rows)) => match rows.first() {
                Some(redis::Value::Array(row)) => match row.get(3) {
                    Some(redis::Value::Int(n)) => *n as u64,
                    _ => 1,
                },
                _ => 1,
            },
            _ => 1,
        }
    }

    /// Adds to `pipe` what acknowledges `acks`: with the dedup kept in Redis, each event is
    /// recorded as seen first, then the entries are acknowledged (a crash in between handles
    /// nothing twice).
    /// How many commands it added.
    fn stage_acks(&self, pipe: &mut redis::Pipeline, acks: &Acks) -> usize {
        if acks.is_empty() {
            return 0;
        }
        let mut commands = 1;
        if let Some(ttl) = self.options.seen_ttl {
            let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            for id in acks.iter().filter_map(|(_, event)| *event) {
                pipe.cmd("SET")
                    .arg(self.seen_key(id))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl);
                commands += 1;
            }
        }
        let ids: Vec<&str> = acks.iter().map(|(id, _)| id.as_str()).collect();
        pipe.xack(&self.stream, &self.options.group, &ids);
        commands
    }

    /// Forgets the entries of `acks`: Redis has acknowledged them.
    fn acked(&mut self, acks: &mut Acks) {
        self.counters
            .acked
            .fetch_add(acks.len() as u64, Ordering::Relaxed);
        for (id, _) in acks.drain(..) {
            self.held.remove(&id);
        }
    }
}

impl Publisher {
    /// Takes the pages the reader hands over until it stops; once the bus refuses a publish
    /// (it is shutting down), leaves every entry pending.
    fn run<E: Event>(mut self, pages: crossbeam_channel::Receiver<Page>) {
        let mut refused = false;
        for page in pages {
            let mut ready = Vec::with_capacity(page.len());
            for (entry, deliveries, seen) in page {
                if refused {
                    let _ = self.settle.send(Settle::Leave(entry.id));
                    continue;
                }
                match self.take::<E>(&entry, deliveries, seen) {
                    Taken::Publish(event, envelope) => ready.push((entry.id, event, envelope)),
                    Taken::Ack => {
                        let _ = self.settle.send(Settle::Ack(entry.id, None));
                    }
                    Taken::Buried(reason, why) => {
                        let _ = self.settle.send(Settle::Buried(entry, reason, why));
                    }
                }
            }
            refused = refused || !self.publish(ready);
        }
    }

    /// Publishes the entries of one read, in order, as batches (a batch per run of entries
    /// from one source service), each with a tracker that tells the reader to acknowledge it
    /// once every delivery of it settled (or to leave it pending: one never ran, at shutdown's
    /// deadline). `false` when the bus is shutting down: what was not accepted is left pending
    /// for another consumer.
    fn publish<E: Event>(&mut self, ready: Vec<(String, E, Envelope)>) -> bool {
        let core = self.bus.core();
        let mut ready = ready.into_iter().peekable();
        while let Some(first) = ready.next() {
            let source = first.2.source_id();
            let mut run = vec![first];
            while let Some(next) = ready.next_if(|(_, _, e)| e.source_id() == source) {
                run.push(next);
            }
            let mut trackers = Vec::with_capacity(run.len());
            let items: Vec<(E, Stamp)> = run
                .into_iter()
                .map(|(id, event, envelope)| {
                    let tracking = crate::track::Tracking::new();
                    let seen = self.options.seen_ttl.map(|_| envelope.id());
                    trackers.push((id, seen, Tracker(tracking.clone())));
                    (event, Stamp::Given(envelope.with_tracker(tracking)))
                })
                .collect();
            if core.publish_batch(source, items).is_err() {
                for (id, _, _) in trackers {
                    let _ = self.settle.send(Settle::Leave(id));
                }
                for (id, _, _) in ready {
                    let _ = self.settle.send(Settle::Leave(id));
                }
                return false;
            }
            self.counters
                .imported
                .fetch_add(trackers.len() as u64, Ordering::Relaxed);
            for (id, seen, tracker) in trackers {
                let settle = self.settle.clone();
                tracker.on_complete(move |c| {
                    let _ = settle.send(if c.left == 0 && c.abandoned == 0 {
                        Settle::Ack(id, seen)
                    } else {
                        Settle::Leave(id)
                    });
                });
            }
        }
        true
    }

    /// Decodes one entry and decides what becomes of it.
    fn take<E: Event>(&mut self, entry: &Entry, deliveries: u64, seen: bool) -> Taken<E> {
        let bytes = entry.m.as_slice();
        let core = self.bus.core();
        let wire = match decode::<E>(core, bytes) {
            Ok(wire) => wire,
            Err((envelope, why)) => {
                // Kept with its raw text and acknowledged: it would never decode.
                self.counters
                    .decode_failures
                    .fetch_add(1, Ordering::Relaxed);
                core.bury_unpublished(
                    E::NAME,
                    E::VERSION,
                    envelope,
                    bytes,
                    IMPORT,
                    why.clone(),
                    true,
                    None,
                );
                return Taken::Buried("undecodable", why);
            }
        };
        if deliveries > u64::from(self.options.max_deliveries) {
            let why = format!(
                "delivered {deliveries} times, more than the {} allowed",
                self.options.max_deliveries
            );
            core.bury_unpublished(
                E::NAME,
                E::VERSION,
                Some(wire.envelope),
                bytes,
                IMPORT,
                why.clone(),
                false,
                Some(republish::<E>),
            );
            return Taken::Buried("retries_exhausted", why);
        }
        if seen
            || !self
                .recent
                .insert(wire.envelope.id(), self.options.dedup_window)
        {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return Taken::Ack;
        }
        Taken::Publish(wire.payload, wire.envelope)
    }
}
