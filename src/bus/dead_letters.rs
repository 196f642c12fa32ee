//! The dead letters as users see them ([`DeadLetters`]): list, filter, export, load, redrive
//! and purge, over the ring and the engine.

use super::*;
use crate::dead_letter::{DeadLetterFilter, Line};
use crate::stats::HeldKey;

/// What [`DeadLetters::load_json_lines`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadSummary {
    /// Dead letters loaded into the ring.
    pub loaded: usize,
    /// Of those, how many cannot be redriven (see [`DeadLetter::not_redrivable`]).
    pub not_redrivable: usize,
    /// Lines that are not dead letters: their numbers (from 1) and what was wrong (a line
    /// that is not UTF-8, say one cut in the middle of a character by a crash, is one of
    /// them). Loading goes on past them.
    pub malformed: Vec<(usize, String)>,
    /// Dead letters read but not kept because dead letters are off
    /// ([`dead_letter_capacity(0)`](crate::BusBuilder::dead_letter_capacity)).
    pub not_kept: usize,
}

/// A redrive of many dead letters ([`DeadLetters::redrive_where`],
/// [`DeadLetters::redrive_all`]) that the bus's shutdown cut short: some dead letters may
/// already have gone back out, the rest stayed in the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedriveCutShort {
    /// Dead letters that went back to their subscriptions before the bus shut down. Like any
    /// accepted delivery they run, or are settled by the shutdown (a redrive still waiting
    /// then becomes a dead letter again, with reason
    /// [`Shutdown`](DeadLetterReason::Shutdown)).
    pub redriven: usize,
    /// Dead letters that matched and stayed in the ring: not sent because the bus was shutting
    /// down, or because their subscription has ended.
    pub stayed: usize,
}

impl fmt::Display for RedriveCutShort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the bus shut down during the redrive: {} dead letters went back out, {} stayed in the ring",
            self.redriven, self.stayed
        )
    }
}

impl std::error::Error for RedriveCutShort {}

/// The bus's dead letters: list, filter, export, redrive, purge. From
/// [`Bus::dead_letters`](crate::Bus::dead_letters).
///
/// # Examples
///
/// ```
/// use microbus::{Bus, Context, Event, HandlerError, HandlerResult, RetryPolicy};
/// use serde::{Deserialize, Serialize};
/// use std::time::Duration;
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct Charge { cents: i64 }
/// impl Event for Charge { const NAME: &'static str = "Charge"; }
///
/// let bus = Bus::builder().workers(1).retry(RetryPolicy::none()).build()?;
/// bus.subscribe(|_: &Charge, _: &Context| -> HandlerResult { Err(HandlerError::msg("declined")) })?;
/// bus.publish(Charge { cents: 500 })?;
/// bus.flush(Duration::from_secs(5))?;
///
/// let dead = bus.dead_letters();
/// assert_eq!(dead.len(), 1);
/// let letter = &dead.list()[0];
/// assert_eq!(letter.errors(), ["declined"]);
/// assert_eq!(letter.payload_json(), r#"{"cents":500}"#);
/// assert_eq!(dead.purge(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DeadLetters {
    pub(crate) core: Arc<Core>,
}

impl DeadLetters {
    fn ring(&self) -> &Ring {
        &self.core.dead_letters
    }

    /// Puts letters back in the ring, handing any it evicts to the sink.
    fn put_back(&self, letters: Vec<DeadLetter>) {
        let after = self.ring().put_back(letters);
        self.core.letters_gone(after.evicted(), true);
        self.ring().call_back(after, &mut &self.core.panics);
    }

