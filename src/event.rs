//! Events and the envelope every delivery carries.
//!
//! Ground rules: an [`EventId`] is minted on the publishing thread from a thread-local block of
//! sequence numbers (one shared `fetch_add` per [`ID_BLOCK`] ids) and a cheap clock (a TSC read
//! through `quanta`, anchored once to the wall clock). Source and event names are interned into
//! a process-wide table that only grows, so an [`Envelope`] carries a 4-byte name id instead of a
//! string.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroU64;
use std::sync::{LazyLock, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::sync::{Arc, Ordering};
use crate::track::Tracking;

/// An integration event: a data contract between services.
///
/// Events are plain serde types with a stable [`NAME`](Event::NAME) and a
/// [`VERSION`](Event::VERSION). The name identifies the type across restarts and processes
/// (dead-letter files, bridges), so it must not change when the Rust type is renamed.
///
/// # Examples
///
/// ```
/// use microbus::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct OrderCreated { order_id: u64, total_cents: i64 }
///
/// impl Event for OrderCreated {
///     const NAME: &'static str = "OrderCreated";
/// }
/// assert_eq!(OrderCreated::VERSION, 1);
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable name of the event type, for example `"OrderCreated"`.
    const NAME: &'static str;
    /// The version of the event's schema. Bump it when the payload changes incompatibly.
    const VERSION: u32 = 1;
}

/// How many ids a thread takes from the shared counter at a time.
pub(crate) const ID_BLOCK: u64 = 4096;

const SEQ_BITS: u32 = 36;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const NONCE_BITS: u32 = 16;
/// Bits of the millisecond's fraction beyond the 12 in the high half, kept in the low half.
const FRAC_LOW_BITS: u32 = 10;
const FRAC_LOW_SHIFT: u32 = 62 - FRAC_LOW_BITS;
const VARIANT: u64 = 0b10 << 62;
const VERSION7: u64 = 0x7 << 12;

/// A unique, time-sortable 128-bit event id in the UUIDv7 layout.
///
/// The high 64 bits hold the Unix time in milliseconds (48 bits), the version nibble `7` and a
/// 12-bit fraction of the millisecond; the low 64 bits hold the RFC 9562 variant, 10 more bits
/// of the fraction (22 bits in all: a quarter of a nanosecond), a random per-process nonce and
/// a sequence number. Ids minted on one thread are strictly increasing; ids from different
/// threads are ordered by their time. [`EventId::published_at`] recovers the time.
///
/// It prints and serializes as a UUID string.
///
/// # Examples
///
/// ```
/// use microbus::EventId;
///
/// let a = EventId::new();
/// let b = EventId::new();
/// assert!(a < b);
/// let text = a.to_string();
/// assert_eq!(text.len(), 36);
/// assert_eq!(text.parse::<EventId>().unwrap(), a);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    hi: u64,
    lo: NonZeroU64,
}

impl EventId {
    /// Mints a new id from the current time.
    #[inline]
    pub fn new() -> EventId {
        EventId::at(unix_nanos())
    }

    /// Mints a new id for time `nanos` (since the Unix epoch).
    #[inline]
    pub(crate) fn at(nanos: u64) -> EventId {
        // Units of 2^-22 ms since the epoch: the millisecond and its fraction at once.
        const UNITS_PER_NANO_Q64: u128 = (1u128 << (22 + 64)) / 1_000_000;
        let units = ((u128::from(nanos) * UNITS_PER_NANO_Q64) >> 64) as u64;
        let hi = ((units >> 22) << 16) | VERSION7 | ((units >> FRAC_LOW_BITS) & 0xfff);
        let frac_low = (units & ((1 << FRAC_LOW_BITS) - 1)) << FRAC_LOW_SHIFT;
        EventId {
            hi,
            lo: next_lo() | frac_low,
        }
    }

    /// The id as one 128-bit number.
    pub fn as_u128(self) -> u128 {
        (u128::from(self.hi) << 64) | u128::from(self.lo.get())
    }

    /// Rebuilds an id from [`EventId::as_u128`]. Returns `None` when the low half is zero,
    /// which no minted id has.
    pub fn from_u128(value: u128) -> Option<EventId> {
        let lo = NonZeroU64::new(value as u64)?;
        Some(EventId {
            hi: (value >> 64) as u64,
            lo,
        })
    }

