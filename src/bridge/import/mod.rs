//! Importing: the options, the consumer name's lease, and the two threads of an import — the
//! reader ([`reader`]) and the publisher ([`publisher`]).

use super::*;

impl Bridge {
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
            stop: self.stop.clone(),
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

mod publisher;
mod reader;

use publisher::Publisher;
use reader::Importer;
