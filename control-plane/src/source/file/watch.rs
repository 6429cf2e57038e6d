//! Following the mesh file: each valid new version served, as soon as it is whole.
//!
//! A file is never read while it is being written, as far as the source can tell: a
//! change is read at once when the kernel says a writer finished (inotify: the file
//! closed after writing, or renamed into place), otherwise once the file's stamp
//! (modification time, size, inode) has stayed the same for a whole poll interval; a
//! read during which the stamp moved is thrown away. An empty file is refused
//! (truncation is the first half of most writes). A model that would remove most of
//! the mesh is held by the [`guard`](crate::source::guard) until the file has said so
//! for the hold time. Writers should still replace the file atomically (write a
//! temporary file, then rename it), as editors and ConfigMap updates do.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Derived, FileError, read};
use crate::model::Model;
use crate::source::guard::Publisher;

/// Serves the model of `path`: the current one now, each new valid version when the file
/// changes. Invalid versions are logged (and reported on `errors`) and skipped.
pub struct FileSource {
    /// The model being served.
    pub models: watch::Receiver<Arc<Model>>,
    /// The current file's problem, if it is rejected.
    pub errors: watch::Receiver<Option<String>>,
    /// Why the current file's model is held back, if it is.
    pub held: watch::Receiver<Option<String>>,
}

/// How the file source watches its file.
#[derive(Clone, Copy, Debug)]
pub struct Watch {
    /// How often the file's stamp is checked; a change the kernel does not report as
    /// finished is read once the stamp has not moved for this long.
    pub poll: Duration,
    /// How long a model that removes most of the mesh must stay the file's content
    /// before it is served (zero: at once).
    pub hold: Duration,
}

impl FileSource {
    /// Loads `path` (which must be valid at start) and watches it.
    pub fn start(path: PathBuf, watch: Watch) -> Result<Self, FileError> {
        // Stamp before loading: a change that lands in between is then seen and re-read,
        // never missed.
        let first = stamp(&path);
        let derived = Derived::load(&path, &read(&path)?)?;
        let model = Arc::new(derived.model().clone());
        info!(file = %path.display(), workloads = model.workloads.len(), services = model.services.len(), "mesh loaded");
        let (err_tx, errors) = watch::channel(None);
        let (publisher, models, held) =
            Publisher::new(format!("mesh file {}", path.display()), watch.hold, model);
        // Told by the kernel when a write finishes; without it, polling alone.
        let (finished_tx, mut finished) = tokio::sync::mpsc::channel(1);
        let notifier = notify_finished_writes(&path, finished_tx)
            .inspect_err(|e| {
                warn!(file = %path.display(), "not notified of changes ({e}); polling every {:?}", watch.poll)
            })
            .ok();
        let mut w = Watcher {
            path,
            seen: first,
            read: first,
            derived,
            publisher,
            err_tx,
        };
        tokio::spawn(async move {
            let _notifier = notifier;
            let mut tick = tokio::time::interval(watch.poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let finished_write = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = finished.recv() => true,
                };
                if !w.poll(finished_write) {
                    return;
                }
            }
        });
        Ok(Self {
            models,
            errors,
            held,
        })
    }
}