    /// The time at which the id was minted (for an event: when it was published), to within
    /// a nanosecond.
    pub fn published_at(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.unix_nanos())
    }

    /// [`published_at`](Self::published_at) in nanoseconds since the Unix epoch.
    #[inline]
    pub(crate) fn unix_nanos(self) -> u64 {
        let millis = self.hi >> 16;
        let frac = ((self.hi & 0xfff) << FRAC_LOW_BITS)
            | ((self.lo.get() >> FRAC_LOW_SHIFT) & ((1 << FRAC_LOW_BITS) - 1));
        // Rounded up: minting rounded the fraction down.
        millis * 1_000_000 + (frac * 1_000_000).div_ceil(1 << 22)
    }
}

impl Default for EventId {
    fn default() -> Self {
        EventId::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.as_u128();
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (v >> 96) as u32,
            (v >> 80) as u16,
            (v >> 64) as u16,
            (v >> 48) as u16,
            (v as u64) & 0xffff_ffff_ffff
        )
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

/// The error returned when a string is not a UUID-formatted [`EventId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseEventIdError(());

impl fmt::Display for ParseEventIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "not an event id: expected 32 hex digits as 8-4-4-4-12, with a non-zero low half",
        )
    }
}

impl std::error::Error for ParseEventIdError {}

impl std::str::FromStr for EventId {
    type Err = ParseEventIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != 36 || [8, 13, 18, 23].iter().any(|&i| bytes[i] != b'-') {
            return Err(ParseEventIdError(()));
        }
        let mut value: u128 = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                continue;
            }
            let digit = (b as char).to_digit(16).ok_or(ParseEventIdError(()))?;
            value = (value << 4) | u128::from(digit);
        }
        EventId::from_u128(value).ok_or(ParseEventIdError(()))
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

struct Clock {
    source: quanta::Clock,
    anchor_raw: u64,
    anchor_unix_nanos: u64,
}

static CLOCK: OnceLock<Clock> = OnceLock::new();

/// Nanoseconds since the Unix epoch, from a TSC read scaled against one wall-clock anchor.
#[inline]
pub(crate) fn unix_nanos() -> u64 {
    let clock = CLOCK.get_or_init(|| {
        let source = quanta::Clock::new();
        let anchor_raw = source.raw();
        let anchor_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Clock {
            source,
            anchor_raw,
            anchor_unix_nanos,
        }
    });
    clock.anchor_unix_nanos
        + clock
            .source
            .delta_as_nanos(clock.anchor_raw, clock.source.raw())
}

static NEXT_BLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// The next low half of an id this thread mints, and the end of its block.
    static LO: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// The low half of the next id without its time bits: variant, process nonce, and a sequence
/// number from this thread's block.
#[inline]
fn next_lo() -> NonZeroU64 {
    LO.with(|cell| {
        let (mut next, mut end) = cell.get();
        if next == end {
            let seq = NEXT_BLOCK.fetch_add(ID_BLOCK, Ordering::Relaxed) & SEQ_MASK;
            next = VARIANT | (process_nonce() << SEQ_BITS) | seq;
            end = next + ID_BLOCK;
        }
        cell.set((next + 1, end));
        NonZeroU64::new(next).expect("the variant bits make the low half non-zero")
    })
}

fn process_nonce() -> u64 {
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(|| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(std::process::id().into());
        hasher.finish() & ((1 << NONCE_BITS) - 1)
    })
}

/// An interned name (of a service): a small id into a process-wide table that only grows.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct NameId(u32);

struct Interner {
    names: Vec<&'static str>,
    ids: HashMap<&'static str, u32>,
}

static INTERNER: LazyLock<RwLock<Interner>> = LazyLock::new(|| {
    RwLock::new(Interner {
        names: Vec::new(),
        ids: HashMap::new(),
    })
});

