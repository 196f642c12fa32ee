//! Per-type handler tables and the [`Subscription`] handle.
//!
//! Ground rules: the tables form one immutable map from `TypeId` to an immutable
//! `TypeTable<E>`, held in an `ArcSwap`. Publishers read it without a lock (`ArcSwap::load`) and
//! take an `Arc` of their type's table: that table *is* the snapshot of subscriptions an event
//! is matched against, and it travels with the event to its worker. Subscribe and unsubscribe
//! serialize on a mutex, build a new map, and swap it in.
//!
//! A subscription's `active` flag and each worker's `state` word (the id of the subscription
//! it is running) form a Dekker pair: a worker stores its state, then reads `active`; an
//! unsubscriber clears `active`, then reads every worker's state. Both sides use `SeqCst`, so
//! after `unsubscribe` has seen no worker running the subscription, no call can start.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::bus::Core;
use crate::event::{Event, NameId};
use crate::handler::{Context, HandlerError, HandlerResult};
use crate::sync::{Arc, AtomicBool, AtomicU64, Ordering};

pub(crate) type HandlerFn<E> = Box<dyn Fn(&E, &Context<'_>) -> HandlerResult + Send + Sync>;

/// What a subscription is, apart from its handler.
pub(crate) struct SubMeta {
    pub(crate) id: u64,
    pub(crate) name: Box<str>,
    pub(crate) service: NameId,
    pub(crate) filter: Option<NameId>,
    pub(crate) event_name: &'static str,
    pub(crate) type_id: TypeId,
    pub(crate) active: AtomicBool,
    pub(crate) failed: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
}

impl SubMeta {
    pub(crate) fn matches(&self, source: NameId) -> bool {
        self.filter.is_none_or(|f| f == source)
    }

    pub(crate) fn record_failure(&self, error: &HandlerError, panicked: bool) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if panicked {
            self.panicked.fetch_add(1, Ordering::Relaxed);
        }
        *self.last_error.lock() = Some(error.to_string());
    }
}

pub(crate) struct Sub<E> {
    pub(crate) meta: Arc<SubMeta>,
    pub(crate) handler: HandlerFn<E>,
}

/// The subscriptions of one event type, in subscription order. Never mutated: replaced.
pub(crate) struct TypeTable<E> {
    pub(crate) subs: Box<[Arc<Sub<E>>]>,
}

impl<E> TypeTable<E> {
    /// How many subscriptions an event from `source` is delivered to.
    pub(crate) fn matching(&self, source: NameId) -> usize {
        self.subs.iter().filter(|s| s.meta.matches(source)).count()
    }
}

trait ErasedTable: Any + Send + Sync {
    /// The same table without subscription `id`, or `None` when that leaves it empty.
    fn without(&self, id: u64) -> Option<Arc<dyn ErasedTable>>;
}

impl<E: Event> ErasedTable for TypeTable<E> {
    fn without(&self, id: u64) -> Option<Arc<dyn ErasedTable>> {
        let subs: Box<[_]> = self
            .subs
            .iter()
            .filter(|s| s.meta.id != id)
            .cloned()
            .collect();
        (!subs.is_empty()).then(|| Arc::new(TypeTable { subs }) as Arc<dyn ErasedTable>)
    }
}

/// `TypeId` is already a hash; this hasher passes it through.
#[derive(Default)]
struct TypeIdHasher(u64);

impl Hasher for TypeIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 ^= value;
    }
}

type TypeMap = HashMap<TypeId, Arc<dyn ErasedTable>, BuildHasherDefault<TypeIdHasher>>;

pub(crate) struct Registry {
    map: ArcSwap<TypeMap>,
    write: Mutex<()>,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<SubMeta>>>,
}