/// Watches the file's directory (a rename replaces the file, and a ConfigMap volume
/// swaps a symlink beside it) and sends on `tx` whenever a writer there finished: a file
/// closed after writing, or renamed into place. Dropping the watcher ends it.
fn notify_finished_writes(
    path: &Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    use notify::{RecursiveMode, Watcher as _};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let finished = event.is_ok_and(|e| {
            matches!(
                e.kind,
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                    | EventKind::Modify(ModifyKind::Name(_))
            )
        });
        if finished {
            // Full: a wake-up is already pending, which reads the latest state anyway.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// The state of the poll loop.
struct Watcher {
    path: PathBuf,
    /// The stamp seen at the previous poll.
    seen: Option<Stamp>,
    /// The stamp of the content last read.
    read: Option<Stamp>,
    /// The last valid content's model and items, which the next is derived from.
    derived: Derived,
    publisher: Publisher,
    err_tx: watch::Sender<Option<String>>,
}

impl Watcher {
    /// One look at the file, after a tick or a `finished_write` in its directory; false
    /// once nobody listens any more.
    fn poll(&mut self, finished_write: bool) -> bool {
        let now = stamp(&self.path);
        if now != self.seen && !finished_write {
            // Changed since the last poll: perhaps still being written. Wait for it to
            // stay put for a whole interval.
            self.seen = now;
            return true;
        }
        self.seen = now;
        if now != self.read {
            let Ok(text) = std::fs::read_to_string(&self.path) else {
                // Gone or unreadable (a rename in progress): look again next time.
                return true;
            };
            if stamp(&self.path) != now {
                // Written while we read: this text may be torn.
                return true;
            }
            self.read = now;
            match self.model_of(&text) {
                Ok(m) => {
                    let _ = self.err_tx.send(None);
                    return self.publisher.offer(Arc::new(m));
                }
                Err(e) => {
                    self.reject(&e);
                    self.publisher.release_hold();
                }
            }
        }
        self.publisher.tick()
    }

    /// The model of the file's new `text`, derived from the last one.
    fn model_of(&mut self, text: &str) -> Result<Model, FileError> {
        let started = std::time::Instant::now();
        let model = self.derived.next(&self.path, text);
        debug!(
            derive_ms = started.elapsed().as_secs_f64() * 1e3,
            ok = model.is_ok(),
            "mesh file read"
        );
        model
    }

    fn reject(&self, e: &FileError) {
        // One self-contained log line per problem, each naming the file.
        match e {
            FileError::Invalid { file, problems } => {
                for p in problems {
                    warn!(
                        "rejected mesh file change, keeping the last good model: {}: {p}",
                        file.display()
                    );
                }
            }
            other => warn!("rejected mesh file change, keeping the last good model: {other}"),
        }
        let _ = self.err_tx.send(Some(e.to_string()));
    }
}

/// What tells us the file changed: modification time, size, inode.
type Stamp = (std::time::SystemTime, u64, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reloads_valid_changes_and_keeps_the_last_good_model_on_bad_ones() {
        let dir = std::env::temp_dir().join(format!("ambit-cp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh.yaml");
        let v1 = "namespaces: [{name: a}]\nnodes: [{name: n1}]\n";
        std::fs::write(&path, v1).unwrap();
        let mut src = FileSource::start(
            path.clone(),
            Watch {
                poll: Duration::from_millis(10),
                hold: Duration::from_millis(200),
            },
        )
        .unwrap();
        assert!(src.models.borrow().workloads.is_empty());

        // Write through a rename, as editors and ConfigMap updates do.
        let write = |text: &str| {
            let tmp = dir.join("mesh.yaml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write(
            "namespaces: [{name: a}]\nnodes: [{name: n1}]\nworkloads: [{name: w, namespace: a, node: n9, ips: [10.0.0.1]}]\n",
        );
        tokio::time::timeout(Duration::from_secs(5), src.errors.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        let e = src.errors.borrow().clone().unwrap();
        assert!(
            e.contains("mesh.yaml") && e.contains("workloads[0] (a/w): node \"n9\" is not defined"),
            "{e}"
        );
        assert!(
            src.models.borrow().workloads.is_empty(),
            "a bad file replaced the model"
        );

        write(
            "namespaces: [{name: a}]\nnodes: [{name: n1}]\nworkloads: [{name: w, namespace: a, node: n1, ips: [10.0.0.1]}]\n",
        );
        tokio::time::timeout(Duration::from_secs(5), src.models.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(src.models.borrow().workloads.len(), 1);
        assert!(src.errors.borrow().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn mesh_with(workloads: usize) -> String {
        let mut y = String::from(
            "namespaces: [{name: a, labels: {ambit.dev/dataplane: ambient}}]\nnodes: [{name: n1}]\nworkloads:\n",
        );
        for i in 0..workloads {
            y.push_str(&format!(
                "  - {{name: w{i}, namespace: a, node: n1, ips: [10.0.0.{}]}}\n",
                i + 1
            ));
        }
        y
    }

    async fn started(dir: &Path, text: &str, hold: Duration) -> (PathBuf, FileSource) {
        started_polling(dir, text, hold, Duration::from_millis(10)).await
    }

    async fn started_polling(
        dir: &Path,
        text: &str,
        hold: Duration,
        poll: Duration,
    ) -> (PathBuf, FileSource) {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, text).unwrap();
        let src = FileSource::start(path.clone(), Watch { poll, hold }).unwrap();
        (path, src)
    }

    #[tokio::test]
    async fn a_finished_write_is_read_at_once_without_waiting_for_the_poll() {
        let dir = std::env::temp_dir().join(format!("ambit-cp-notify-{}", std::process::id()));
        // A poll so slow that only the kernel's notification can explain a prompt read.
        let poll = Duration::from_secs(600);
        let (path, mut src) = started_polling(&dir, &mesh_with(3), Duration::ZERO, poll).await;
        let within = Duration::from_secs(5);
        // Renamed into place, as editors and ConfigMap updates do.
        let tmp = dir.join("mesh.yaml.tmp");
        std::fs::write(&tmp, mesh_with(4)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(within, src.models.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(src.models.borrow_and_update().workloads.len(), 4);
        // Written in place: read once the writer closed the file.
        std::fs::write(&path, mesh_with(5)).unwrap();
        tokio::time::timeout(within, src.models.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(src.models.borrow_and_update().workloads.len(), 5);
        // A bad version is refused as promptly, and the model stays.
        std::fs::write(&path, mesh_with(5).replace("node: n1", "node: n9")).unwrap();
        tokio::time::timeout(within, src.errors.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(src.models.borrow().workloads.len(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn empty_and_half_written_files_are_never_served() {
        let dir = std::env::temp_dir().join(format!("ambit-cp-torn-{}", std::process::id()));
        let full = mesh_with(10);
        let (path, mut src) = started(&dir, &full, Duration::from_millis(500)).await;
        let mut models = src.models.clone();
        let served = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = served.clone();
        let recorder = tokio::spawn(async move {
            while models.changed().await.is_ok() {
                let n = models.borrow_and_update().workloads.len();
                record.lock().unwrap().push(n);
            }
        });
        // A writer that truncates, pauses, then writes (as `cp` or a naive editor does,
        // only slower), over and over; and a plainly empty file.
        for round in 0..5 {
            let f = std::fs::File::create(&path).unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
            use std::io::Write;
            let mut f = f;
            let text = if round % 2 == 0 {
                full.clone()
            } else {
                mesh_with(9)
            };
            f.write_all(text.as_bytes()).unwrap();
            drop(f);
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        std::fs::write(&path, "").unwrap();
        tokio::time::timeout(Duration::from_secs(5), src.errors.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        assert!(
            src.errors
                .borrow()
                .as_ref()
                .unwrap()
                .contains("the file is empty")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        recorder.abort();
        let served = served.lock().unwrap().clone();
        assert!(!served.is_empty(), "no change was served at all");
        assert!(
            served.iter().all(|&n| n >= 9),
            "a torn file was served: {served:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_change_that_removes_most_of_the_mesh_is_held_then_served() {
        let dir = std::env::temp_dir().join(format!("ambit-cp-hold-{}", std::process::id()));
        let (path, mut src) = started(&dir, &mesh_with(10), Duration::from_millis(300)).await;
        let write = |text: &str| {
            let tmp = dir.join("mesh.yaml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        // Relabelling is ordinary: served at once.
        write(&mesh_with(10).replace("ambient", "off"));
        tokio::time::timeout(Duration::from_secs(5), src.models.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(src.models.borrow().workloads.values().all(|w| !w.enrolled));
        assert!(src.held.borrow().is_none());
        // Nine of ten workloads gone: held, while the file says so...
        write(&mesh_with(1));
        tokio::time::timeout(Duration::from_secs(5), src.held.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        let started = std::time::Instant::now();
        assert!(
            src.held
                .borrow()
                .as_ref()
                .unwrap()
                .contains("remove 9 of the mesh's 10 workloads")
        );
        assert_eq!(src.models.borrow().workloads.len(), 10);
        // ...and served once it has said so for the hold time.
        tokio::time::timeout(Duration::from_secs(5), src.models.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert_eq!(src.models.borrow().workloads.len(), 1);
        assert!(src.held.borrow().is_none());
        // A held change the file takes back is never served.
        write(&mesh_with(10));
        tokio::time::timeout(Duration::from_secs(5), src.models.changed())
            .await
            .unwrap()
            .unwrap();
        write(&mesh_with(2));
        tokio::time::timeout(Duration::from_secs(5), src.held.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        write(&mesh_with(10).replace("w9", "w9b"));
        tokio::time::timeout(Duration::from_secs(5), src.models.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(src.models.borrow().workloads.len(), 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
