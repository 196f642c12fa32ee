//! Per-type handler tables and the [`Subscription`] handle.
//!
//! Ground rules: the tables form one immutable [`Snapshot`]: a generation number and a map from
//! `TypeId` to an immutable `TypeTable<E>`, held in an `ArcSwap`. Publishers read it without a
//! lock (`ArcSwap::load`), count the subscriptions an event matches, and send the event with
//! the snapshot's generation and that count, never a reference to the table. Subscribe and
//! unsubscribe serialize on a mutex, build the next generation, and swap it in.
//!
//! A subscription records the generation that added it (`since_gen`); a removed one leaves a
//! tombstone with the generation that removed it. A worker keeps its own snapshot and refreshes
//! it when an event is newer. The subscriptions an event of generation `g` matched are then the
//! worker's subscriptions with `since_gen <= g` (newer snapshots only ever lose some: those
//! are in the tombstones, and their deliveries are cancelled).
//!
//! A subscription's `active` flag and each worker's `batch` word form a Dekker pair: a worker
//! opens a batch (`SeqCst`), then reads `active` before each delivery; an unsubscriber clears
//! `active` (`SeqCst`), then waits for every open batch to close. After that no call can
//! start (see `shard`).

use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use parking_lot::Mutex;

use crate::config::MAX_LANES;
use crate::event::{Event, NameId};
pub(crate) use crate::meta::SubMeta;
use crate::metrics::{HeldSlot, PublishCounters};
use crate::sync::{Arc, AtomicU32, AtomicU64, Ordering, SwapCell};

/// What the engine keeps for one subscription of event type [`Event`](Self::Event) (its
/// handler): the registry holds them in tables, knowing only their [`SubMeta`].
pub(crate) trait Subscriber: Send + Sync + 'static {
    type Event: Event;
    fn meta(&self) -> &Arc<SubMeta>;
}

/// How many removed subscriptions of one type are remembered, to attribute cancellations.
const TOMBSTONES: usize = 64;

/// A removed subscription, remembered so that deliveries still queued for it are counted as
/// its cancellations.
#[derive(Clone)]
pub(crate) struct Tombstone {
    pub(crate) meta: Arc<SubMeta>,
    pub(crate) removed_gen: u32,
}

/// The subscriptions of one event type, in subscription order. Never mutated: replaced.
pub(crate) struct TypeTable<S> {
    pub(crate) subs: Box<[Arc<S>]>,
    pub(crate) removed: Box<[Tombstone]>,
}

trait ErasedTable: Any + Send + Sync {
    /// The same table without subscription `id`, which generation `generation` removes.
    fn without(&self, id: u64, generation: u32) -> Arc<dyn ErasedTable>;
    /// The source filter and lane of each subscription.
    fn filters(&self) -> Box<[Filter]>;
}

impl<S: Subscriber> ErasedTable for TypeTable<S> {
    fn filters(&self) -> Box<[Filter]> {
        self.subs
            .iter()
            .map(|s| (s.meta().filter, s.meta().lane))
            .collect()
    }

