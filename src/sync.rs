//! The synchronisation primitives the crate uses, in one place, so that a model checker can
//! stand in for them.

pub(crate) use std::sync::Arc;
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