impl Registry {
    pub(crate) fn new() -> Registry {
        Registry {
            map: ArcSwap::from_pointee(TypeMap::default()),
            write: Mutex::new(()),
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The current table of `E`, if anything subscribes to it. Takes no lock.
    #[inline]
    pub(crate) fn table<E: Event>(&self) -> Option<Arc<TypeTable<E>>> {
        let map = self.map.load();
        let table: Arc<dyn Any + Send + Sync> = map.get(&TypeId::of::<E>())?.clone();
        table.downcast().ok()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn insert<E: Event>(&self, sub: Sub<E>) -> Arc<SubMeta> {
        let meta = sub.meta.clone();
        let _write = self.write.lock();
        let current = self.map.load_full();
        let mut subs: Vec<Arc<Sub<E>>> = self
            .table::<E>()
            .map(|t| t.subs.to_vec())
            .unwrap_or_default();
        subs.push(Arc::new(sub));
        let mut map = (*current).clone();
        map.insert(
            TypeId::of::<E>(),
            Arc::new(TypeTable {
                subs: subs.into_boxed_slice(),
            }),
        );
        self.map.store(Arc::new(map));
        self.live.lock().insert(meta.id, meta.clone());
        meta
    }

    pub(crate) fn remove(&self, meta: &SubMeta) {
        let _write = self.write.lock();
        let current = self.map.load_full();
        if let Some(table) = current.get(&meta.type_id) {
            let mut map = (*current).clone();
            match table.without(meta.id) {
                Some(rest) => map.insert(meta.type_id, rest),
                None => map.remove(&meta.type_id),
            };
            self.map.store(Arc::new(map));
        }
        self.live.lock().remove(&meta.id);
    }

    pub(crate) fn lookup(&self, id: u64) -> Option<Arc<SubMeta>> {
        self.live.lock().get(&id).cloned()
    }
}

/// Options for a subscription: its name and the one source service it listens to.
///
/// # Examples
///
/// ```
/// use microbus::SubscribeOptions;
///
/// let options = SubscribeOptions::new().named("audit-log").from("OrderService");
/// # let _ = options;
/// ```
#[derive(Clone, Default)]
pub struct SubscribeOptions {
    pub(crate) name: Option<String>,
    pub(crate) from: Option<String>,
}

impl SubscribeOptions {
    /// Default options: named after the handler's type, events from every source.
    pub fn new() -> SubscribeOptions {
        SubscribeOptions::default()
    }

    /// Names the handler in statistics and reports.
    pub fn named(mut self, name: impl Into<String>) -> SubscribeOptions {
        self.name = Some(name.into());
        self
    }

    /// Receives only events published by service `source`.
    pub fn from(mut self, source: impl Into<String>) -> SubscribeOptions {
        self.from = Some(source.into());
        self
    }
}

impl fmt::Debug for SubscribeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscribeOptions")
            .field("name", &self.name)
            .field("from", &self.from)
            .finish()
    }
}

/// A handle to one subscription.
///
/// Dropping it does **not** unsubscribe: `bus.subscribe(..)?;` subscribes for the life of the
/// bus. Keep it to call [`unsubscribe`](Self::unsubscribe) or read [`stats`](Self::stats).
pub struct Subscription {
    pub(crate) core: Arc<Core>,
    pub(crate) meta: Arc<SubMeta>,
}

/// Failure and cancellation counts of one subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// Failed attempts: errors returned and panics.
    pub failed: u64,
    /// Of the failed attempts, how many were panics.
    pub panicked: u64,
    /// Deliveries that were queued when the subscription ended, and never ran.
    pub cancelled: u64,
    /// The text of the most recent failure.
    pub last_error: Option<String>,
}

impl Subscription {
    /// The subscription's id, unique within the bus.
    pub fn id(&self) -> u64 {
        self.meta.id
    }

    /// The handler's name.
    pub fn handler_name(&self) -> &str {
        &self.meta.name
    }

    /// The [`Event::NAME`] of the events it receives.
    pub fn event_name(&self) -> &'static str {
        self.meta.event_name
    }

    /// The service that subscribed.
    pub fn service(&self) -> &'static str {
        self.meta.service.as_str()
    }

    /// Whether it still receives events.
    pub fn is_active(&self) -> bool {
        self.meta.active.load(Ordering::SeqCst)
    }

    /// Its failure and cancellation counts so far.
    pub fn stats(&self) -> SubscriptionStats {
        SubscriptionStats {
            failed: self.meta.failed.load(Ordering::Relaxed),
            panicked: self.meta.panicked.load(Ordering::Relaxed),
            cancelled: self.meta.cancelled.load(Ordering::Relaxed),
            last_error: self.meta.last_error.lock().clone(),
        }
    }

    /// Ends the subscription and waits until no call of its handler is running.
    ///
    /// After it returns, no call of the handler starts. Deliveries still queued for it are
    /// counted as cancelled (in [`stats`](Self::stats) and the bus's statistics) when a worker
    /// reaches them. Called from inside this subscription's own handler it does not wait for
    /// that call. Calling it again does nothing.
    pub fn unsubscribe(&self) {
        if self.meta.active.swap(false, Ordering::SeqCst) {
            self.core.registry.remove(&self.meta);
        }
        self.core.wait_not_running(self.meta.id);
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.meta.id)
            .field("event", &self.meta.event_name)
            .field("service", &self.meta.service)
            .field("handler", &self.meta.name)
            .field("active", &self.is_active())
            .finish()
    }
}
