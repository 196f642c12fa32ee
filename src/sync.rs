//! The synchronisation primitives the crate's own protocols use, in one place, so that the
//! loom model checker stands in for them under `cfg(loom)` (see the `loom` tests).
//!
//! Process-wide counters in statics, and the crates the bus builds on (crossbeam's channels,
//! parking_lot's locks, arc-swap) keep the standard primitives: the models check the bus's own
//! protocols around them.

pub(crate) use std::sync::Arc;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};