    fn without(&self, id: u64, generation: u32) -> Arc<dyn ErasedTable> {
        let mut removed: Vec<Tombstone> = self.removed.to_vec();
        let mut subs = Vec::with_capacity(self.subs.len());
        for sub in self.subs.iter() {
            if sub.meta().id == id {
                removed.push(Tombstone {
                    meta: sub.meta().clone(),
                    removed_gen: generation,
                });
            } else {
                subs.push(sub.clone());
            }
        }
        let excess = removed.len().saturating_sub(TOMBSTONES);
        removed.drain(..excess);
        Arc::new(TypeTable {
            subs: subs.into_boxed_slice(),
            removed: removed.into_boxed_slice(),
        })
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

/// A subscription as a publisher sees it: the source it hears (all when `None`), its lane.
type Filter = (Option<NameId>, u8);

/// What publishers need of one generation: each event type's subscriptions' source filters
/// and lanes. Plain data, so that a publisher thread may cache it without keeping handlers
/// alive.
pub(crate) struct Routes {
    generation: u32,
    filters: HashMap<TypeId, Box<[Filter]>, BuildHasherDefault<TypeIdHasher>>,
}

impl Routes {
    /// The deliveries an event of type `type_id` from `source` has in each lane.
    fn matching(&self, type_id: TypeId, source: NameId) -> [u32; MAX_LANES] {
        let mut counts = [0; MAX_LANES];
        if let Some(filters) = self.filters.get(&type_id) {
            for (_, lane) in filters
                .iter()
                .filter(|(f, _)| f.is_none_or(|f| f == source))
            {
                counts[*lane as usize] += 1;
            }
        }
        counts
    }
}

/// Where an event's deliveries go: the generation it was matched in, how many deliveries it
/// has, and the lanes they are in (one bit each).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Route {
    pub(crate) generation: u32,
    pub(crate) deliveries: usize,
    pub(crate) lanes: u8,
}

impl Route {
    /// The one lane that has every delivery, if there is one.
    #[inline]
    pub(crate) fn single(&self) -> Option<usize> {
        (self.lanes.count_ones() == 1).then(|| self.lanes.trailing_zeros() as usize)
    }
}

/// The deliveries of an event in each lane, for one that goes to several.
pub(crate) struct LaneCounts(pub(crate) [u32; MAX_LANES]);

impl LaneCounts {
    /// The lanes with deliveries, with how many each, in lane order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(lane, n)| (lane, *n as usize))
    }
}

/// One generation of the handler tables.
pub(crate) struct Snapshot {
    pub(crate) generation: u32,
    tables: TypeMap,
    routes: Arc<Routes>,
}

impl Snapshot {
    fn new(generation: u32, tables: TypeMap) -> Snapshot {
        let routes = Arc::new(Routes {
            generation,
            filters: tables
                .iter()
                .map(|(type_id, table)| (*type_id, table.filters()))
                .collect(),
        });
        Snapshot {
            generation,
            tables,
            routes,
        }
    }

    /// The table of `S::Event`, if anything ever subscribed to it.
    #[inline]
    pub(crate) fn table<S: Subscriber>(&self) -> Option<&TypeTable<S>> {
        let table: &dyn Any = &**self.tables.get(&TypeId::of::<S::Event>())?;
        table.downcast_ref()
    }
}

/// How many buses' routes a thread keeps at hand.
const CACHED_ROUTES: usize = 4;

/// How many (event type, source) publish counters a thread keeps per bus.
const HELD_COUNTERS: usize = 64;

/// A thread's latest routes of one bus, with its last answer, and its publish counters.
struct CachedRoutes {
    bus: u64,
    routes: Arc<Routes>,
    /// The last (event type, source) looked up, how many subscriptions it matched, and its
    /// counter in `counters`.
    last: Option<Last>,
    /// This thread's publish counters on the bus (none with metrics off).
    counters: Vec<HeldSlot>,
}

#[derive(Clone, Copy)]
struct Last {
    type_id: TypeId,
    source: NameId,
    deliveries: usize,
    lanes: u8,
    counter: usize,
}

impl CachedRoutes {
    /// The index of this thread's counter of (`type_id`, `source`), taken if need be.
    fn counter(
        &mut self,
        counters: &PublishCounters,
        type_id: TypeId,
        event: &'static str,
        source: NameId,
    ) -> usize {
        if !counters.enabled {
            return usize::MAX;
        }
        if let Some(i) = self
            .counters
            .iter()
            .position(|c| c.type_id == type_id && c.source == source)
        {
            return i;
        }
        if self.counters.len() == HELD_COUNTERS {
            self.counters.remove(0);
        }
        self.counters.push(counters.take(type_id, event, source));
        self.counters.len() - 1
    }

