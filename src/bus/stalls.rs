//! Stalled deliveries: the timer thread looks at each worker a few times per `stall_after` and
//! reports a delivery that has run longer, once.
//!
//! Observed, never pre-empted: a worker only counts the deliveries it begins
//! ([`WorkerShared::begin`]); the timer thread remembers what it last saw of each worker, and
//! when. The same delivery seen running for `stall_after` or longer is a stall: counted, listed
//! while it runs, and handed to the `on_stall` callback on the bus's report thread.

use std::sync::Weak;

use super::*;
use crate::guard::Seam;
use crate::shard::{ABANDONED, IDLE, seam_of};
use crate::stats::Stall;

/// The user's stall callback.
pub(crate) type StallHook = Arc<dyn Fn(&Stall) + Send + Sync>;

/// Checks at least this often while stall detection is on.
const LONGEST_CHECK: Duration = Duration::from_secs(5);
/// And at most this often.
const SHORTEST_CHECK: Duration = Duration::from_millis(1);

/// The bus's stall detection.
pub(crate) struct Stalls {
    hook: Option<StallHook>,
    /// The bus's `stall_after`.
    after: Duration,
    /// The shortest `stall_after` of the bus and its subscriptions, in nanoseconds
    /// (`u64::MAX`: off): it sets how often the timer thread looks.
    shortest: AtomicU64,
    /// What the timer thread last saw of each worker.
    seen: Mutex<Vec<Seen>>,
    /// The stalls still running when last looked at.
    current: Mutex<Vec<Current>>,
    total: AtomicU64,
}

#[derive(Clone, Copy, Default)]
struct Seen {
    state: u64,
    begun: u64,
    since: Option<Instant>,
    reported: bool,
}

struct Current {
    stall: Stall,
    since: Instant,
    state: u64,
    begun: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Stalls {
    pub(crate) fn new(after: Duration, hook: Option<StallHook>, workers: usize) -> Stalls {
        Stalls {
            hook,
            after,
            shortest: AtomicU64::new(nanos(after)),
            seen: Mutex::new(vec![Seen::default(); workers]),
            current: Mutex::new(Vec::new()),
            total: AtomicU64::new(0),
        }
    }

    /// Deliveries reported as stalled so far.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// A subscription with its own `stall_after` joined: the timer thread may need to look
    /// more often. `true` when it does.
    pub(crate) fn subscribed(&self, after: Duration) -> bool {
        nanos(after) < self.shortest.fetch_min(nanos(after), Ordering::Relaxed)
    }

    /// How long after now the timer thread looks again; `None` while detection is off.
    fn interval(&self) -> Option<Duration> {
        match self.shortest.load(Ordering::Relaxed) {
            u64::MAX => None,
            shortest => {
                Some((Duration::from_nanos(shortest) / 4).clamp(SHORTEST_CHECK, LONGEST_CHECK))
            }
        }
    }
}

/// The timer thread's look at the workers: reports each delivery newly seen running past its
/// `stall_after`, forgets those that ended. Returns when to look next.
pub(crate) fn watch_stalls(core: &Arc<Core>) -> Option<Instant> {
    let stalls = &core.stalls;
    let interval = stalls.interval()?;
    let now = core.clock.now();
    let mut seen = stalls.seen.lock();
    let mut reports = Vec::new();
    for (index, shard) in core.shards.iter().enumerate() {
        let worker = &shard.worker;
        let state = worker.state.load(Ordering::Acquire);
        let begun = worker.begun.load(Ordering::Relaxed);
        let last = &mut seen[index];
        let running = state != IDLE && state != ABANDONED && seam_of(state).is_none();
        if !running || (last.state, last.begun) != (state, begun) || last.since.is_none() {
            *last = Seen {
                state,
                begun,
                since: running.then_some(now),
                reported: false,
            };
            continue;
        }
        let since = last.since.unwrap_or(now);
        if last.reported {
            continue;
        }
        let Some(meta) = core.registry.lookup(state) else {
            continue;
        };
        let running_for = now.saturating_duration_since(since);
        if running_for < meta.stall_after.unwrap_or(stalls.after) {
            continue;
        }
        let Some(event_id) = worker.current_event() else {
            continue;
        };
        last.reported = true;
        let stall = Stall {
            worker: index,
            lane: core.lanes[meta.lane as usize].name.clone(),
            service: meta.service.as_str().to_owned(),
            handler: meta.name.to_string(),
            event: meta.event_name.to_owned(),
            event_id,
            running_for,
        };
        reports.push(Current {
            stall,
            since,
            state,
            begun,
        });
    }
    drop(seen);
    let mut current = stalls.current.lock();
    current.retain(|c| still_running(core, c));
    for report in reports {
        stalls.total.fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &stalls.hook {
            let (hook, stall) = (hook.clone(), report.stall.clone());
            call_off_thread(core, Seam::Stall, move || hook(&stall));
        }
        current.push(report);
    }
    Some(now + interval)
}

fn still_running(core: &Core, c: &Current) -> bool {
    let worker = &core.shards[c.stall.worker].worker;
    worker.state.load(Ordering::Acquire) == c.state
        && worker.begun.load(Ordering::Relaxed) == c.begun
}

/// A user callback to run off the workers and the timer.
type Job = Box<dyn FnOnce() + Send>;

/// The thread that runs the bus's reports to user code (stalls, breaker changes) in the order
/// they were made, started on the first one: a callback that blocks holds back no worker and
/// not the timer, only the reports after it. It keeps no bus alive, and ends with it.
#[derive(Default)]
pub(crate) struct Reports {
    queue: Mutex<Option<crossbeam_channel::Sender<(Seam, Job)>>>,
}

/// Runs `f` on the bus's report thread; a panic is counted at `seam` if the bus is still
/// there.
pub(crate) fn call_off_thread(core: &Core, seam: Seam, f: impl FnOnce() + Send + 'static) {
    let mut queue = core.reports.queue.lock();
    if queue.is_none() {
        let (tx, rx) = crossbeam_channel::unbounded::<(Seam, Job)>();
        let bus: Weak<Core> = core.this.clone();
        let spawned = std::thread::Builder::new()
            .name("microbus-reports".to_owned())
            .spawn(move || {
                for (seam, job) in rx {
                    if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(job)) {
                        crate::guard::drop_payload(payload);
                        if let Some(core) = bus.upgrade() {
                            core.panics.count(seam);
                        }
                    }
                }
            });
        if spawned.is_err() {
            // No thread to be had: the report is counted and listed all the same.
            return;
        }
        *queue = Some(tx);
    }
    if let Some(tx) = queue.as_ref() {
        let _ = tx.send((seam, Box::new(f)));
    }
}

impl Core {
    /// The stalls running now, with how long each has run.
    pub(crate) fn stalls_now(&self) -> Vec<Stall> {
        let now = self.clock.now();
        self.stalls
            .current
            .lock()
            .iter()
            .filter(|c| still_running(self, c))
            .map(|c| Stall {
                running_for: now.saturating_duration_since(c.since),
                ..c.stall.clone()
            })
            .collect()
    }
}
