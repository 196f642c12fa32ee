//! Configuration: every invalid setting is a `ConfigError` naming its field.

use std::time::Duration;

use microbus::{
    Bus, BusBuilder, MAX_CHANNEL_CAPACITY, MAX_CHANNEL_MEMORY, MAX_NAME_LEN, MAX_WORKERS,
    WaitStrategy,
};

fn field_of(builder: BusBuilder) -> &'static str {
    builder.build().unwrap_err().field()
}

#[test]
fn each_invalid_setting_names_its_field() {
    let cases: Vec<(BusBuilder, &str)> = vec![
        (Bus::builder().workers(0), "workers"),
        (Bus::builder().workers(MAX_WORKERS + 1), "workers"),
        (Bus::builder().channel_capacity(0), "channel_capacity"),
        (
            Bus::builder().channel_capacity(MAX_CHANNEL_CAPACITY + 1),
            "channel_capacity",
        ),
        (
            Bus::builder().spill_capacity(MAX_CHANNEL_CAPACITY + 1),
            "spill_capacity",
        ),
        (Bus::builder().service_name(""), "service_name"),
        (Bus::builder().service_name("   "), "service_name"),
        (Bus::builder().service_name(" Orders"), "service_name"),
        (Bus::builder().service_name("Ord\ners"), "service_name"),
        (
            Bus::builder().service_name("x".repeat(MAX_NAME_LEN + 1)),
            "service_name",
        ),
        (
            Bus::builder().shutdown_timeout(Duration::from_secs(25 * 3600)),
            "shutdown_timeout",
        ),
        (
            Bus::builder().wait_strategy(WaitStrategy::spin_then_park(Duration::from_secs(2))),
            "wait_strategy",
        ),
        (
            Bus::builder().metrics_sample_every(0),
            "metrics_sample_every",
        ),
    ];
    for (builder, field) in cases {
        let debug = format!("{builder:?}");
        assert_eq!(field_of(builder), field, "{debug}");
    }
}

#[test]
fn errors_explain_the_value() {
    let err = Bus::builder().channel_capacity(0).build().unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid `channel_capacity`: must be at least 1 (got 0)"
    );
    let err = Bus::builder().service_name(" x").build().unwrap_err();
    assert_eq!(
        err.reason(),
        "must not start or end with white space (got \" x\")"
    );
}

#[test]
fn service_names_are_checked_too() {
    let bus = Bus::builder().workers(1).build().unwrap();
    assert_eq!(bus.service("").unwrap_err().field(), "service");
    assert_eq!(bus.service("Pay\tments").unwrap_err().field(), "service");
    assert_eq!(bus.service("Payments").unwrap().service_name(), "Payments");
}

#[test]
fn the_limits_themselves_are_valid() {
    let bus = Bus::builder()
        .workers(1)
        .channel_capacity(1)
        .spill_capacity(0)
        .shutdown_timeout(Duration::ZERO)
        .service_name("x".repeat(MAX_NAME_LEN))
        .build()
        .unwrap();
    assert_eq!(bus.workers(), 1);
    let defaults = Bus::builder().build().unwrap();
    assert_eq!(defaults.service_name(), microbus::DEFAULT_SERVICE_NAME);
    assert_eq!(
        defaults.workers(),
        std::thread::available_parallelism().unwrap().get()
    );
}

#[test]
fn channels_that_would_not_fit_in_memory_are_refused_before_anything_is_allocated() {
    // Each shard's channel is allocated when the bus is built: 2^24 slots of 136 bytes would
    // be 2.3 GB for one worker.
    for (workers, capacity) in [
        (1, MAX_CHANNEL_CAPACITY),
        (MAX_WORKERS, MAX_CHANNEL_MEMORY / 136 / MAX_WORKERS + 1),
        (8, MAX_CHANNEL_MEMORY / 136 / 8 + 1),
    ] {
        let err = Bus::builder()
            .workers(workers)
            .channel_capacity(capacity)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "channel_capacity");
        assert!(err.reason().contains("1024 MiB"), "{err}");
    }
    // The ceiling itself builds (1 GiB, touched once as the channel stamps its slots).
    let bus = Bus::builder()
        .workers(1)
        .channel_capacity(MAX_CHANNEL_MEMORY / 136)
        .metrics(false)
        .build()
        .unwrap();
    assert!(bus.shutdown().unwrap().is_balanced());
}