    /// Looks up (`type_id`, `source`) in the routes and remembers the answer.
    fn look_up(
        &mut self,
        counters: &PublishCounters,
        type_id: TypeId,
        event: &'static str,
        source: NameId,
    ) -> Last {
        let counts = self.routes.matching(type_id, source);
        let last = Last {
            type_id,
            source,
            deliveries: counts.iter().sum::<u32>() as usize,
            lanes: counts
                .iter()
                .enumerate()
                .fold(0, |mask, (lane, n)| mask | (u8::from(*n > 0) << lane)),
            counter: self.counter(counters, type_id, event, source),
        };
        self.last = Some(last);
        last
    }
}

thread_local! {
    /// This thread's latest routes of the buses it published on.
    static ROUTES: RefCell<Vec<CachedRoutes>> = const { RefCell::new(Vec::new()) };
}

pub(crate) struct Registry {
    /// The bus's id, which keys the per-thread route caches.
    bus: u64,
    snapshot: SwapCell<Snapshot>,
    /// The current generation, for cheap staleness checks.
    generation: AtomicU32,
    write: Mutex<()>,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<SubMeta>>>,
    /// Publish counters per (event type, source).
    pub(crate) counters: PublishCounters,
}

impl Registry {
    pub(crate) fn new(bus: u64, count_publishes: bool) -> Registry {
        Registry {
            bus,
            counters: PublishCounters::new(count_publishes),
            snapshot: SwapCell::from_pointee(Snapshot::new(0, TypeMap::default())),
            generation: AtomicU32::new(0),
            write: Mutex::new(()),
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The generation of the handler tables now, and how many subscriptions an event of type
    /// `E` from `source` matches in it. With metrics on it also counts `events` events as
    /// published by `source` (and unmatched, if they match nothing);
    /// [`uncount`](Self::uncount) takes that back for events that are not accepted after all.
    /// Takes no lock, and in the common case (no subscription change since this thread last
    /// published) no read-modify-write either.
    #[inline]
    pub(crate) fn route<E: Event>(&self, source: NameId, events: u64) -> Route {
        let current = self.generation.load(Ordering::Acquire);
        let type_id = TypeId::of::<E>();
        ROUTES.with_borrow_mut(|cache| {
            let found = cache.iter().position(|c| c.bus == self.bus);
            let i = match found {
                Some(i) if cache[i].routes.generation == current => i,
                _ => {
                    let routes = self.snapshot.load().routes.clone();
                    let counters = match found {
                        Some(i) => std::mem::take(&mut cache[i].counters),
                        None => Vec::new(),
                    };
                    let entry = CachedRoutes {
                        bus: self.bus,
                        routes,
                        last: None,
                        counters,
                    };
                    match found {
                        Some(i) => {
                            cache[i] = entry;
                            i
                        }
                        None => {
                            if cache.len() == CACHED_ROUTES {
                                cache.remove(0);
                            }
                            cache.push(entry);
                            cache.len() - 1
                        }
                    }
                }
            };
            let entry = &mut cache[i];
            let last = match entry.last {
                Some(last) if last.type_id == type_id && last.source == source => last,
                _ => entry.look_up(&self.counters, type_id, E::NAME, source),
            };
            if events > 0
                && let Some(counter) = entry.counters.get(last.counter)
            {
                counter.count(events, last.deliveries == 0);
            }
            Route {
                generation: entry.routes.generation,
                deliveries: last.deliveries,
                lanes: last.lanes,
            }
        })
    }

    /// How many deliveries an event of type `E` from `source` has in each lane in generation
    /// `generation`, which [`route`](Self::route) just gave on this thread (for an event that
    /// goes to several lanes; counts nothing).
    #[cold]
    pub(crate) fn lane_counts<E: Event>(&self, source: NameId, generation: u32) -> LaneCounts {
        let type_id = TypeId::of::<E>();
        let cached = ROUTES.with_borrow(|cache| {
            cache
                .iter()
                .find(|c| c.bus == self.bus && c.routes.generation == generation)
                .map(|c| c.routes.matching(type_id, source))
        });
        LaneCounts(cached.expect("routed on this thread just before"))
    }

    /// Counts `n` events of type `E` from `source` as published (after [`route`](Self::route)
    /// with none, on this thread).
    pub(crate) fn count<E: Event>(&self, source: NameId, n: u64, unmatched: bool) {
        if !self.counters.enabled || n == 0 {
            return;
        }
        let type_id = TypeId::of::<E>();
        let _ = ROUTES.try_with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(entry) = cache.iter_mut().find(|c| c.bus == self.bus) {
                let i = entry.counter(&self.counters, type_id, E::NAME, source);
                entry.counters[i].count(n, unmatched);
            }
        });
    }

