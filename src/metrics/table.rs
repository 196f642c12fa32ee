//! The plain-text rendering of a [`MetricsSnapshot`]: aligned tables, durations in human
//! units.

use std::fmt;

use super::{BridgeCounters, ImportStatus, Latency, MetricsSnapshot};

/// A duration in nanoseconds in human units, three significant digits: `850ns`, `12.3µs`,
/// `4.56ms`, `1.20s`.
pub(super) struct Human(pub(super) u64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0;
        let (value, unit) = match ns {
            0..1_000 => return write!(f, "{ns}ns"),
            1_000..1_000_000 => (ns as f64 / 1e3, "µs"),
            1_000_000..1_000_000_000 => (ns as f64 / 1e6, "ms"),
            _ => (ns as f64 / 1e9, "s"),
        };
        let decimals = if value >= 100.0 {
            0
        } else if value >= 10.0 {
            1
        } else {
            2
        };
        write!(f, "{value:.decimals$}{unit}")
    }
}

/// Rows of cells printed in aligned columns: text columns to the left, numbers to the right.
struct Table {
    rows: Vec<Vec<String>>,
    /// How many leading columns are text.
    text_columns: usize,
}

impl Table {
    fn new(header: &[&str], text_columns: usize) -> Table {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
            text_columns,
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn write(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push_str("  ");
                }
                let pad = widths[c] - cell.chars().count();
                if c < self.text_columns {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                } else {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
            }
            writeln!(f, "  {}", line.trim_end())?;
        }
        Ok(())
    }
}