impl NameId {
    /// Interns `name`. Each distinct name is stored once for the life of the process.
    pub(crate) fn intern(name: &str) -> NameId {
        if let Some(&id) = INTERNER
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .ids
            .get(name)
        {
            return NameId(id);
        }
        let mut table = INTERNER.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = table.ids.get(name) {
            return NameId(id);
        }
        let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
        let id = u32::try_from(table.names.len()).expect("fewer than 2^32 distinct names");
        table.names.push(leaked);
        table.ids.insert(leaked, id);
        NameId(id)
    }

    /// The name this id stands for.
    pub(crate) fn as_str(self) -> &'static str {
        INTERNER.read().unwrap_or_else(|e| e.into_inner()).names[self.0 as usize]
    }
}

impl fmt::Debug for NameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The partition key of an event: events with equal keys go to the same shard, in order.
///
/// Integers are used as they are; strings are hashed with 64-bit FNV-1a, which is stable across
/// processes and releases, so a key means the same shard wherever the same worker count is used.
///
/// # Examples
///
/// ```
/// use microbus::PartitionKey;
///
/// assert_eq!(PartitionKey::from(42u64).get(), 42);
/// assert_eq!(PartitionKey::from("order-7"), PartitionKey::from(String::from("order-7")));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartitionKey(u64);

impl PartitionKey {
    /// The key as a number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The shard for this key among `shards` shards.
    pub(crate) fn shard(self, shards: usize) -> usize {
        // A splitmix64 finalizer spreads sequential keys, then a multiply maps onto the range.
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        ((u128::from(x) * shards as u128) >> 64) as usize
    }
}

impl fmt::Debug for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartitionKey({})", self.0)
    }
}

macro_rules! key_from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for PartitionKey {
            fn from(value: $t) -> Self {
                PartitionKey(value as u64)
            }
        }
    )*};
}
key_from_int!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

impl From<&str> for PartitionKey {
    fn from(value: &str) -> Self {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in value.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        PartitionKey(hash)
    }
}

impl From<&String> for PartitionKey {
    fn from(value: &String) -> Self {
        PartitionKey::from(value.as_str())
    }
}

impl From<String> for PartitionKey {
    fn from(value: String) -> Self {
        PartitionKey::from(value.as_str())
    }
}

impl From<EventId> for PartitionKey {
    fn from(value: EventId) -> Self {
        PartitionKey(value.hi ^ value.lo.get())
    }
}

/// String headers attached to an event. Allocated only when an event has any. Serialized as a
/// map.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InOrder;
        impl<'de> serde::de::Visitor<'de> for InOrder {
            type Value = Headers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of header names to strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Headers, A::Error> {
                let mut headers = Headers::default();
                while let Some((name, value)) = map.next_entry::<String, String>()? {
                    headers.insert(name, value);
                }
                Ok(headers)
            }
        }
        deserializer.deserialize_map(InOrder)
    }
}

impl Headers {
    /// The value of header `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets header `name`, replacing an earlier value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| *k == name) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((name, value)),
        }
    }

    /// The headers in the order they were first set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The number of headers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Options for one publish: partition key, correlation, causation and headers.
///
/// # Examples
///
/// ```
/// use microbus::{EventId, Publish};
///
/// let trace = EventId::new();
/// let options = Publish::keyed(42u64).correlation(trace).header("tenant", "acme");
/// # let _ = options;
/// ```
///
/// A clone carries the key, correlation, causation and headers; the tracking of a tracked
/// publish belongs to the call that asked for it and is never cloned.
#[derive(Default)]
pub struct Publish {
    pub(crate) key: Option<PartitionKey>,
    pub(crate) correlation: Option<EventId>,
    pub(crate) causation: Option<EventId>,
    pub(crate) headers: Option<Box<Extra>>,
}

impl Publish {
    /// No key, a fresh correlation, no headers: what plain `publish` uses.
    pub fn new() -> Publish {
        Publish::default()
    }

    /// Options with partition key `key`: same key, same shard, publish order kept.
    pub fn keyed(key: impl Into<PartitionKey>) -> Publish {
        Publish::new().key(key)
    }

    /// Sets the partition key.
    pub fn key(mut self, key: impl Into<PartitionKey>) -> Publish {
        self.key = Some(key.into());
        self
    }

    /// Joins an existing correlation (a conversation, a trace) instead of starting one.
    pub fn correlation(mut self, id: EventId) -> Publish {
        self.correlation = Some(id);
        self
    }

