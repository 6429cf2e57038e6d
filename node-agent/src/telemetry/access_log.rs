//! The access log: one JSON line per connection (or refusal), written by a thread of
//! its own so a slow standard output never blocks the data plane. Lines wait in a
//! bounded queue; when it is full a line is dropped and counted
//! (`ambit_access_log_dropped_total`) rather than stalling a connection.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use ambit_identity::Identity;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Lines that may wait for the writer.
const QUEUE: usize = 8192;

/// One access-log record.
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    /// Seconds since the Unix epoch, with milliseconds.
    pub start: f64,
    /// How long the connection lasted (or took to be refused).
    pub duration_ms: f64,
    /// `outbound` (reported by the source's agent) or `inbound` (the destination's).
    pub direction: &'static str,
    /// The caller's address as the network sees it.
    pub src: SocketAddr,
    /// What the caller asked for.
    pub dst: SocketAddr,
    /// `namespace/name` of the source workload, if known.
    pub src_workload: Option<String>,
    /// `namespace/name` of the destination workload, if known.
    pub dst_workload: Option<String>,
    /// The source's identity (proven by mTLS inbound; from xDS outbound).
    pub src_identity: Option<&'a Identity>,
    /// The destination's identity.
    pub dst_identity: Option<&'a Identity>,
    /// The service the destination was reached through, if any.
    pub service: Option<&'a str>,
    /// `mutual_tls` or `none`.
    pub security: &'static str,
    /// Client → server bytes.
    pub bytes_sent: u64,
    /// Server → client bytes.
    pub bytes_received: u64,
    /// `ok`, `error`, `refused`, `denied`, `closed_by_policy`, ...
    pub result: &'static str,
    /// The precise reason of anything but `ok` (the metric's reason label).
    pub reason: Option<&'static str>,
    /// Details of the reason, for people.
    pub detail: Option<&'a str>,
}

/// Writes access-log records to standard output, or nowhere.
#[derive(Debug)]
pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
    dropped: Counter,
}

impl AccessLog {
    /// A log on standard output, written by its own thread.
    pub fn stdout(dropped: Counter) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, std::io::stdout()))?;
        Ok(Self {
            tx: Some(tx),
            dropped,
        })
    }

    /// No log.
    pub fn off() -> Self {
        Self {
            tx: None,
            dropped: Counter::default(),
        }
    }

    /// Queues one record; never blocks.
    pub fn write(&self, r: &AccessRecord<'_>) {
        let Some(tx) = &self.tx else { return };
        let Ok(mut line) = serde_json::to_vec(r) else {
            return;
        };
        line.push(b'\n');
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// Writes queued lines, flushing whenever the queue runs dry.
fn write_lines(rx: Receiver<Vec<u8>>, out: impl Write) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(&line);
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(&line);
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record() -> AccessRecord<'static> {
        AccessRecord {
            start: 1.5,
            duration_ms: 2.0,
            direction: "inbound",
            src: "10.0.0.1:1".parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            src_workload: None,
            dst_workload: Some("a/b".into()),
            src_identity: None,
            dst_identity: None,
            service: None,
            security: "none",
            bytes_sent: 0,
            bytes_received: 0,
            result: "refused",
            reason: Some("strict_mtls"),
            detail: None,
        }
    }

    #[test]
    fn lines_arrive_whole_and_a_full_queue_drops_instead_of_blocking() {
        let (tx, rx) = sync_channel(2);
        let log = AccessLog {
            tx: Some(tx),
            dropped: Counter::default(),
        };
        // Nobody reads yet: two lines queue, the third is dropped at once.
        for _ in 0..3 {
            log.write(&record());
        }
        assert_eq!(log.dropped.get(), 1);
        let sink = Sink::default();
        let out = sink.clone();
        drop(log);
        write_lines(rx, out);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["reason"], "strict_mtls");
    }
}
