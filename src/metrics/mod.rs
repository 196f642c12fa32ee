//! Metrics: counters per event type, source service and handler, and HdrHistograms of queue
//! wait, handler time and end-to-end latency per handler (merged per event type on snapshot).
//!
//! Ground rules: nothing here takes a lock or does a read-modify-write on the hot path.
//!
//! - Publish counters live in per-thread slots: a publishing thread holds one slot per (event
//!   type, source) it publishes, beside its cached routes of the bus (the lookup it makes
//!   anyway), writes it with a plain load and store, and gives it back when it exits (the next
//!   thread to need that key takes it over, counts and all). A snapshot sums the slots. An
//!   event counted and then not accepted after all (handed back, or staged by a handler that
//!   failed) is taken back from the same slot; a handler that publishes on more than four buses
//!   in one run can push its slot out of the cache first, and that event stays counted.
//! - Handler counters that every delivery touches (delivered, succeeded) are one cell per
//!   subscription and worker, written by that worker alone; the rarer ones (failed, retried,
//!   dead-lettered, cancelled) are shared atomics on the subscription.
//! - Latencies are counted by each worker into its own arrays, laid out as the `hdrhistogram`
//!   crate lays out its counts, one set per subscription it ran.
//!   [`Bus::metrics`](crate::Bus::metrics) asks every worker for them: a worker answers
//!   between batches (at most 64 deliveries) or before it waits for work, by adding its counts
//!   into the bus's merged histograms under a mutex and clearing its own. A worker that a
//!   handler keeps busy longer than [`COLLECT_WAIT`] is reported in
//!   [`MetricsSnapshot::workers_behind`].
//!
//! Times come from the same TSC clock that stamps event ids, so the publish time is read from
//! the event id and a sampled delivery takes two clock reads: when its handler starts and when
//! it returns.

mod snapshot;
mod table;

pub use snapshot::{
    BridgeCounters, EventCounts, EventLatency, HandlerMetrics, ImportStatus, LaneMetrics, Latency,
    MetricsSnapshot,
};

use std::any::TypeId;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::event::{EventId, NameId};
use crate::meta::HandlerCells;
use crate::meta::SubMeta;
pub(crate) use crate::meta::cells;
use crate::sync::{Arc, AtomicBool, AtomicU64, Ordering};

/// The largest latency a histogram tells apart (2^36 ns, about 68.7 s); longer ones are
/// recorded as this.
pub(crate) const HIGHEST_NANOS: u64 = (1 << 36) - 1;
/// Significant decimal digits the histograms keep: each value within 1%.
const SIGNIFICANT_DIGITS: u8 = 2;
/// How long [`Bus::metrics`](crate::Bus::metrics) waits for a busy worker's latencies.
pub(crate) const COLLECT_WAIT: Duration = Duration::from_millis(100);

/// A latency distribution: bucket counts in the `hdrhistogram` crate's layout, and the exact
/// sum. The crate's histograms (a fixed 30 KB each) are made only to summarise one, in a
/// [`Scratch`] reused across a snapshot.
#[derive(Clone, Default)]
struct Distribution {
    counts: Counts,
}

impl Distribution {
    fn add(&mut self, other: &Distribution) {
        self.counts.add(&other.counts);
    }

    fn summary(&self, scratch: &mut Scratch) -> Latency {
        if self.counts.is_empty() {
            return Latency::default();
        }
        let h = &mut scratch.0;
        h.reset();
        self.counts
            .each(|index, count| h.saturating_record_n(value_for(index), count));
        summarise(h, self.counts.sum)
    }
}

/// The summary of histogram `h` whose values add up to `sum`.
fn summarise(h: &Histogram<u64>, sum: u64) -> Latency {
    Latency {
        count: h.len(),
        sum_ns: sum,
        min_ns: h.min(),
        p50_ns: h.value_at_quantile(0.5),
        p90_ns: h.value_at_quantile(0.9),
        p99_ns: h.value_at_quantile(0.99),
        p999_ns: h.value_at_quantile(0.999),
        max_ns: h.max(),
    }
}

/// A histogram of the crate's to summarise distributions in.
struct Scratch(Histogram<u64>);

impl Scratch {
    fn new() -> Scratch {
        Scratch(
            Histogram::new_with_bounds(1, HIGHEST_NANOS, SIGNIFICANT_DIGITS)
                .expect("valid histogram bounds"),
        )
    }
}