    /// Names the event that caused this one.
    pub fn causation(mut self, id: EventId) -> Publish {
        self.causation = Some(id);
        self
    }

    /// Sets a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Publish {
        self.headers
            .get_or_insert_with(Default::default)
            .headers
            .insert(name, value);
        self
    }

    /// Attaches `tracker` to the event's envelope (kept out of the hot path: only tracked
    /// publishes allocate for it).
    pub(crate) fn tracked(mut self, tracker: Arc<Tracking>) -> Publish {
        self.headers.get_or_insert_with(Default::default).tracker = Some(tracker);
        self
    }
}

impl Clone for Publish {
    fn clone(&self) -> Publish {
        Publish {
            key: self.key,
            correlation: self.correlation,
            causation: self.causation,
            headers: Extra::clone_untracked(&self.headers),
        }
    }
}

/// What an envelope carries only when it is used: headers, and the tracking of a tracked
/// publish. Boxed, so that an envelope without them stays small.
#[derive(Default)]
pub(crate) struct Extra {
    pub(crate) headers: Headers,
    pub(crate) tracker: Option<Arc<Tracking>>,
}

impl Extra {
    /// A copy of the headers without the tracking: a tracker is attached by the one publish
    /// call that asks for it, so no copy of an envelope or of options may re-arm it.
    fn clone_untracked(extra: &Option<Box<Extra>>) -> Option<Box<Extra>> {
        let headers = &extra.as_ref()?.headers;
        (!headers.is_empty()).then(|| {
            Box::new(Extra {
                headers: headers.clone(),
                tracker: None,
            })
        })
    }
}

impl fmt::Debug for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish")
            .field("key", &self.key)
            .field("correlation", &self.correlation)
            .field("causation", &self.causation)
            .field("headers", &self.headers.as_ref().map(|e| &e.headers))
            .finish()
    }
}

/// The metadata every event carries: id, correlation, causation, source, time, key, headers.
///
/// Handlers read it through [`Context::envelope`](crate::Context::envelope). A root event (one
/// published outside any handler, without [`Publish::correlation`]) is its own correlation: its
/// correlation id is its id. An event published from a handler through
/// [`Context::publish`](crate::Context::publish) inherits the handled event's correlation id
/// and names it as its causation.
///
/// A clone (or a copy read back with serde) is the same envelope without the tracking of a
/// tracked publish: publishing it again does not count towards the original's [`Tracker`].
///
/// [`Tracker`]: crate::Tracker
pub struct Envelope {
    id: EventId,
    correlation: EventId,
    causation: Option<EventId>,
    key: u64,
    source: NameId,
    has_key: bool,
    extra: Option<Box<Extra>>,
}

impl Clone for Envelope {
    fn clone(&self) -> Envelope {
        Envelope {
            id: self.id,
            correlation: self.correlation,
            causation: self.causation,
            key: self.key,
            source: self.source,
            has_key: self.has_key,
            extra: Extra::clone_untracked(&self.extra),
        }
    }
}

impl PartialEq for Envelope {
    /// Equal envelopes carry the same id, correlation, causation, source, key and headers.
    fn eq(&self, other: &Envelope) -> bool {
        self.id == other.id
            && self.correlation == other.correlation
            && self.causation == other.causation
            && self.source == other.source
            && self.key() == other.key()
            && self.headers() == other.headers()
    }
}

impl Eq for Envelope {}

impl Envelope {
    pub(crate) fn stamp(source: NameId, options: Publish) -> Envelope {
        Envelope::stamp_at(unix_nanos(), source, options)
    }

    /// An envelope whose id carries time `nanos` (for events of one batch, read once).
    #[inline]
    pub(crate) fn stamp_at(nanos: u64, source: NameId, options: Publish) -> Envelope {
        let id = EventId::at(nanos);
        Envelope {
            id,
            correlation: options.correlation.unwrap_or(id),
            causation: options.causation,
            key: options.key.map_or(0, PartitionKey::get),
            has_key: options.key.is_some(),
            source,
            extra: options.headers,
        }
    }

