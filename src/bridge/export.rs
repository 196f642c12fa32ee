//! Exporting: a subscription that encodes each event on the worker and defers its delivery
//! to an export thread, which pipelines the `XADD`s and settles each delivery with its reply.

use super::*;

impl Bridge {
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
