//! Events and the envelope every delivery carries.
//!
//! Ground rules: an [`EventId`] is minted on the publishing thread (see the `id` module).
//! Source and event names are interned into a process-wide table that only grows, so an
//! [`Envelope`] carries a 4-byte name id instead of a string.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{LazyLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub(crate) use crate::id::unix_nanos;
pub use crate::id::{EventId, ParseEventIdError};
use crate::sync::Arc;
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

/// How one event is published: its partition key, correlation, causation and headers (or an
/// envelope given whole), a delay, and whether the publish is tracked.
///
/// Every publish method takes these options in its `_with` form; what the method returns
/// follows from them: the event's [`EventId`], or a [`Tracker`] for a publish made
/// [`tracked`](Publish::tracked).
///
/// # Examples
///
/// ```
/// use microbus::{EventId, Publish};
/// use std::time::Duration;
///
/// let trace = EventId::new();
/// let options = Publish::keyed(42u64)
///     .correlation(trace)
///     .header("tenant", "acme")
///     .delay(Duration::from_secs(5));
/// # let _ = options;
/// ```
///
/// [`Tracker`]: crate::Tracker
pub struct Publish<T: Track = Untracked> {
    pub(crate) stamp: Stamp,
    pub(crate) delay: Option<Duration>,
    track: PhantomData<fn() -> T>,
}

impl Publish {
    /// No key, a fresh correlation, no headers, no delay, untracked: what plain `publish`
    /// uses.
    pub fn new() -> Publish {
        Publish::from_stamp(Stamp::New(Options::default()))
    }

    /// Options with partition key `key`: same key, same shard, publish order kept.
    pub fn keyed(key: impl Into<PartitionKey>) -> Publish {
        Publish::new().key(key)
    }

    /// Publishes with an envelope made elsewhere — read back from a file or received from
    /// another process — keeping its id, correlation, causation, source, key and headers:
    /// the event re-enters the bus as the same event, published by the service the envelope
    /// names. Options set afterwards change the envelope's fields.
    pub fn envelope(envelope: Envelope) -> Publish {
        Publish::from_stamp(Stamp::Given(envelope))
    }

    pub(crate) fn from_stamp(stamp: Stamp) -> Publish {
        Publish {
            stamp,
            delay: None,
            track: PhantomData,
        }
    }

    /// Tracks the publish: it returns a [`Tracker`](crate::Tracker) that completes once every
    /// delivery of the event has settled, with what became of each.
    pub fn tracked(self) -> Publish<Tracked> {
        Publish {
            stamp: self.stamp,
            delay: self.delay,
            track: PhantomData,
        }
    }
}

impl<T: Track> Publish<T> {
    /// Sets the partition key.
    pub fn key(mut self, key: impl Into<PartitionKey>) -> Publish<T> {
        let key = key.into();
        match &mut self.stamp {
            Stamp::New(options) => options.key = Some(key),
            Stamp::Given(envelope) => {
                envelope.key = key.get();
                envelope.has_key = true;
            }
        }
        self
    }

    /// Joins an existing correlation (a conversation, a trace) instead of starting one.
    pub fn correlation(mut self, id: EventId) -> Publish<T> {
        match &mut self.stamp {
            Stamp::New(options) => options.correlation = Some(id),
            Stamp::Given(envelope) => envelope.correlation = id,
        }
        self
    }

    /// Names the event that caused this one.
    pub fn causation(mut self, id: EventId) -> Publish<T> {
        match &mut self.stamp {
            Stamp::New(options) => options.causation = Some(id),
            Stamp::Given(envelope) => envelope.causation = Some(id),
        }
        self
    }

    /// Continues the conversation of the event `cause` is the envelope of: its correlation,
    /// and it as the cause (for an event a batch handler publishes about one event of its
    /// [`Batch`](crate::Batch)).
    pub fn caused_by(self, cause: &Envelope) -> Publish<T> {
        self.correlation(cause.correlation_id())
            .causation(cause.id())
    }

    /// Sets a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Publish<T> {
        let extra = match &mut self.stamp {
            Stamp::New(options) => &mut options.extra,
            Stamp::Given(envelope) => &mut envelope.extra,
        };
        extra
            .get_or_insert_with(Default::default)
            .headers
            .insert(name, value);
        self
    }

    /// Delivers the event after `delay` (any `Duration`, up to `Duration::MAX`): it is
    /// accepted now — counted by `flush` and `shutdown` — and waits on the timer, then goes
    /// to its shard; the publish never waits for room. Shutdown does not wait for a delayed
    /// event that falls due after its deadline: it is reported as left.
    pub fn delay(mut self, delay: Duration) -> Publish<T> {
        self.delay = Some(delay);
        self
    }

    /// The stamp and the delay, for the bus.
    pub(crate) fn into_parts(self) -> (Stamp, Option<Duration>) {
        (self.stamp, self.delay)
    }
}

impl Default for Publish {
    fn default() -> Publish {
        Publish::new()
    }
}

impl<T: Track> Clone for Publish<T> {
    fn clone(&self) -> Publish<T> {
        Publish {
            stamp: match &self.stamp {
                Stamp::New(options) => Stamp::New(Options {
                    extra: Extra::clone_untracked(&options.extra),
                    ..*options
                }),
                Stamp::Given(envelope) => Stamp::Given(envelope.clone()),
            },
            delay: self.delay,
            track: PhantomData,
        }
    }
}