fn latency_cells(latency: &Latency) -> Vec<String> {
    if latency.count == 0 {
        return vec![
            "0".to_owned(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ];
    }
    let mut cells = vec![latency.count.to_string()];
    cells.extend(
        [
            latency.p50_ns,
            latency.p90_ns,
            latency.p99_ns,
            latency.p999_ns,
            latency.max_ns,
        ]
        .map(|ns| Human(ns).to_string()),
    );
    cells
}

impl fmt::Display for MetricsSnapshot {
    /// An aligned plain-text report: events, handlers, latencies (count, p50, p90, p99,
    /// p99.9 and max in human units), queues.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        let beside: Vec<String> = s
            .terms()
            .iter()
            .filter(|t| t.role == crate::stats::Role::Beside)
            .map(|t| format!("{} {}", t.value, t.label))
            .collect();
        writeln!(f, "deliveries: {}; {}", s.ledger_line(), beside.join(", "))?;
        let panics: Vec<String> = s
            .callback_panics
            .fields()
            .iter()
            .map(|(seam, n)| format!("{seam} {n}"))
            .collect();
        writeln!(f, "callback panics: {}", panics.join(", "))?;
        let depths: Vec<String> = self.queue_depth.iter().map(u64::to_string).collect();
        writeln!(
            f,
            "queues: shards [{}], timer {}, dead letters held {}",
            depths.join(", "),
            self.timer_pending,
            self.dead_letters_held
        )?;
        if self.lanes.len() > 1 {
            writeln!(f, "\nlanes")?;
            let mut table = Table::new(
                &[
                    "lane",
                    "when full",
                    "workers",
                    "queued",
                    "overflow",
                    "busy",
                    "shed",
                    "waited",
                ],
                2,
            );
            for lane in &self.lanes {
                table.row(vec![
                    lane.name.clone(),
                    lane.backpressure.clone(),
                    lane.workers.to_string(),
                    lane.queue_depth.to_string(),
                    lane.overflow_depth.to_string(),
                    lane.busy_workers.to_string(),
                    lane.shed.to_string(),
                    format!(
                        "{:?}",
                        std::time::Duration::from_nanos(lane.publisher_wait_nanos)
                    ),
                ]);
            }
            table.write(f)?;
        }
        if !self.stalls.is_empty() {
            writeln!(f, "\nstalled deliveries")?;
            let mut table = Table::new(
                &[
                    "lane", "service", "handler", "event", "event id", "worker", "running",
                ],
                5,
            );
            for s in &self.stalls {
                table.row(vec![
                    s.lane.clone(),
                    s.service.clone(),
                    s.handler.clone(),
                    s.event.clone(),
                    s.event_id.to_string(),
                    s.worker.to_string(),
                    format!("{:?}", s.running_for),
                ]);
            }
            table.write(f)?;
        }
        if !self.enabled {
            return writeln!(f, "metrics are off: no per-event or per-handler figures");
        }
        if !self.events.is_empty() {
            writeln!(f, "\nevents")?;
            let mut table = Table::new(&["event", "source", "published", "unmatched"], 2);
            for e in &self.events {
                table.row(vec![
                    e.event.clone(),
                    e.source.clone(),
                    e.published.to_string(),
                    e.unmatched.to_string(),
                ]);
            }
            table.write(f)?;
        }
        if !self.handlers.is_empty() {
            writeln!(f, "\nhandlers")?;
            let mut table = Table::new(
                &[
                    "service",
                    "handler",
                    "event",
                    "delivered",
                    "succeeded",
                    "failed",
                    "retried",
                    "dead",
                    "cancelled",
                    "dropped",
                    "parked",
                    "breaker",
                ],
                3,
            );
            for h in &self.handlers {
                let name = match (h.active, h.paused) {
                    (false, _) => format!("{} (ended)", h.handler),
                    (true, true) => format!("{} (paused)", h.handler),
                    (true, false) => h.handler.clone(),
                };
                table.row(vec![
                    h.service.clone(),
                    name,
                    h.event.clone(),
                    h.delivered.to_string(),
                    h.succeeded.to_string(),
                    h.failed.to_string(),
                    h.retried.to_string(),
                    h.dead_lettered.to_string(),
                    h.cancelled.to_string(),
                    h.dropped.to_string(),
                    h.parked.to_string(),
                    h.breaker.map_or("-", |b| b.as_str()).to_owned(),
                ]);
            }
            table.write(f)?;
            let sampled = match self.sample_every {
                1 => "every delivery".to_owned(),
                n => format!("1 delivery in {n}"),
            };
            writeln!(f, "\nlatency ({sampled})")?;
            let mut table = Table::new(
                &[
                    "of", "measure", "count", "p50", "p90", "p99", "p99.9", "max",
                ],
                2,
            );
            let mut add = |of: String, latencies: [(&str, &Latency); 3]| {
                for (i, (measure, latency)) in latencies.into_iter().enumerate() {
                    let mut row = vec![
                        if i == 0 { of.clone() } else { String::new() },
                        measure.to_owned(),
                    ];
                    row.extend(latency_cells(latency));
                    table.row(row);
                }
            };
            for h in &self.handlers {
                add(
                    format!("{}/{}", h.service, h.handler),
                    [
                        ("queue wait", &h.queue_wait),
                        ("handler", &h.handler_time),
                        ("end to end", &h.end_to_end),
                    ],
                );
            }
            for e in &self.event_latency {
                add(
                    format!("event {}", e.event),
                    [
                        ("queue wait", &e.queue_wait),
                        ("handler", &e.handler_time),
                        ("end to end", &e.end_to_end),
                    ],
                );
            }
            table.write(f)?;
        }
        if !self.bridges.is_empty() {
            writeln!(f, "\nbridges")?;
            let mut headings = vec!["prefix"];
            headings.extend(BridgeCounters::default().fields().map(|(name, _, _)| name));
            headings.push("read_errors");
            let mut table = Table::new(&headings, 1);
            for b in &self.bridges {
                let mut row = vec![b.prefix.clone()];
                row.extend(b.fields().map(|(_, _, value)| value.to_string()));
                row.push(b.read_errors.values().sum::<u64>().to_string());
                table.row(row);
            }
            table.write(f)?;
            let imports: Vec<&ImportStatus> =
                self.bridges.iter().flat_map(|b| &b.imports).collect();
            if !imports.is_empty() {
                writeln!(f, "\nimports")?;
                let mut table = Table::new(
                    &["stream", "group", "consumer", "lag", "pending", "oldest"],
                    3,
                );
                for i in imports {
                    table.row(vec![
                        i.stream.clone(),
                        i.group.clone(),
                        i.consumer.clone(),
                        i.lag.map_or_else(|| "?".to_owned(), |n| n.to_string()),
                        i.pending.to_string(),
                        Human(i.oldest_pending_idle_ms.saturating_mul(1_000_000)).to_string(),
                    ]);
                }
                table.write(f)?;
            }
        }
        if !self.workers_behind.is_empty() {
            writeln!(
                f,
                "\nworkers {:?} were busy in a handler: their latest latencies are not included",
                self.workers_behind
            )?;
        }
        Ok(())
    }
}