    /// Takes back `n` publishes that [`route`](Self::route) or [`count`](Self::count) counted
    /// on this thread for events of type `type_id` from `source` that were not accepted.
    #[cold]
    pub(crate) fn uncount(&self, type_id: TypeId, source: NameId, n: u64, unmatched: bool) {
        if !self.counters.enabled {
            return;
        }
        let _ = ROUTES.try_with(|cache| {
            let cache = cache.borrow();
            let counter = cache
                .iter()
                .filter(|c| c.bus == self.bus)
                .flat_map(|c| c.counters.iter())
                .find(|c| c.type_id == type_id && c.source == source);
            if let Some(counter) = counter {
                counter.uncount(n, unmatched);
            }
        });
    }

    /// The current snapshot, owned.
    pub(crate) fn load_full(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The current generation.
    pub(crate) fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Stores the next generation, made by `change` from the current tables.
    fn install(&self, change: impl FnOnce(&mut TypeMap, u32)) {
        let current = self.snapshot.load_full();
        let generation = current.generation.wrapping_add(1);
        let mut tables = current.tables.clone();
        change(&mut tables, generation);
        self.snapshot
            .store(Arc::new(Snapshot::new(generation, tables)));
        self.generation.store(generation, Ordering::Release);
    }

    pub(crate) fn insert<S: Subscriber>(&self, sub: S) -> Arc<SubMeta> {
        let meta = sub.meta().clone();
        let _write = self.write.lock();
        self.install(|tables, generation| {
            meta.since_gen.store(generation, Ordering::Relaxed);
            let (mut subs, removed) = match tables.get(&TypeId::of::<S::Event>()) {
                Some(table) => {
                    let table: &dyn Any = &**table;
                    let table = table
                        .downcast_ref::<TypeTable<S>>()
                        .expect("the table under E's TypeId is E's");
                    (table.subs.to_vec(), table.removed.clone())
                }
                None => (Vec::new(), Box::default()),
            };
            subs.push(Arc::new(sub));
            tables.insert(
                TypeId::of::<S::Event>(),
                Arc::new(TypeTable {
                    subs: subs.into_boxed_slice(),
                    removed,
                }),
            );
        });
        self.live.lock().insert(meta.id, meta.clone());
        meta
    }

    pub(crate) fn remove(&self, meta: &SubMeta) {
        let _write = self.write.lock();
        self.install(|tables, generation| {
            if let Some(table) = tables.get(&meta.type_id) {
                let rest = table.without(meta.id, generation);
                tables.insert(meta.type_id, rest);
            }
        });
        self.live.lock().remove(&meta.id);
    }

    /// Drops the handler tables (the bus has stopped: no delivery starts any more) and returns
    /// them, for the caller to drop: user handles become their last owners. The subscriptions
    /// stay known by id, for their statistics.
    pub(crate) fn forget(&self) -> Arc<Snapshot> {
        let _write = self.write.lock();
        let last = self.snapshot.load_full();
        let generation = last.generation.wrapping_add(1);
        self.snapshot
            .store(Arc::new(Snapshot::new(generation, TypeMap::default())));
        self.generation.store(generation, Ordering::Release);
        last
    }

    pub(crate) fn lookup(&self, id: u64) -> Option<Arc<SubMeta>> {
        self.live.lock().get(&id).cloned()
    }

    /// The subscriptions now, in subscription order.
    pub(crate) fn live(&self) -> Vec<Arc<SubMeta>> {
        let mut live: Vec<Arc<SubMeta>> = self.live.lock().values().cloned().collect();
        live.sort_by_key(|meta| meta.id);
        live
    }
}

/// Loom models of the handler tables: `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::context::{Context, Sub};
    use crate::meta::before;
    use crate::retry::RetryPolicy;
    use loom::thread;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Probe;