impl<T: Track> fmt::Debug for Publish<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Publish");
        match &self.stamp {
            Stamp::New(options) => s
                .field("key", &options.key)
                .field("correlation", &options.correlation)
                .field("causation", &options.causation)
                .field("headers", &options.extra.as_ref().map(|e| &e.headers)),
            Stamp::Given(envelope) => s.field("envelope", envelope),
        };
        s.field("delay", &self.delay)
            .field("tracked", &T::TRACKED)
            .finish()
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Whether a publish is tracked, which decides what it returns: [`Untracked`] (the default)
/// returns the event's [`EventId`], [`Tracked`] a [`Tracker`](crate::Tracker).
pub trait Track: sealed::Sealed {
    /// What a publish with these options returns.
    type Receipt;
    #[doc(hidden)]
    const TRACKED: bool;
    #[doc(hidden)]
    fn receipt(id: EventId, tracker: Option<crate::Tracker>) -> Self::Receipt;
}

/// An untracked publish (the default): it returns the event's [`EventId`].
#[derive(Debug, Clone, Copy)]
pub enum Untracked {}

/// A tracked publish (see [`Publish::tracked`]): it returns a [`Tracker`](crate::Tracker).
#[derive(Debug, Clone, Copy)]
pub enum Tracked {}

impl sealed::Sealed for Untracked {}
impl sealed::Sealed for Tracked {}

impl Track for Untracked {
    type Receipt = EventId;
    const TRACKED: bool = false;
    #[inline]
    fn receipt(id: EventId, _: Option<crate::Tracker>) -> EventId {
        id
    }
}

impl Track for Tracked {
    type Receipt = crate::Tracker;
    const TRACKED: bool = true;
    fn receipt(_: EventId, tracker: Option<crate::Tracker>) -> crate::Tracker {
        tracker.expect("a tracked publish makes a tracker")
    }
}

/// The fields of an envelope stamped at publish time: key, correlation, causation, headers.
#[derive(Default)]
pub(crate) struct Options {
    pub(crate) key: Option<PartitionKey>,
    pub(crate) correlation: Option<EventId>,
    pub(crate) causation: Option<EventId>,
    pub(crate) extra: Option<Box<Extra>>,
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
    #[cfg(test)]
    pub(crate) fn stamp(source: NameId, options: Options) -> Envelope {
        Envelope::stamp_at(unix_nanos(), source, options)
    }

    /// An envelope whose id carries time `nanos` (for events of one batch, read once).
    #[inline]
    pub(crate) fn stamp_at(nanos: u64, source: NameId, options: Options) -> Envelope {
        let id = EventId::at(nanos);
        Envelope {
            id,
            correlation: options.correlation.unwrap_or(id),
            causation: options.causation,
            key: options.key.map_or(0, PartitionKey::get),
            has_key: options.key.is_some(),
            source,
            extra: options.extra,
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

    /// Takes the tracking of a tracked publish out of the envelope.
    pub(crate) fn take_tracker(&mut self) -> Option<Arc<Tracking>> {
        self.extra.as_mut()?.tracker.take()
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
    New(Options),
    Given(Envelope),
}

impl Stamp {
    /// Attaches `tracker` (kept out of the hot path: only tracked publishes allocate for it).
    pub(crate) fn track(&mut self, tracker: Arc<Tracking>) {
        let extra = match self {
            Stamp::New(options) => &mut options.extra,
            Stamp::Given(envelope) => &mut envelope.extra,
        };
        extra.get_or_insert_with(Default::default).tracker = Some(tracker);
    }

    /// The service the event comes from: a given envelope's, else `publisher`.
    #[inline]
    pub(crate) fn source(&self, publisher: NameId) -> NameId {
        match self {
            Stamp::New(_) => publisher,
            Stamp::Given(envelope) => envelope.source,
        }
    }

    /// Defaults the correlation and causation of an event published while `cause` is handled
    /// to `cause`'s (a given envelope keeps its own).
    pub(crate) fn caused_by(self, cause: &Envelope) -> Stamp {
        match self {
            Stamp::New(options) => Stamp::New(Options {
                correlation: options.correlation.or(Some(cause.correlation)),
                causation: options.causation.or(Some(cause.id)),
                ..options
            }),
            given => given,
        }
    }

    /// The envelope: a new one stamped with `clock`'s time, or the one given.
    #[inline(always)]
    pub(crate) fn envelope(self, clock: &crate::clock::Clock, source: NameId) -> Envelope {
        match self {
            Stamp::New(options) => Envelope::stamp_at(clock.unix_nanos(), source, options),
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
    fn options_set_after_an_envelope_change_its_fields_and_keep_the_rest() {
        let given = Envelope::stamp(NameId::intern("event-tests-origin"), Options::default());
        let cause = EventId::new();
        let options = Publish::envelope(given.clone())
            .key(7u64)
            .correlation(cause)
            .causation(cause)
            .header("tenant", "acme")
            .delay(Duration::from_secs(1));
        let (stamp, delay) = options.clone().into_parts();
        assert_eq!(delay, Some(Duration::from_secs(1)));
        let envelope = stamp.envelope(&Default::default(), NameId::intern("event-tests-other"));
        assert_eq!(envelope.id(), given.id());
        assert_eq!(envelope.source(), "event-tests-origin");
        assert_eq!(envelope.key().map(PartitionKey::get), Some(7));
        assert_eq!(
            (envelope.correlation_id(), envelope.causation_id()),
            (cause, Some(cause))
        );
        assert_eq!(envelope.headers().get("tenant"), Some("acme"));
        // A tracked publish's clone carries no tracker: the bus attaches one per call.
        let tracked = options.tracked();
        let (stamp, _) = tracked.clone().into_parts();
        assert!(
            stamp
                .envelope(&Default::default(), NameId::intern("x"))
                .tracker()
                .is_none()
        );
    }

    #[test]
    fn envelope_is_small() {
        assert!(std::mem::size_of::<Envelope>() <= 72);
    }
}
