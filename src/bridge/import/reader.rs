//! The reading thread of an import: `XREADGROUP` (a second read in flight), `XACK` of what
//! settled in the same round trip, claims, refreshes, the lease and the group's status.

use super::*;

/// One import thread's state.
pub(super) struct Importer {
    pub(super) bus: Bus,
    /// What it last observed of its group (lag, pending, oldest pending idle time).
    pub(super) status: Arc<Mutex<ImportStatus>>,
    pub(super) stream: String,
    pub(super) consumer: String,
    /// The value of this process's lease on `consumer`.
    pub(super) token: String,
    pub(super) options: ImportOptions,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) counters: Arc<Counters>,
    /// Entries taken and not acknowledged yet: a claim leaves them alone (the claim resets
    /// their idle time, and they would come back as their own duplicates).
    pub(super) held: std::collections::HashSet<String>,
    /// The entries read, each with how often it was delivered and whether Redis has seen its
    /// event, on their way to the publishing thread.
    pub(super) pages: crossbeam_channel::Sender<Page>,
    /// What became of the entries handed over.
    pub(super) settled: crossbeam_channel::Receiver<Settle>,
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

impl Importer {
    /// Reads until the bridge or the bus stops, then lets go of the consumer name.
    pub(super) fn run(mut self, link: &mut Link) {
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
