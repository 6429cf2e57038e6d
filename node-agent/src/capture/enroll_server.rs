//! Serves the enrollment API (see `ambit_mesh::enroll`) on a unix socket.
//!
//! Each request line is bounded ([`MAX_REQUEST_BYTES`]); a malformed or oversized request
//! gets an error answer and changes nothing.

use std::path::Path;
use std::sync::Arc;

use ambit_mesh::enroll::{MAX_REQUEST_BYTES, Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use super::Capture;

/// Binds the socket (replacing a stale one), readable and writable by root only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves enrollment requests until the task is dropped.
pub async fn serve(listener: UnixListener, capture: Arc<Capture>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(session(stream, capture.clone()));
            }
            Err(e) => {
                // Typically EMFILE: wait for descriptors to free up instead of spinning.
                warn!("enrollment socket accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn session(stream: UnixStream, capture: Arc<Capture>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte over the limit tells "too long" from "exactly at the limit".
        let n = match (&mut read)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                debug!("enrollment session: {e}");
                return;
            }
        };
        let too_long =
            n > MAX_REQUEST_BYTES || (line.last() != Some(&b'\n') && n == MAX_REQUEST_BYTES + 1);
        let response = if too_long {
            Response::Error {
                message: format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    let capture = capture.clone();
                    tokio::task::spawn_blocking(move || handle(&capture, req))
                        .await
                        .unwrap_or_else(|e| Response::Error {
                            message: format!("internal error: {e}"),
                        })
                }
                Err(e) => Response::Error {
                    message: format!("malformed request: {e}"),
                },
            }
        };
        if let Response::Error { message } = &response {
            warn!("enrollment request refused: {message}");
        }
        let mut out = serde_json::to_vec(&response).expect("responses always serialize");
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || too_long {
            // After an oversized line the stream position is unknown: end the session.
            return;
        }
    }
}

fn handle(capture: &Arc<Capture>, req: Request) -> Response {
    let result = match req {
        Request::Add { pod } => capture.enroll(pod).map(|p| vec![p]),
        Request::Remove { uid } => capture.release(&uid).map(|()| Vec::new()),
        Request::List {} => Ok(capture.pods.list_known()),
    };
    match result {
        Ok(pods) => Response::Ok { pods },
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}
