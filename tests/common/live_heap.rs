//! An allocator that counts the bytes live on the heap, for the tests that measure memory.
//! A test binary installs it with
//! `#[global_allocator] static GLOBAL: LiveBytes = LiveBytes;`: it then sees every thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

/// The system allocator, counting the bytes live.
pub struct LiveBytes;

static LIVE: AtomicI64 = AtomicI64::new(0);

/// The bytes live on the heap now (since the process started).
pub fn live() -> i64 {
    LIVE.load(Ordering::SeqCst)
}

// SAFETY: defers to the system allocator; only counts the bytes live.
unsafe impl GlobalAlloc for LiveBytes {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
