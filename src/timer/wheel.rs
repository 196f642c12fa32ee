//! A hashed, hierarchical timing wheel over integer ticks (Varghese & Lauck, "Hashed and
//! Hierarchical Timing Wheels", SOSP 1987).
//!
//! Ground rules: a plain data structure — no thread, no clock. The owner says what time it is
//! by calling [`Wheel::advance`] with a tick, and gets back every entry whose deadline is at or
//! before it. [`LEVELS`] levels of [`SLOTS`] slots each: level `l` slot `s` holds the entries
//! due within `SLOTS^l` ticks starting at its slot's time, so the wheel spans `SLOTS^LEVELS`
//! ticks (2^36: 2.2 years of 1 ms ticks) ahead of its current tick. Entries due further ahead
//! wait in an overflow list and enter the wheel when they come within range. Scheduling is
//! O(1); an entry moves down at most `LEVELS - 1` times before it fires; finding the next
//! occupied slot is a bit scan per level.
//!
//! An entry never fires before its deadline, and an owner that advances one tick at a time gets
//! each entry at exactly its deadline tick.

/// Slots per level.
pub(crate) const SLOTS: usize = 64;
const SLOT_BITS: u32 = 6;
/// Levels of the wheel.
pub(crate) const LEVELS: usize = 6;
/// How many ticks ahead of its current tick the wheel holds entries; further ones overflow.
pub(crate) const RANGE: u64 = 1 << (SLOT_BITS * LEVELS as u32);

#[derive(Debug)]
struct Level<T> {
    slots: Vec<Vec<(u64, T)>>,
    /// Bit `s` is set when slot `s` holds entries.
    occupied: u64,
}

impl<T> Level<T> {
    fn new() -> Level<T> {
        Level {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            occupied: 0,
        }
    }
}

/// A timing wheel holding entries of type `T`, each with a deadline tick.
#[derive(Debug)]
pub struct Wheel<T> {
    now: u64,
    levels: Vec<Level<T>>,
    /// Entries whose deadline has passed when they were scheduled: due at the next advance.
    due: Vec<(u64, T)>,
    /// Entries due `RANGE` or more ticks ahead of `now`, and the earliest of their deadlines.
    overflow: Vec<(u64, T)>,
    overflow_min: u64,
    len: usize,
}

impl<T> Wheel<T> {
    /// An empty wheel whose current tick is `now`.
    pub fn new(now: u64) -> Wheel<T> {
        Wheel {
            now,
            levels: (0..LEVELS).map(|_| Level::new()).collect(),
            due: Vec::new(),
            overflow: Vec::new(),
            overflow_min: u64::MAX,
            len: 0,
        }
    }

    /// The current tick: everything due at or before it has been returned.
    #[cfg(test)]
    pub(crate) fn now(&self) -> u64 {
        self.now
    }

    /// How many entries wait.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no entry waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `value`, due at tick `deadline`. A deadline at or before the current tick is due
    /// at the next advance.
    pub fn schedule(&mut self, deadline: u64, value: T) {
        self.len += 1;
        self.place(deadline, value);
    }

    fn place(&mut self, deadline: u64, value: T) {
        if deadline <= self.now {
            self.due.push((deadline, value));
        } else if deadline - self.now >= RANGE {
            self.overflow_min = self.overflow_min.min(deadline);
            self.overflow.push((deadline, value));
        } else {
            let (level, slot) = position(self.now, deadline);
            let level = &mut self.levels[level];
            level.slots[slot].push((deadline, value));
            level.occupied |= 1 << slot;
        }
    }