/// The three distributions of one subscription.
#[derive(Clone, Default)]
struct Distributions {
    queue_wait: Distribution,
    handler: Distribution,
    end_to_end: Distribution,
}

impl Distributions {
    fn new() -> Distributions {
        Distributions::default()
    }

    fn add(&mut self, other: &Distributions) {
        self.queue_wait.add(&other.queue_wait);
        self.handler.add(&other.handler);
        self.end_to_end.add(&other.end_to_end);
    }

    /// The bytes it holds on the heap.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        [&self.queue_wait, &self.handler, &self.end_to_end]
            .iter()
            .map(|d| d.counts.buckets.heap_bytes())
            .sum()
    }
}

// The layout of an HdrHistogram of 1 ns – 68.7 s at two significant digits, as the
// `hdrhistogram` crate lays it out: 256 sub-buckets (the top 128 used above the first bucket),
// 29 buckets. A worker counts into a plain array of this layout (an index is a few
// instructions: the crate's own `record` took about sixty) and hands the counts to the crate's
// histograms when it merges. The tests check both layouts agree value for value.
const HALF_COUNT_MAGNITUDE: u32 = 7;
const HALF_COUNT: u64 = 1 << HALF_COUNT_MAGNITUDE;
const SUB_BUCKET_MASK: u64 = 2 * HALF_COUNT - 1;
const LEADING_ZERO_COUNT_BASE: u32 = 64 - HALF_COUNT_MAGNITUDE - 1;
const COUNTS_LEN: usize = 3840;

/// The index of `value`'s bucket in the counts array; `value` is at most [`HIGHEST_NANOS`].
#[inline]
fn index_for(value: u64) -> usize {
    let bucket = LEADING_ZERO_COUNT_BASE - (value | SUB_BUCKET_MASK).leading_zeros();
    let sub_bucket = value >> bucket;
    (((u64::from(bucket) + 1) << HALF_COUNT_MAGNITUDE) + sub_bucket - HALF_COUNT) as usize
}

/// The lowest value of bucket `index`.
fn value_for(index: usize) -> u64 {
    let bucket = (index >> HALF_COUNT_MAGNITUDE) as u32;
    let sub_bucket = index as u64 & (HALF_COUNT - 1);
    match bucket {
        0 => sub_bucket,
        _ => (sub_bucket + HALF_COUNT) << (bucket - 1),
    }
}

/// How many distinct buckets a distribution keeps as a list before it switches to an array of
/// every bucket: a subscription that ran a few times costs a few hundred bytes, a busy one the
/// whole array ([`COUNTS_LEN`] buckets, 30 KB) and an index per record.
const SPARSE_BUCKETS: usize = 32;

/// Bucket counts: a short list of (bucket, count) while few buckets are used, then the array.
#[derive(Clone)]
enum Buckets {
    Sparse(Vec<(u16, u64)>),
    Dense(Box<[u64]>),
}

impl Default for Buckets {
    fn default() -> Buckets {
        Buckets::Sparse(Vec::new())
    }
}

impl Buckets {
    #[inline]
    fn record(&mut self, index: usize, n: u64) {
        match self {
            Buckets::Dense(buckets) => buckets[index] += n,
            Buckets::Sparse(list) => {
                if let Some(entry) = list.iter_mut().find(|e| usize::from(e.0) == index) {
                    entry.1 += n;
                } else if list.len() < SPARSE_BUCKETS {
                    // `COUNTS_LEN` fits in a `u16`.
                    list.push((index as u16, n));
                } else {
                    self.densify();
                    self.record(index, n);
                }
            }
        }
    }

    #[cold]
    fn densify(&mut self) {
        let mut dense = vec![0; COUNTS_LEN].into_boxed_slice();
        if let Buckets::Sparse(list) = self {
            for &(index, count) in list.iter() {
                dense[usize::from(index)] += count;
            }
        }
        *self = Buckets::Dense(dense);
    }

    /// Calls `f` with each bucket that has a count, and its count.
    fn each(&self, mut f: impl FnMut(usize, u64)) {
        match self {
            Buckets::Sparse(list) => list.iter().for_each(|&(i, c)| f(usize::from(i), c)),
            Buckets::Dense(buckets) => buckets
                .iter()
                .enumerate()
                .filter(|&(_, &c)| c > 0)
                .for_each(|(i, &c)| f(i, c)),
        }
    }