    /// An envelope read back from outside (a dead-letter file), unchanged.
    pub(crate) fn from_parts(
        id: EventId,
        correlation: EventId,
        causation: Option<EventId>,
        source: &str,
        key: Option<u64>,
        headers: Headers,
    ) -> Envelope {
        Envelope {
            id,
            correlation,
            causation,
            key: key.unwrap_or(0),
            has_key: key.is_some(),
            source: NameId::intern(source),
            extra: (!headers.is_empty()).then(|| {
                Box::new(Extra {
                    headers,
                    tracker: None,
                })
            }),
        }
    }

    /// The envelope with `tracker` attached (replacing any), for a tracked publish.
    pub(crate) fn with_tracker(mut self, tracker: Arc<Tracking>) -> Envelope {
        self.extra.get_or_insert_with(Default::default).tracker = Some(tracker);
        self
    }

    /// Whether the envelope has headers or a tracker: the cheap test before either is read.
    #[inline]
    pub(crate) fn has_extra(&self) -> bool {
        self.extra.is_some()
    }

    /// The tracking of a tracked publish, if this is one.
    #[inline]
    pub(crate) fn tracker(&self) -> Option<&Tracking> {
        self.extra.as_ref()?.tracker.as_deref()
    }

    /// The event's unique id.
    pub fn id(&self) -> EventId {
        self.id
    }

    /// The id shared by every event of one conversation: the root event's id, unless the
    /// publisher chose one.
    pub fn correlation_id(&self) -> EventId {
        self.correlation
    }

    /// The id of the event whose handler published this one, if any.
    pub fn causation_id(&self) -> Option<EventId> {
        self.causation
    }

    /// The name of the service that published the event.
    pub fn source(&self) -> &'static str {
        self.source.as_str()
    }

    pub(crate) fn source_id(&self) -> NameId {
        self.source
    }

    /// When the event was published (derived from its id).
    pub fn published_at(&self) -> SystemTime {
        self.id.published_at()
    }

    /// The partition key, if the event was published with one.
    pub fn key(&self) -> Option<PartitionKey> {
        self.has_key.then_some(PartitionKey(self.key))
    }

    /// The event's headers (empty when none were set).
    pub fn headers(&self) -> &Headers {
        static EMPTY: Headers = Headers {
            entries: Vec::new(),
        };
        self.extra.as_ref().map_or(&EMPTY, |e| &e.headers)
    }
}

impl Serialize for Envelope {
    /// The envelope as JSON (or any serde format): `id`, `correlation_id`, `causation_id`,
    /// `source`, `published_at_unix_nanos`, `key` and `headers`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let nanos = self
            .published_at()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut s = serializer.serialize_struct("Envelope", 7)?;
        s.serialize_field("id", &self.id)?;
        s.serialize_field("correlation_id", &self.correlation)?;
        s.serialize_field("causation_id", &self.causation)?;
        s.serialize_field("source", self.source())?;
        s.serialize_field("published_at_unix_nanos", &nanos)?;
        s.serialize_field("key", &self.key().map(PartitionKey::get))?;
        s.serialize_field("headers", self.headers())?;
        s.end()
    }
}

/// What an envelope deserializes from: what [`Envelope`]'s `Serialize` writes
/// (`published_at_unix_nanos` is derived from the id, and ignored).
#[derive(Deserialize)]
struct EnvelopeFields {
    id: EventId,
    correlation_id: EventId,
    causation_id: Option<EventId>,
    source: String,
    key: Option<u64>,
    #[serde(default)]
    headers: Headers,
}

impl<'de> Deserialize<'de> for Envelope {
    /// Reads back what `Serialize` wrote: the same id, correlation, causation, source, key and
    /// headers. A source that is not a valid service name is an error.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let f = EnvelopeFields::deserialize(deserializer)?;
        crate::config::check_name("source", &f.source).map_err(serde::de::Error::custom)?;
        Ok(Envelope::from_parts(
            f.id,
            f.correlation_id,
            f.causation_id,
            &f.source,
            f.key,
            f.headers,
        ))
    }
}

/// How a publish gets its envelope: stamped now from options, or given whole.
pub(crate) enum Stamp {
    New(Publish),
    Given(Envelope),
}