    impl Event for Probe {
        const NAME: &'static str = "Probe";
    }

    /// Each run of the model gets a bus id of its own: the route caches are per thread, and
    /// loom's threads may share one.
    static NEXT_BUS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 40);

    fn sub(registry: &Registry, from: Option<NameId>) -> Sub<Probe> {
        let meta = Arc::new(SubMeta::new::<Probe>(
            registry.next_id(),
            "probe".into(),
            NameId::intern("loom"),
            from,
            crate::meta::SubSettings::new(RetryPolicy::none(), 0),
            Box::new([]),
        ));
        Sub {
            meta,
            handler: Box::new(|_: &Probe, _: &Context<'_>| Ok(())),
            batch: None,
        }
    }

    /// A publisher matches an event while another thread subscribes and unsubscribes, and a
    /// worker takes the event: in the tables the worker sees (the current ones, or newer), the
    /// subscriptions that match the event's generation — still there, or remembered as removed
    /// — are exactly as many as the publisher counted. So the worker runs or cancels every
    /// delivery that was counted, and no other.
    #[test]
    fn loom_workers_find_exactly_the_deliveries_publishers_counted() {
        loom::model(|| {
            let bus = NEXT_BUS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let registry = std::sync::Arc::new(Registry::new(bus, false));
            let source = NameId::intern("orders");
            let first = registry.insert(sub(&registry, None));
            let sent = std::sync::Arc::new(AtomicU64::new(0));
            let subscriber = {
                let registry = registry.clone();
                thread::spawn(move || {
                    registry.insert(sub(&registry, Some(source)));
                    first.active.store(false, Ordering::SeqCst);
                    registry.remove(&first);
                })
            };
            let publisher = {
                let (registry, sent) = (registry.clone(), sent.clone());
                thread::spawn(move || {
                    let route = registry.route::<Probe>(source, 1);
                    let (generation, deliveries) = (route.generation, route.deliveries);
                    // Into the channel: the generation (at least 1: the first subscription
                    // made one) and the count travel with the event.
                    sent.store(
                        (u64::from(generation) << 32) | deliveries as u64,
                        Ordering::Release,
                    );
                })
            };
            let message = loop {
                let message = sent.load(Ordering::Acquire);
                if message != 0 {
                    break message;
                }
                thread::yield_now();
            };
            let generation = ((message >> 32) & u64::from(u32::MAX)) as u32;
            let deliveries = (message & u64::from(u32::MAX)) as usize;
            let snapshot = registry.load_full();
            assert!(
                !before(snapshot.generation, generation),
                "the worker saw older tables"
            );
            let table = snapshot
                .table::<Sub<Probe>>()
                .expect("subscribed before publishing");
            let live = table
                .subs
                .iter()
                .filter(|s| s.meta.matched(0, generation, source))
                .count();
            let removed = table
                .removed
                .iter()
                .filter(|t| {
                    before(generation, t.removed_gen) && t.meta.matched(0, generation, source)
                })
                .count();
            assert_eq!(live + removed, deliveries);
            subscriber.join().unwrap();
            publisher.join().unwrap();
        });
    }
}