    fn is_sparse(&self) -> bool {
        matches!(self, Buckets::Sparse(_))
    }

    /// The bytes it holds on the heap.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        match self {
            Buckets::Sparse(list) => list.capacity() * std::mem::size_of::<(u16, u64)>(),
            Buckets::Dense(buckets) => buckets.len() * std::mem::size_of::<u64>(),
        }
    }
}

/// Counts of one latency: its buckets and the exact sum.
#[derive(Clone, Default)]
struct Counts {
    buckets: Buckets,
    sum: u64,
}

impl Counts {
    #[inline]
    fn record(&mut self, nanos: u64) {
        self.buckets.record(index_for(nanos.min(HIGHEST_NANOS)), 1);
        self.sum = self.sum.wrapping_add(nanos);
    }

    fn is_empty(&self) -> bool {
        let mut empty = true;
        self.buckets.each(|_, _| empty = false);
        empty
    }

    fn each(&self, f: impl FnMut(usize, u64)) {
        self.buckets.each(f);
    }

    fn add(&mut self, other: &Counts) {
        let buckets = &mut self.buckets;
        other
            .buckets
            .each(|index, count| buckets.record(index, count));
        self.sum = self.sum.saturating_add(other.sum);
    }

    /// Adds the counts to `into` and clears them (a list lets go of its memory).
    fn drain_into(&mut self, into: &mut Counts) {
        into.add(self);
        match &mut self.buckets {
            Buckets::Sparse(list) => *list = Vec::new(),
            Buckets::Dense(buckets) => buckets.fill(0),
        }
        self.sum = 0;
    }
}

/// A worker's counts of one subscription.
#[derive(Default)]
struct LocalCounts {
    queue_wait: Counts,
    handler: Counts,
    end_to_end: Counts,
    /// Whether anything was recorded since the last merge.
    dirty: bool,
    /// Kept at the last merge (a busy subscription's arrays): dropped at the next one unless
    /// it runs again by then.
    kept: bool,
}

impl LocalCounts {
    fn drain_into(&mut self, into: &mut Distributions) {
        self.queue_wait.drain_into(&mut into.queue_wait.counts);
        self.handler.drain_into(&mut into.handler.counts);
        self.end_to_end.drain_into(&mut into.end_to_end.counts);
        self.dirty = false;
    }

    /// Whether it holds only short lists (no array of every bucket).
    fn is_sparse(&self) -> bool {
        self.queue_wait.buckets.is_sparse()
            && self.handler.buckets.is_sparse()
            && self.end_to_end.buckets.is_sparse()
    }
}

/// The bytes of counts one worker keeps for one subscription it runs.
#[cfg(test)]
fn bytes_per_worker_handler() -> usize {
    3 * COUNTS_LEN * std::mem::size_of::<u64>()
}

/// Adds to a counter that has one writer: a load and a store, no read-modify-write.
#[inline]
fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// Publish counters of one (event type, source) owned by one thread at a time.
#[derive(Default)]
pub(crate) struct PublishSlot {
    published: AtomicU64,
    unmatched: AtomicU64,
    in_use: AtomicBool,
}

/// A publish slot a thread holds: it alone writes it, until it lets go.
pub(crate) struct HeldSlot {
    pub(crate) type_id: TypeId,
    pub(crate) source: NameId,
    slot: Arc<PublishSlot>,
}

impl HeldSlot {
    /// Counts `n` publishes.
    #[inline]
    pub(crate) fn count(&self, n: u64, unmatched: bool) {
        let add = |c: &AtomicU64| c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
        add(&self.slot.published);
        if unmatched {
            add(&self.slot.unmatched);
        }
    }

    /// Takes back `n` publishes counted for events that were not accepted after all.
    pub(crate) fn uncount(&self, n: u64, unmatched: bool) {
        let less = |c: &AtomicU64| c.store(c.load(Ordering::Relaxed) - n, Ordering::Relaxed);
        less(&self.slot.published);
        if unmatched {
            less(&self.slot.unmatched);
        }
    }
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        self.slot.in_use.store(false, Ordering::Release);
    }
}

/// The publish slots of one (event type, source).
struct PublishKey {
    event: &'static str,
    slots: Vec<Arc<PublishSlot>>,
}

