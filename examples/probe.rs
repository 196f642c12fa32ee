use std::time::Instant;
use std::sync::atomic::{AtomicU64, Ordering};
use std::hint::black_box;
fn main() {
    let n = 10_000_000u64;
    let t = Instant::now();
    for _ in 0..n { black_box(microbus::EventId::new()); }
    println!("EventId::new {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let a = AtomicU64::new(0);
    let t = Instant::now();
    for _ in 0..n { black_box(a.fetch_add(2, Ordering::SeqCst)); }
    println!("fetch_add {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let t = Instant::now();
    for _ in 0..n { black_box(a.compare_exchange(black_box(0), 1, Ordering::SeqCst, Ordering::SeqCst)).ok(); }
    println!("cas {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let t = Instant::now();
    for i in 0..n { black_box(Box::new(black_box(i))); }
    println!("box {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let c = quanta::Clock::new();
    let t = Instant::now();
    for _ in 0..n { black_box(c.raw()); }
    println!("quanta raw {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let sw = arc_swap::ArcSwap::from_pointee(5u64);
    let t = Instant::now();
    for _ in 0..n { black_box(**sw.load()); }
    println!("arcswap load {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
}