    /// The tick at which the earliest occupied slot (or the overflow list) needs attention: no
    /// entry is due before it. `None` when the wheel is empty.
    pub fn next_tick(&self) -> Option<u64> {
        if !self.due.is_empty() {
            return Some(self.now);
        }
        let wheel = (0..LEVELS).find_map(|l| self.next_in_level(l).map(|(_, tick)| tick));
        let overflow = (!self.overflow.is_empty()).then(|| self.overflow_min - (RANGE - 1));
        match (wheel, overflow) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The earliest deadline of all entries (`None`: the wheel is empty). The earliest entry
    /// is in the next occupied slot of the lowest occupied level, or in the overflow list.
    pub fn earliest(&self) -> Option<u64> {
        let due = self.due.iter().map(|(d, _)| *d).min();
        let wheel = (0..LEVELS).find_map(|l| {
            let (slot, _) = self.next_in_level(l)?;
            self.levels[l].slots[slot].iter().map(|(d, _)| *d).min()
        });
        let overflow = (!self.overflow.is_empty()).then_some(self.overflow_min);
        [due, wheel, overflow].into_iter().flatten().min()
    }

    /// The next occupied slot of `level` and the tick at which it starts.
    fn next_in_level(&self, level: usize) -> Option<(usize, u64)> {
        let occupied = self.levels[level].occupied;
        if occupied == 0 {
            return None;
        }
        let shift = SLOT_BITS * level as u32;
        let slot_range = 1u64 << shift;
        let level_range = slot_range << SLOT_BITS;
        let now_slot = ((self.now >> shift) & (SLOTS as u64 - 1)) as u32;
        // Slots after the current one come round in this rotation; the current slot and the
        // ones before it only in the next (just the top level has entries there: see
        // `position`).
        let later = occupied & (u64::MAX << now_slot << 1);
        let (slot, rotation) = if later != 0 {
            (later.trailing_zeros() as usize, 0)
        } else {
            (occupied.trailing_zeros() as usize, level_range)
        };
        let level_start = self.now & !(level_range - 1);
        let tick = level_start + rotation + slot as u64 * slot_range;
        Some((slot, tick))
    }

    /// Moves the current tick to `to` (if later) and appends to `out` every entry due at or
    /// before it.
    pub fn advance(&mut self, to: u64, out: &mut Vec<T>) {
        let fired = out.len();
        out.extend(self.due.drain(..).map(|(_, v)| v));
        loop {
            self.promote_overflow();
            // The earliest occupied slot is in the lowest occupied level: an entry in level `l`
            // is due before the next slot of level `l + 1` begins.
            let next =
                (0..LEVELS).find_map(|l| self.next_in_level(l).map(|(slot, tick)| (tick, l, slot)));
            match next {
                Some((tick, level, slot)) if tick <= to => {
                    self.now = self.now.max(tick);
                    let entries = std::mem::take(&mut self.levels[level].slots[slot]);
                    self.levels[level].occupied &= !(1 << slot);
                    for (deadline, value) in entries {
                        if deadline <= self.now {
                            out.push(value);
                        } else {
                            self.place(deadline, value);
                        }
                    }
                }
                _ => {
                    let promote_at = (!self.overflow.is_empty())
                        .then(|| self.overflow_min - (RANGE - 1))
                        .filter(|&t| t <= to);
                    match promote_at {
                        Some(t) => self.now = self.now.max(t),
                        None => {
                            self.now = self.now.max(to);
                            break;
                        }
                    }
                }
            }
        }
        self.len -= out.len() - fired;
    }

    /// Moves overflow entries that have come within range into the wheel.
    fn promote_overflow(&mut self) {
        if self.overflow.is_empty() || self.overflow_min - self.now >= RANGE {
            return;
        }
        let waiting = std::mem::take(&mut self.overflow);
        self.overflow_min = u64::MAX;
        for (deadline, value) in waiting {
            self.place(deadline, value);
        }
    }

    /// Takes every entry out, due or not.
    pub fn drain(&mut self) -> Vec<T> {
        let mut all: Vec<T> = self.due.drain(..).map(|(_, v)| v).collect();
        for level in &mut self.levels {
            for slot in &mut level.slots {
                all.extend(slot.drain(..).map(|(_, v)| v));
            }
            level.occupied = 0;
        }
        all.extend(self.overflow.drain(..).map(|(_, v)| v));
        self.overflow_min = u64::MAX;
        self.len = 0;
        all
    }
}

/// The level and slot for an entry due at `deadline` when the current tick is `now`
/// (`now < deadline < now + RANGE`): the level of the highest 6-bit digit in which they differ.
/// A deadline in the next rotation of the top level differs above it; it goes in the top level,
/// in the slot its digit names, which comes round after the current one.
fn position(now: u64, deadline: u64) -> (usize, usize) {
    let differing = (now ^ deadline) | (SLOTS as u64 - 1);
    let level = (((63 - differing.leading_zeros()) / SLOT_BITS) as usize).min(LEVELS - 1);
    let slot = ((deadline >> (SLOT_BITS * level as u32)) & (SLOTS as u64 - 1)) as usize;
    (level, slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::Jitter as Rng;

    #[test]
    fn positions_follow_the_differing_digit() {
        assert_eq!(position(0, 1), (0, 1));
        assert_eq!(position(0, 63), (0, 63));
        assert_eq!(position(0, 64), (1, 1));
        assert_eq!(position(60, 70), (1, 1));
        assert_eq!(position(64, 127), (0, 63));
        assert_eq!(position(0, 4096), (2, 1));
        assert_eq!(position(0, RANGE - 1), (LEVELS - 1, SLOTS - 1));
        // Across the top level's rotation: the top level, the deadline's digit.
        assert_eq!(position(RANGE - 10, RANGE + 5), (LEVELS - 1, 0));
        assert_eq!(position(5, RANGE + 4), (LEVELS - 1, 0));
    }

    #[test]
    fn tick_by_tick_each_entry_fires_exactly_at_its_deadline() {
        let mut rng = Rng::new(7);
        let start = 1_000;
        let mut wheel = Wheel::new(start);
        let mut expected = Vec::new();
        for id in 0..10_000u64 {
            let delay = match id % 10 {
                0 => 0,
                1 => 1,
                2 => 64,
                3 => 4_096,
                _ => rng.draw() % 300_000,
            };
            wheel.schedule(start + delay, (id, start + delay));
            expected.push(start + delay);
        }
        assert_eq!(wheel.len(), 10_000);
        let mut fired = vec![0u32; 10_000];
        let mut out = Vec::new();
        let end = start + 300_000;
        for tick in start..=end {
            wheel.advance(tick, &mut out);
            for (id, deadline) in out.drain(..) {
                assert_eq!(
                    tick,
                    deadline.max(start),
                    "entry {id} fired at the wrong tick"
                );
                fired[id as usize] += 1;
            }
        }
        assert!(fired.iter().all(|&f| f == 1));
        assert_eq!(wheel.len(), 0);
        assert_eq!(wheel.next_tick(), None);
    }

    #[test]
    fn jumps_return_exactly_what_is_due_including_beyond_the_top_level() {
        let mut rng = Rng::new(42);
        let start = 5;
        let mut wheel = Wheel::new(start);
        let mut deadlines = Vec::new();
        for id in 0..10_000u64 {
            let delay = match id % 8 {
                0 => 0,
                1 => 17,
                2 => RANGE - 1,
                3 => RANGE + rng.draw() % RANGE,
                4 => 3 * RANGE + rng.draw() % 1_000,
                _ => rng.draw() % (RANGE / 4),
            };
            wheel.schedule(start + delay, id);
            deadlines.push(start + delay);
        }
        let mut stops: Vec<u64> = (0..200).map(|_| start + rng.draw() % (5 * RANGE)).collect();
        stops.extend(deadlines.iter().step_by(97).copied());
        stops.push(start + 5 * RANGE);
        stops.sort_unstable();
        let mut fired = vec![false; deadlines.len()];
        let mut out = Vec::new();
        let mut previous = start.saturating_sub(1);
        for to in stops {
            wheel.advance(to, &mut out);
            for id in out.drain(..) {
                let deadline = deadlines[id as usize];
                assert!(
                    deadline <= to,
                    "entry {id} due at {deadline} fired early at {to}"
                );
                assert!(
                    deadline > previous || deadline <= start,
                    "entry {id} due at {deadline} fired late at {to}, after {previous}"
                );
                assert!(!fired[id as usize], "entry {id} fired twice");
                fired[id as usize] = true;
            }
            // Nothing due at or before `to` is left behind.
            if let Some(next) = wheel.next_tick() {
                assert!(
                    next > to,
                    "the wheel still holds something at {next} after {to}"
                );
            }
            previous = to;
        }
        let missing: Vec<(usize, u64)> = fired
            .iter()
            .enumerate()
            .filter(|(_, f)| !**f)
            .map(|(i, _)| (i, deadlines[i] - start))
            .take(5)
            .collect();
        assert_eq!(missing, vec![], "{} entries never fired", wheel.len());
        assert_eq!(wheel.len(), 0);
    }

    #[test]
    fn matches_a_sorted_list_under_random_schedules_and_advances() {
        let mut rng = Rng::new(2024);
        let mut wheel = Wheel::new(0);
        let mut model: Vec<(u64, u64)> = Vec::new();
        let mut out = Vec::new();
        let mut next_id = 0u64;
        for _ in 0..20_000 {
            if rng.draw().is_multiple_of(3) {
                let to = wheel.now() + rng.draw() % 5_000;
                wheel.advance(to, &mut out);
                let mut got: Vec<u64> = std::mem::take(&mut out);
                got.sort_unstable();
                let mut want: Vec<u64> = model
                    .iter()
                    .filter(|&&(d, _)| d <= to)
                    .map(|&(_, id)| id)
                    .collect();
                want.sort_unstable();
                model.retain(|&(d, _)| d > to);
                assert_eq!(got, want);
            } else {
                let delay = match rng.draw() % 4 {
                    0 => rng.draw() % 64,
                    1 => rng.draw() % 100_000,
                    2 => 0,
                    _ => rng.draw() % (2 * RANGE),
                };
                let deadline = wheel.now() + delay;
                wheel.schedule(deadline, next_id);
                model.push((deadline, next_id));
                next_id += 1;
            }
            assert_eq!(wheel.len(), model.len());
        }
    }

    #[test]
    fn next_tick_is_never_after_the_earliest_deadline() {
        let mut wheel = Wheel::new(100);
        assert_eq!(wheel.next_tick(), None);
        wheel.schedule(100 + 5_000, 'a');
        let next = wheel.next_tick().unwrap();
        assert!(next <= 5_100 && next > 100);
        assert_eq!(wheel.earliest(), Some(5_100));
        wheel.schedule(90, 'b');
        assert_eq!(wheel.next_tick(), Some(100));
        assert_eq!(wheel.earliest(), Some(90));
        let mut out = Vec::new();
        wheel.advance(100, &mut out);
        assert_eq!(out, vec!['b']);
        wheel.advance(5_099, &mut out);
        assert_eq!(out, vec!['b']);
        wheel.advance(5_100, &mut out);
        assert_eq!(out, vec!['b', 'a']);
    }

    #[test]
    fn an_entry_for_the_next_rotation_does_not_hide_an_earlier_one() {
        let mut wheel = Wheel::new(5);
        wheel.schedule(5 + (RANGE - 1), 'l');
        wheel.schedule(5 + 2_000_000_000, 'e');
        let mut out = Vec::new();
        assert!(wheel.next_tick().unwrap() <= 2_000_000_005);
        wheel.advance(3_000_000_000, &mut out);
        assert_eq!(out, vec!['e']);
        wheel.advance(RANGE + 4, &mut out);
        assert_eq!(out, vec!['e', 'l']);
    }

    #[test]
    fn drain_takes_everything() {
        let mut wheel = Wheel::new(0);
        for (i, d) in [0, 5, 500, 50_000, RANGE + 5].into_iter().enumerate() {
            wheel.schedule(d, i);
        }
        let mut all = wheel.drain();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        assert_eq!(wheel.len(), 0);
        assert_eq!(wheel.next_tick(), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Schedule(u64),
            Advance(u64),
        }

        /// Delays and jumps of every scale the wheel handles differently: within a slot, across
        /// levels, beyond the top level's range.
        fn span() -> impl Strategy<Value = u64> {
            prop_oneof![
                0..3u64,
                0..70u64,
                0..5_000u64,
                0..RANGE + 100,
                RANGE - 100..3 * RANGE,
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => span().prop_map(Op::Schedule),
                2 => span().prop_map(Op::Advance),
            ]
        }

        proptest! {
            /// Against a sorted list: each advance returns exactly the entries due by then,
            /// none early, none twice; `len` and `next_tick` agree with the model.
            #[test]
            fn the_wheel_matches_a_sorted_list(start in 0..RANGE, ops in prop::collection::vec(op(), 1..200)) {
                let mut wheel = Wheel::new(start);
                let mut model: Vec<(u64, u32)> = Vec::new();
                let mut now = start;
                let mut out = Vec::new();
                for (id, op) in ops.into_iter().enumerate() {
                    match op {
                        Op::Schedule(delay) => {
                            wheel.schedule(now + delay, id as u32);
                            model.push((now + delay, id as u32));
                        }
                        Op::Advance(by) => {
                            now += by;
                            out.clear();
                            wheel.advance(now, &mut out);
                            let mut fired = out.clone();
                            fired.sort_unstable();
                            let mut due: Vec<u32> =
                                model.iter().filter(|(d, _)| *d <= now).map(|(_, id)| *id).collect();
                            due.sort_unstable();
                            prop_assert_eq!(fired, due);
                            model.retain(|(d, _)| *d > now);
                        }
                    }
                    prop_assert_eq!(wheel.len(), model.len());
                    let earliest = model.iter().map(|(d, _)| *d).min();
                    match (wheel.next_tick(), earliest) {
                        (None, None) => {}
                        (Some(tick), Some(deadline)) => prop_assert!(tick <= deadline.max(now)),
                        (tick, deadline) => prop_assert!(false, "next_tick {:?} with earliest {:?}", tick, deadline),
                    }
                }
                let mut rest = wheel.drain();
                rest.sort_unstable();
                let mut expected: Vec<u32> = model.iter().map(|(_, id)| *id).collect();
                expected.sort_unstable();
                prop_assert_eq!(rest, expected);
            }
        }
    }
}