/// A bus's publish counters per (event type, source): slots that publishing threads hold (in
/// their cached routes; see `registry`) and give back when they exit.
pub(crate) struct PublishCounters {
    pub(crate) enabled: bool,
    keys: Mutex<HashMap<(TypeId, NameId), PublishKey>>,
}

impl PublishCounters {
    pub(crate) fn new(enabled: bool) -> PublishCounters {
        PublishCounters {
            enabled,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a free slot of the key, or adds one.
    #[cold]
    pub(crate) fn take(&self, type_id: TypeId, event: &'static str, source: NameId) -> HeldSlot {
        let mut keys = self.keys.lock();
        let key = keys.entry((type_id, source)).or_insert_with(|| PublishKey {
            event,
            slots: Vec::new(),
        });
        let free = key.slots.iter().find(|s| {
            s.in_use
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        });
        let slot = match free {
            Some(slot) => slot.clone(),
            None => {
                let slot = Arc::new(PublishSlot {
                    in_use: AtomicBool::new(true),
                    ..PublishSlot::default()
                });
                key.slots.push(slot.clone());
                slot
            }
        };
        HeldSlot {
            type_id,
            source,
            slot,
        }
    }

    /// The counts, summed over the slots, sorted by event then source.
    pub(crate) fn event_counts(&self) -> Vec<EventCounts> {
        let keys = self.keys.lock();
        let sum = |key: &PublishKey, pick: fn(&PublishSlot) -> &AtomicU64| -> u64 {
            key.slots
                .iter()
                .map(|s| pick(s).load(Ordering::Relaxed))
                .sum()
        };
        let mut counts: Vec<EventCounts> = keys
            .iter()
            .map(|((_, source), key)| EventCounts {
                event: key.event.to_owned(),
                source: source.as_str().to_owned(),
                published: sum(key, |s| &s.published),
                unmatched: sum(key, |s| &s.unmatched),
            })
            .collect();
        counts.sort_by(|a, b| (&a.event, &a.source).cmp(&(&b.event, &b.source)));
        counts
    }
}

/// A bus's metrics: configuration, every subscription, and the merged latencies.
pub(crate) struct Metrics {
    pub(crate) enabled: bool,
    pub(crate) sample_every: u32,
    rows: Mutex<Rows>,
}

/// How many removed subscriptions keep their row in the metrics (the oldest go first).
const REMOVED_ROWS: usize = 64;

/// The subscriptions the metrics report, with their merged latencies.
#[derive(Default)]
struct Rows {
    /// Live subscriptions by id (subscription order).
    live: BTreeMap<u64, Row>,
    /// The last [`REMOVED_ROWS`] removed, oldest first.
    removed: VecDeque<Row>,
}

struct Row {
    meta: Arc<SubMeta>,
    latencies: Distributions,
}

impl Metrics {
    pub(crate) fn new(enabled: bool, sample_every: u32) -> Metrics {
        Metrics {
            enabled,
            sample_every,
            rows: Mutex::new(Rows::default()),
        }
    }

    /// Remembers a new subscription, to report it.
    pub(crate) fn subscribed(&self, meta: &Arc<SubMeta>) {
        if self.enabled {
            self.rows.lock().live.insert(
                meta.id,
                Row {
                    meta: meta.clone(),
                    latencies: Distributions::new(),
                },
            );
        }
    }

    /// A subscription ended: its row stays among the last [`REMOVED_ROWS`] removed, then
    /// goes (the bus's statistics keep counting what it did).
    pub(crate) fn unsubscribed(&self, id: u64) {
        let mut rows = self.rows.lock();
        if let Some(row) = rows.live.remove(&id) {
            rows.removed.push_back(row);
            if rows.removed.len() > REMOVED_ROWS {
                rows.removed.pop_front();
            }
        }
    }

    /// The per-handler and per-event-type figures, from the counters and the merged latencies.
    pub(crate) fn handler_metrics(&self) -> (Vec<HandlerMetrics>, Vec<EventLatency>) {
        let rows = self.rows.lock();
        let mut scratch = Scratch::new();
        let mut by_event: HashMap<&'static str, Distributions> = HashMap::new();
        let mut ordered: Vec<&Row> = rows.removed.iter().chain(rows.live.values()).collect();
        ordered.sort_by_key(|row| row.meta.id);
        let handlers = ordered
            .into_iter()
            .map(|Row { meta, latencies }| {
                by_event.entry(meta.event_name).or_default().add(latencies);
                let sum = |pick: fn(&HandlerCells) -> &AtomicU64| -> u64 {
                    meta.cells
                        .iter()
                        .map(|c| pick(c).load(Ordering::Relaxed))
                        .sum()
                };
                let outcomes = meta.outcomes.read();
                HandlerMetrics {
                    id: meta.id,
                    service: meta.service.as_str().to_owned(),
                    handler: meta.name.to_string(),
                    event: meta.event_name.to_owned(),
                    active: meta.active.load(Ordering::Relaxed),
                    delivered: sum(|c| &c.delivered),
                    succeeded: sum(|c| &c.succeeded) + outcomes.succeeded,
                    failed: outcomes.failed,
                    panicked: outcomes.panicked,
                    retried: outcomes.retried,
                    dead_lettered: outcomes.dead_lettered,
                    cancelled: outcomes.cancelled,
                    dropped: outcomes.dropped,
                    paused: meta.is_paused(),
                    parked: meta.parked.load(Ordering::Relaxed),
                    breaker: meta.breaker.as_ref().map(|b| b.state()),
                    breaker_opened: meta
                        .breaker
                        .as_ref()
                        .map_or(0, |b| b.opened.load(Ordering::Relaxed)),
                    ordered: meta.ordered,
                    held_keys: 0,
                    queue_wait: latencies.queue_wait.summary(&mut scratch),
                    handler_time: latencies.handler.summary(&mut scratch),
                    end_to_end: latencies.end_to_end.summary(&mut scratch),
                }
            })
            .collect();
        let mut event_latency: Vec<EventLatency> = by_event
            .into_iter()
            .map(|(event, d)| EventLatency {
                event: event.to_owned(),
                queue_wait: d.queue_wait.summary(&mut scratch),
                handler_time: d.handler.summary(&mut scratch),
                end_to_end: d.end_to_end.summary(&mut scratch),
            })
            .collect();
        event_latency.sort_by(|a, b| a.event.cmp(&b.event));
        (handlers, event_latency)
    }
}

/// A worker's request word and answer word: the bus asks by moving `want` on, the worker
/// answers by storing it in `done` once its latencies are merged.
#[derive(Default)]
pub(crate) struct Collect {
    pub(crate) want: AtomicU64,
    pub(crate) done: AtomicU64,
}

/// `done` of a worker that has exited: it will record nothing more.
pub(crate) const EXITED: u64 = u64::MAX;

impl Collect {
    /// Asks for the latencies; returns the answer to wait for.
    pub(crate) fn ask(&self) -> u64 {
        self.want.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Whether the worker answered request `asked` (or exited).
    pub(crate) fn answered(&self, asked: u64) -> bool {
        self.done.load(Ordering::Acquire) >= asked
    }

    /// Waits until every worker answered its request, or the wait runs out; returns the
    /// workers that did not answer.
    pub(crate) fn wait_all<'a>(
        asked: impl Iterator<Item = (&'a Collect, u64)> + Clone,
        skip: Option<usize>,
    ) -> Vec<usize> {
        let deadline = Instant::now() + COLLECT_WAIT;
        let mut spins = 0u32;
        loop {
            let behind: Vec<usize> = asked
                .clone()
                .enumerate()
                .filter(|&(i, (c, n))| Some(i) != skip && !c.answered(n))
                .map(|(i, _)| i)
                .collect();
            if behind.is_empty() || Instant::now() >= deadline {
                let mut behind = behind;
                behind.extend(skip);
                behind.sort_unstable();
                return behind;
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

/// How many subscriptions a worker keeps latencies of before it merges them unasked: what a
/// worker holds stays bounded even when nobody asks for metrics.
const LOCAL_SUBSCRIPTIONS: usize = 1024;

/// Hashes subscription ids (consecutive numbers) for the recorder's map: one multiplication.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A worker's own latency recorder. Only the worker thread touches it.
pub(crate) struct Recorder {
    worker: usize,
    sample_every: u32,
    /// Deliveries to skip before the next sampled one.
    countdown: u32,
    /// Per subscription, once the worker has recorded for it since the last merge (a busy one
    /// keeps its arrays from one merge to the next).
    by_sub: HashMap<u64, Box<LocalCounts>, BuildHasherDefault<IdHasher>>,
    /// Subscriptions with latencies not merged yet.
    dirty: Vec<u64>,
    /// The last request answered.
    answered: u64,
}

impl Recorder {
    pub(crate) fn new(worker: usize, sample_every: u32) -> Recorder {
        Recorder {
            worker,
            sample_every,
            countdown: 0,
            by_sub: HashMap::default(),
            dirty: Vec::new(),
            answered: 0,
        }
    }

    /// Whether to time the next delivery.
    #[inline]
    pub(crate) fn sample(&mut self) -> bool {
        if self.countdown == 0 {
            self.countdown = self.sample_every - 1;
            true
        } else {
            self.countdown -= 1;
            false
        }
    }

    /// Counts a delivery handed to `meta`'s handler; `first`: its first attempt.
    #[inline]
    pub(crate) fn starts(&self, meta: &SubMeta, first: bool) {
        if first && let Some(cells) = meta.cells.get(self.worker) {
            bump(&cells.delivered);
        }
    }

    /// Counts a delivery that `meta`'s handler completed.
    #[inline]
    pub(crate) fn succeeded(&self, meta: &SubMeta) {
        if let Some(cells) = meta.cells.get(self.worker) {
            bump(&cells.succeeded);
        }
    }

    /// Records the times of a sampled delivery: the handler ran from `start` to `end`
    /// (nanoseconds since the epoch) for event `id`. `first`: the event's first attempt, with a
    /// queue wait; `from_publish`: a delivery whose end-to-end time counts (not a redrive).
    #[inline]
    pub(crate) fn record(&mut self, meta: &SubMeta, id: EventId, span: Span) {
        let d = self.by_sub.entry(meta.id).or_default();
        if !d.dirty {
            d.dirty = true;
            self.dirty.push(meta.id);
        }
        let published = id.unix_nanos();
        if span.first {
            d.queue_wait.record(span.start.saturating_sub(published));
        }
        d.handler.record(span.end.saturating_sub(span.start));
        if span.succeeded && span.from_publish {
            d.end_to_end.record(span.end.saturating_sub(published));
        }
    }

    /// Answers an outstanding request: merges what was recorded into the bus's latencies. It
    /// merges unasked too once it holds latencies of many subscriptions.
    #[inline]
    pub(crate) fn answer(&mut self, metrics: &Metrics, collect: &Collect) {
        let want = collect.want.load(Ordering::Relaxed);
        if want != self.answered {
            self.merge(metrics);
            self.answered = want;
            collect.done.store(want, Ordering::Release);
        } else if self.by_sub.len() > LOCAL_SUBSCRIPTIONS {
            self.merge(metrics);
        }
    }

    /// Merges what was recorded and says no more will come (the worker exits).
    pub(crate) fn exit(&mut self, metrics: &Metrics, collect: &Collect) {
        self.merge(metrics);
        self.by_sub = HashMap::default();
        collect.done.store(EXITED, Ordering::Release);
    }

    /// Adds what was recorded to the bus's latencies (those of a subscription that has ended
    /// are dropped), and lets go of the counts of subscriptions that ran little: a list is
    /// made again when one runs, while a busy one keeps its arrays until a whole merge
    /// interval passes without it.
    #[cold]
    fn merge(&mut self, metrics: &Metrics) {
        if self.dirty.is_empty() && self.by_sub.is_empty() {
            return;
        }
        {
            let mut rows = metrics.rows.lock();
            let mut gone = Distributions::new();
            for id in self.dirty.drain(..) {
                let Some(local) = self.by_sub.get_mut(&id) else {
                    continue;
                };
                let into = match rows.live.get_mut(&id) {
                    Some(row) => &mut row.latencies,
                    None => &mut gone,
                };
                local.drain_into(into);
                local.kept = !local.is_sparse();
            }
        }
        self.by_sub
            .retain(|_, local| std::mem::take(&mut local.kept));
    }
}

/// The times of one sampled delivery.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// The event's first attempt: the queue wait counts.
    pub(crate) first: bool,
    /// Not a redrive: the time from publish counts.
    pub(crate) from_publish: bool,
    pub(crate) succeeded: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The summary the crate itself makes of `values`.
    fn by_the_crate(values: &[u64]) -> (Latency, Vec<(u64, u64)>) {
        let mut h = Scratch::new().0;
        let mut sum = 0u64;
        for &v in values {
            h.saturating_record(v);
            sum = sum.saturating_add(v);
        }
        let summary = summarise(&h, sum);
        let buckets = h
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        (summary, buckets)
    }

    /// The same, counted by a worker and merged.
    fn counted_and_merged(values: &[u64]) -> Distribution {
        let mut counts = Counts::default();
        for &v in values {
            counts.record(v);
        }
        let mut d = Distribution::default();
        counts.drain_into(&mut d.counts);
        assert_eq!(counts.sum, 0);
        assert!(counts.is_empty());
        d
    }

    /// The buckets of `d` as the crate reports them.
    fn buckets(d: &Distribution) -> Vec<(u64, u64)> {
        let mut scratch = Scratch::new();
        d.summary(&mut scratch);
        scratch
            .0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    #[test]
    fn the_workers_layout_is_the_crates() {
        assert_eq!(Scratch::new().0.distinct_values(), COUNTS_LEN);
        let mut values: Vec<u64> = (0..=5_000).collect();
        for shift in 0..40 {
            let p = 1u64 << shift;
            values.extend([p - 1, p, p + 1, p * 3 / 2]);
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x % 100_000_000_000);
        }
        values.extend([
            HIGHEST_NANOS - 1,
            HIGHEST_NANOS,
            HIGHEST_NANOS + 1,
            u64::MAX / 2,
        ]);
        let (summary, direct) = by_the_crate(&values);
        let merged = counted_and_merged(&values);
        assert_eq!(buckets(&merged), direct);
        let mut summed = summary;
        // The exact sum wraps where the crate's saturates: only the giant values differ.
        summed.sum_ns = merged.counts.sum;
        assert_eq!(merged.summary(&mut Scratch::new()), summed);
        for index in 0..COUNTS_LEN {
            assert_eq!(index_for(value_for(index)), index, "{index}");
        }
    }

    #[test]
    fn few_buckets_stay_a_short_list_and_many_become_the_array() {
        // Stated in the crate docs (Metrics): a busy worker × handler pair.
        assert_eq!(bytes_per_worker_handler(), 92_160);
        let few = counted_and_merged(&[1_000, 1_000, 2_000, 5_000_000]);
        assert!(few.counts.buckets.is_sparse());
        let mut three = Distributions::new();
        three.handler.add(&few);
        assert!(three.heap_bytes() <= 4 * 16, "{}", three.heap_bytes());
        let values: Vec<u64> = (0..SPARSE_BUCKETS as u64 + 1).map(|v| v * 1000).collect();
        let many = counted_and_merged(&values);
        assert!(!many.counts.buckets.is_sparse());
        assert_eq!(many.summary(&mut Scratch::new()), by_the_crate(&values).0);
    }

    #[test]
    fn a_distribution_summarises_what_it_recorded() {
        let values: Vec<u64> = (1..=1000u64).map(|v| v * 1000).collect();
        let d = counted_and_merged(&values);
        let scratch = &mut Scratch::new();
        let s = d.summary(scratch);
        assert_eq!(s.count, 1000);
        assert_eq!(s.sum_ns, 1000 * 500_500);
        assert!(s.p50_ns.abs_diff(500_000) <= 5_000, "{s:?}");
        assert!(s.p99_ns.abs_diff(990_000) <= 10_000, "{s:?}");
        assert!(s.max_ns.abs_diff(1_000_000) <= 10_000, "{s:?}");
        let mut total = Distribution::default();
        total.add(&d);
        total.add(&d);
        assert_eq!(total.summary(scratch).count, 2000);
        assert_eq!(Distribution::default().summary(scratch), Latency::default());
        // The scratch histogram is reset between summaries.
        assert_eq!(d.summary(scratch), s);
    }

    #[test]
    fn latencies_beyond_the_range_are_kept_as_its_top() {
        let d = counted_and_merged(&[3_600_000_000_000, 0]);
        let s = d.summary(&mut Scratch::new());
        assert_eq!(s.count, 2);
        assert!(s.max_ns >= HIGHEST_NANOS && s.max_ns <= HIGHEST_NANOS * 101 / 100);
        assert_eq!(s.min_ns, 0);
    }
}
