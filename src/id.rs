//! Event ids: minted cheaply, unique, time-sortable, in the UUIDv7 layout.
//!
//! Ground rules: an [`EventId`] is minted on the publishing thread from a thread-local block of
//! sequence numbers (one shared `fetch_add` per [`ID_BLOCK`] ids) and a cheap clock (a TSC read
//! through `quanta`, anchored once to the wall clock).

use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroU64;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    pub(crate) hi: u64,
    pub(crate) lo: NonZeroU64,
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
}