    /// How many dead letters the ring holds.
    pub fn len(&self) -> usize {
        self.ring().len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many it holds at most (0: dead letters are off).
    pub fn capacity(&self) -> usize {
        self.ring().capacity()
    }

    /// How many were evicted from the full ring (to the sink, if one is set).
    pub fn evicted(&self) -> u64 {
        self.ring().evicted()
    }

    /// How many evicted dead letters the [`dead_letter_file`](crate::BusBuilder::dead_letter_file)
    /// sink could not write.
    pub fn sink_failures(&self) -> u64 {
        self.ring().sink_failures.load(Ordering::Relaxed)
    }

    /// The keys of ordered subscriptions that their dead letters hold now
    /// ([`hold_on_dead_letter`](crate::SubscribeOptions::hold_on_dead_letter)), oldest first,
    /// with how many deliveries wait behind each.
    pub fn held(&self) -> Vec<HeldKey> {
        self.core.held_keys()
    }

    /// Every dead letter, oldest first.
    pub fn list(&self) -> Vec<DeadLetter> {
        self.filter(&DeadLetterFilter::new())
    }

    /// The dead letters that match `filter`, oldest first.
    pub fn filter(&self, filter: &DeadLetterFilter) -> Vec<DeadLetter> {
        let mut found = Vec::new();
        self.ring().each(filter, |l| found.push(l.clone()));
        found
    }

    /// Every dead letter as JSON lines (one object per line, oldest first).
    pub fn export_json_lines(&self) -> String {
        let mut out = String::new();
        self.ring().each(&DeadLetterFilter::new(), |l| {
            out.push_str(&l.to_json());
            out.push('\n');
        });
        out
    }

    /// Sends dead letter `id` back to its subscription, as attempt 1 of a new delivery with
    /// the same envelope (id, correlation and all). It leaves the ring.
    ///
    /// # Errors
    ///
    /// [`RedriveError`]: no such dead letter, its subscription has ended, or the bus is shut
    /// down (in those last two cases it stays in the ring).
    pub fn redrive(&self, id: u64) -> Result<(), RedriveError> {
        let letter = self.ring().take_id(id).ok_or(RedriveError::NotFound(id))?;
        self.core.redrive(letter).map_err(|(letter, error)| {
            self.put_back(vec![letter]);
            error
        })
    }

    /// Redrives every dead letter that matches `filter` and returns how many went back. Those
    /// whose subscription has ended, or that cannot be redriven, stay in the ring.
    ///
    /// # Errors
    ///
    /// [`RedriveCutShort`] when the bus is shutting down, before or during the redrive: how
    /// many went back out before it, and how many stayed in the ring.
    pub fn redrive_where(&self, filter: &DeadLetterFilter) -> Result<usize, RedriveCutShort> {
        let mut kept = Vec::new();
        let mut sent = 0;
        let mut shutdown = false;
        for letter in self.ring().take(filter) {
            if shutdown {
                kept.push(letter);
                continue;
            }
            match self.core.redrive(letter) {
                Ok(()) => sent += 1,
                Err((letter, error)) => {
                    shutdown = matches!(error, RedriveError::Shutdown(_));
                    kept.push(letter);
                }
            }
        }
        let stayed = kept.len();
        self.put_back(kept);
        if shutdown {
            Err(RedriveCutShort {
                redriven: sent,
                stayed,
            })
        } else {
            Ok(sent)
        }
    }

    /// Redrives every dead letter; see [`redrive_where`](Self::redrive_where).
    ///
    /// # Errors
    ///
    /// As [`redrive_where`](Self::redrive_where).
    pub fn redrive_all(&self) -> Result<usize, RedriveCutShort> {
        self.redrive_where(&DeadLetterFilter::new())
    }

    /// Loads dead letters exported with [`export_json_lines`](Self::export_json_lines) or written by a
    /// [`dead_letter_file`](crate::BusBuilder::dead_letter_file) sink — say, after a restart —
    /// into the ring, with new ids. Each is matched to the event type subscribed under its name
    /// and version and to the subscription of its service with its handler's name, so that it
    /// can be redriven. One that no longer decodes, or whose type or subscription is not there,
    /// is kept all the same, with its payload as raw JSON and the reason
    /// ([`DeadLetter::not_redrivable`]).
    ///
    /// With dead letters off the lines are read and checked, and counted as not kept.
    ///
    /// # Errors
    ///
    /// The reader's I/O errors: the entries before the error are loaded, and the error does
    /// not say how many (read such a source into memory first if that matters). Lines that
    /// are not dead letters at all, or not UTF-8, are counted in the summary, not fatal.
    pub fn load_json_lines(
        &self,
        mut reader: impl std::io::BufRead,
    ) -> std::io::Result<LoadSummary> {
        let mut summary = LoadSummary::default();
        let mut bytes = Vec::new();
        for number in 1.. {
            bytes.clear();
            if reader.read_until(b'\n', &mut bytes)? == 0 {
                break;
            }
            let line = match std::str::from_utf8(&bytes) {
                Ok(line) => line,
                Err(e) => {
                    summary.malformed.push((number, format!("not UTF-8: {e}")));
                    continue;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Line>(line) {
                Ok(_) if !self.ring().enabled() => summary.not_kept += 1,
                Ok(parsed) => {
                    let letter = self.core.rebuild(parsed);
                    if letter.blocked.is_some() {
                        summary.not_redrivable += 1;
                    }
                    summary.loaded += 1;
                    let after = self.ring().push(letter);
                    self.ring().call_back(after, &mut &self.core.panics);
                }
                Err(e) => summary.malformed.push((number, e.to_string())),
            }
        }
        Ok(summary)
    }

    /// Removes dead letter `id` without running it, and releases the key it held (see
    /// [`hold_on_dead_letter`](crate::SubscribeOptions::hold_on_dead_letter)): the key's later
    /// deliveries run. `false` when there is no such dead letter.
    pub fn skip(&self, id: u64) -> bool {
        let Some(letter) = self.ring().take_id(id) else {
            return false;
        };
        self.core.letters_gone(std::slice::from_ref(&letter), false);
        // Its event's `Drop` is user code.
        self.core.panics.drop(letter);
        true
    }

    /// Removes every dead letter and returns how many there were.
    pub fn purge(&self) -> usize {
        self.purge_where(&DeadLetterFilter::new())
    }

    /// Removes the dead letters that match `filter` and returns how many there were. A purged
    /// dead letter that held its key
    /// ([`hold_on_dead_letter`](crate::SubscribeOptions::hold_on_dead_letter)) releases it.
    pub fn purge_where(&self, filter: &DeadLetterFilter) -> usize {
        let purged = self.ring().take(filter);
        self.core.letters_gone(&purged, false);
        let n = purged.len();
        // Their events' `Drop` is user code.
        self.core.panics.drop(purged);
        n
    }
}

impl fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .field("evicted", &self.evicted())
            .finish()
    }
}