impl Stamp {
    /// Whether the publish is tracked.
    pub(crate) fn is_tracked(&self) -> bool {
        match self {
            Stamp::New(options) => options
                .headers
                .as_ref()
                .is_some_and(|e| e.tracker.is_some()),
            Stamp::Given(envelope) => envelope.tracker().is_some(),
        }
    }

    #[inline]
    pub(crate) fn envelope(self, source: NameId) -> Envelope {
        match self {
            Stamp::New(options) => Envelope::stamp(source, options),
            Stamp::Given(envelope) => envelope,
        }
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Envelope");
        s.field("id", &self.id)
            .field("correlation_id", &self.correlation)
            .field("causation_id", &self.causation)
            .field("source", &self.source);
        if let Some(key) = self.key() {
            s.field("key", &key);
        }
        if let Some(extra) = &self.extra {
            s.field("headers", &extra.headers);
        }
        s.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_increasing_on_one_thread() {
        let ids: Vec<EventId> = (0..10_000).map(|_| EventId::new()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn ids_from_many_threads_are_unique() {
        let handles: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..5_000).map(|_| EventId::new()).collect::<Vec<_>>()))
            .collect();
        let mut all: Vec<EventId> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn id_layout_is_uuid_v7() {
        let id = EventId::new();
        let text = id.to_string();
        assert_eq!(&text[14..15], "7", "version nibble in {text}");
        assert!(
            matches!(&text[19..20], "8" | "9" | "a" | "b"),
            "variant in {text}"
        );
        assert_eq!(text.parse::<EventId>(), Ok(id));
        assert_eq!(EventId::from_u128(id.as_u128()), Some(id));
    }

    #[test]
    fn published_at_is_close_to_now() {
        let before = SystemTime::now() - Duration::from_secs(1);
        let at = EventId::new().published_at();
        let after = SystemTime::now() + Duration::from_secs(1);
        assert!(before <= at && at <= after);
    }

    #[test]
    fn an_id_keeps_its_time_to_the_nanosecond() {
        let base = 1_790_000_000_123_456_789u64;
        for offset in [0u64, 1, 2, 3, 239, 240, 999_999, 1_000_000, 123_456_789] {
            let nanos = base + offset;
            let id = EventId::at(nanos);
            let back = id.unix_nanos();
            assert!(
                back >= nanos && back <= nanos + 1,
                "{nanos} came back as {back}"
            );
            assert_eq!(id.as_u128() >> 76 & 0xf, 7, "version nibble");
        }
        let (a, b) = (EventId::at(base), EventId::at(base + 1));
        assert!(a < b);
        assert!(
            EventId::at(base) > a,
            "the sequence orders ids with equal times"
        );
    }

    #[test]
    fn bad_id_strings_are_rejected() {
        for bad in ["", "0196", "0196a0b2-7c3d-7e4f-8a9b-0c1d2e3f4g5h"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad}");
        }
        assert!(
            "00000000-0000-0000-0000-000000000000"
                .parse::<EventId>()
                .is_err()
        );
    }

    #[test]
    fn id_serializes_as_its_string() {
        let id = EventId::new();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<EventId>(&json).unwrap(), id);
    }

    #[test]
    fn keys_spread_over_shards_and_stay_put() {
        let mut counts = [0usize; 4];
        for k in 0..4_000u64 {
            let shard = PartitionKey::from(k).shard(4);
            assert_eq!(shard, PartitionKey::from(k).shard(4));
            counts[shard] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn names_intern_once() {
        let a = NameId::intern("event-tests-service");
        let b = NameId::intern(&String::from("event-tests-service"));
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "event-tests-service");
    }

    #[test]
    fn headers_serialize_as_a_map_in_order() {
        let mut headers = Headers::default();
        headers.insert("tenant", "acme");
        headers.insert("region", "eu");
        let json = serde_json::to_string(&headers).unwrap();
        assert_eq!(json, r#"{"tenant":"acme","region":"eu"}"#);
        assert_eq!(serde_json::from_str::<Headers>(&json).unwrap(), headers);
    }

    #[test]
    fn envelope_is_small() {
        assert!(std::mem::size_of::<Envelope>() <= 72);
    }
}
