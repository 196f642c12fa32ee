//! With the `tracing` feature, each handler run is a span carrying the event name, event id,
//! correlation id, service, handler and attempt.
#![cfg(feature = "tracing")]

mod common;

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Numbered, WAIT};
use microbus::{Bus, Context, EventId, HandlerError, HandlerResult, RetryPolicy};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// The fields of one span, as (name, value) text.
type SpanFields = Vec<(String, String)>;

/// Records the fields of every span named `microbus.handle`.
#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<Vec<SpanFields>>>,
}

struct Fields(SpanFields);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.push((
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        ));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.push((field.name().to_owned(), value.to_string()));
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut spans = self.spans.lock().unwrap();
        if span.metadata().name() == "microbus.handle" {
            let mut fields = Fields(Vec::new());
            span.record(&mut fields);
            spans.push(fields.0);
        }
        Id::from_u64(spans.len() as u64 + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn each_handler_run_is_a_span_with_the_delivery_s_fields() {
    let recorder = Recorder::default();
    tracing::subscriber::set_global_default(recorder.clone()).unwrap();
    let bus = Bus::builder()
        .workers(1)
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).max_attempts(2))
        .build()
        .unwrap();
    let payments = bus.service("Payments").unwrap();
    let ids = Arc::new(Mutex::new(Vec::new()));
    {
        let ids = ids.clone();
        payments
            .subscribe(move |_: &Numbered, ctx: &Context| -> HandlerResult {
                ids.lock().unwrap().push(ctx.event_id());
                if ctx.attempt() == 1 {
                    return Err(HandlerError::msg("again"));
                }
                Ok(())
            })
            .unwrap();
    }
    bus.publish(Numbered {
        publisher: 0,
        seq: 0,
    })
    .unwrap();
    bus.flush(WAIT).unwrap();
    let id: EventId = ids.lock().unwrap()[0];
    let spans = recorder.spans.lock().unwrap();
    assert_eq!(spans.len(), 2, "{spans:?}");
    for (attempt, fields) in spans.iter().enumerate() {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(get("event"), "Numbered");
        assert_eq!(get("event_id"), id.to_string());
        assert_eq!(get("correlation_id"), id.to_string());
        assert_eq!(get("service"), "Payments");
        assert_eq!(get("attempt"), (attempt + 1).to_string());
        assert!(!get("handler").is_empty());
    }
}
