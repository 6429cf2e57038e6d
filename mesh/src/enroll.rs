//! The node agent's local enrollment API.
//!
//! A unix stream socket; each request is one JSON object on one line, answered by one
//! JSON line. This is the API a CNI plugin calls when a pod starts or stops; the test
//! harness and the demo call it today (`ambit-agent enroll ...`).
//!
//! ```text
//! {"op":"add","pod":{"uid":"u1","namespace":"default","name":"web-0","netns":"/var/run/netns/web-0","ips":["10.244.1.2"]}}
//! {"op":"remove","uid":"u1"}
//! {"op":"list"}
//! ```

use std::io::{self, BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The file in the agent's state directory naming the namespaces the agent captures
/// (a sorted JSON array). The CNI plugin reads it only when the agent does not answer,
/// to decide whether a new pod must wait for the agent (its namespace is enrolled) or
/// may start (it is not).
pub const ENROLLED_NAMESPACES_FILE: &str = "enrolled-namespaces.json";

/// Replaces `<dir>/`[`ENROLLED_NAMESPACES_FILE`] atomically.
pub fn write_enrolled_namespaces(
    dir: &Path,
    namespaces: &std::collections::BTreeSet<String>,
) -> io::Result<()> {
    let path = dir.join(ENROLLED_NAMESPACES_FILE);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(namespaces).map_err(io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

/// Reads `<dir>/`[`ENROLLED_NAMESPACES_FILE`]; `None` if there is none (no agent has
/// synced with a control plane on this node).
pub fn read_enrolled_namespaces(
    dir: &Path,
) -> io::Result<Option<std::collections::BTreeSet<String>>> {
    match std::fs::read(dir.join(ENROLLED_NAMESPACES_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Longest request line the agent accepts, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A pod as the enrollment API describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// Kubernetes pod UID: the identity of the enrollment.
    pub uid: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Path of the pod's network namespace (`/var/run/netns/...` or `/proc/<pid>/ns/net`).
    pub netns: String,
    /// The pod's IPs (one per family).
    pub ips: Vec<IpAddr>,
}

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Enroll a pod: capture its outbound connections.
    Add {
        /// The pod.
        pod: PodSpec,
    },
    /// Release a pod. Its open connections finish; new ones are no longer captured.
    Remove {
        /// Its uid.
        uid: String,
    },
    /// List enrolled pods.
    List {},
}

/// An enrolled pod, as the agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledPod {
    /// What the enrollment API was told.
    #[serde(flatten)]
    pub spec: PodSpec,
    /// The agent's id for the workload (labels metrics and kernel counters).
    pub workload_id: u32,
    /// Cookie of the pod's network namespace.
    pub netns_cookie: u64,
    /// Its traffic is captured now. With a control plane, a known pod is captured only
    /// while the control plane says it is enrolled.
    #[serde(default)]
    pub captured: bool,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok {
        /// The pods the request was about (or all, for `list`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pods: Vec<EnrolledPod>,
    },
    /// Refused; nothing changed.
    Error {
        /// Why.
        message: String,
    },
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The socket cannot be reached.
    #[error("cannot reach the node agent at {path}: {source} (is `ambit-agent run` up?)")]
    Connect {
        /// The socket's path.
        path: String,
        /// What connect(2) said.
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("talking to the node agent: {0}")]
    Io(#[from] io::Error),
    /// The answer is not JSON of the protocol.
    #[error("the node agent sent an unreadable answer: {0}")]
    BadResponse(serde_json::Error),
    /// The agent said no.
    #[error("the node agent refused: {0}")]
    Refused(String),
}

/// A blocking client of the enrollment API.
#[derive(Debug)]
pub struct EnrollClient {
    reader: BufReader<UnixStream>,
}

impl EnrollClient {
    /// Connects to the agent's enrollment socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, EnrollError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| EnrollError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request and waits for its answer.
    pub fn call(&mut self, request: &Request) -> Result<Vec<EnrolledPod>, EnrollError> {
        let mut line = serde_json::to_vec(request).expect("requests always serialize");
        line.push(b'\n');
        self.send_raw(&line)
    }

    /// Sends raw bytes as a request line (for tests of malformed input) and reads the answer.
    pub fn send_raw(&mut self, line: &[u8]) -> Result<Vec<EnrolledPod>, EnrollError> {
        self.reader.get_mut().write_all(line)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(EnrollError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the node agent closed the connection",
            )));
        }
        match serde_json::from_str(&answer).map_err(EnrollError::BadResponse)? {
            Response::Ok { pods } => Ok(pods),
            Response::Error { message } => Err(EnrollError::Refused(message)),
        }
    }

    /// Enrolls a pod.
    pub fn add(&mut self, pod: PodSpec) -> Result<EnrolledPod, EnrollError> {
        let uid = pod.uid.clone();
        self.call(&Request::Add { pod })?
            .into_iter()
            .find(|p| p.spec.uid == uid)
            .ok_or_else(|| EnrollError::Refused("agent did not report the enrolled pod".into()))
    }

    /// Releases a pod.
    pub fn remove(&mut self, uid: &str) -> Result<(), EnrollError> {
        self.call(&Request::Remove {
            uid: uid.to_owned(),
        })
        .map(drop)
    }

    /// Every pod the agent knows.
    pub fn list(&mut self) -> Result<Vec<EnrolledPod>, EnrollError> {
        self.call(&Request::List {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let r: Request = serde_json::from_str(
            r#"{"op":"add","pod":{"uid":"u","namespace":"n","name":"p","netns":"/x","ips":["10.0.0.1","fd00::1"]}}"#,
        )
        .unwrap();
        let Request::Add { pod } = r else { panic!() };
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(
            serde_json::to_string(&Request::List {}).unwrap(),
            r#"{"op":"list"}"#
        );
    }

    #[test]
    fn unknown_fields_and_ops_are_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"list","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(
            r#"{"op":"add","pod":{"uid":"u","namespace":"n","name":"p","netns":"/x","ips":["not-an-ip"]}}"#
        )
        .is_err());
    }
}
