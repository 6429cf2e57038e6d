//! Reading the agents' admin endpoints, and Prometheus text.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ambit_mesh::netns::Netns;

use super::Cluster;

impl Cluster {
    /// Makes `change` and times until every node's agent has ACKed an xDS update since
    /// (its `ambit_xds_acks_total` grew); fails after 30 s.
    pub fn time_until_acked(
        &self,
        change: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<std::time::Duration> {
        let acks = |n: usize| -> f64 {
            self.metrics(n)
                .ok()
                .and_then(|m| metric_value(&m, "ambit_xds_acks_total", &[]))
                .unwrap_or(0.0)
        };
        let nodes: Vec<usize> = self.nodes.iter().map(|n| n.index).collect();
        let before: Vec<f64> = nodes.iter().map(|&n| acks(n)).collect();
        let t = std::time::Instant::now();
        change()?;
        while !nodes.iter().zip(&before).all(|(&n, b)| acks(n) > *b) {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "a single change did not arrive in 30 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(t.elapsed())
    }

    /// Node `n`'s agent's `/debug/config_dump`.
    pub fn config_dump(&self, n: usize) -> anyhow::Result<serde_json::Value> {
        let (_, body) = self.http_get(n, "127.0.0.1:15000", "/debug/config_dump")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// A plain HTTP/1.0 GET from inside node `n`'s namespace: (status, body).
    pub fn http_get(&self, n: usize, addr: &str, path: &str) -> io::Result<(u16, String)> {
        let addr: SocketAddr = addr.parse().map_err(io::Error::other)?;
        let ns = Netns::open(self.node(n).netns_path())?;
        let stream = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
        let mut stream = stream;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut resp = String::new();
        stream.read_to_string(&mut resp)?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status"))?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// Node `n`'s `/metrics` text.
    pub fn metrics(&self, n: usize) -> anyhow::Result<String> {
        let (status, body) = self.http_get(n, "127.0.0.1:15020", "/metrics")?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }

    /// Node `n`'s recent captured connections (`/debug/connections`).
    pub fn captured(&self, n: usize) -> anyhow::Result<Vec<serde_json::Value>> {
        let (_, body) = self.http_get(n, "127.0.0.1:15000", "/debug/connections")?;
        Ok(serde_json::from_str(&body)?)
    }
}

/// The sum of every series of `name` whose labels include `want` (0 if none).
pub fn metric_sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    series(text, name, want).sum()
}

/// The value of the first series of `name` whose labels include `want`.
pub fn metric_value(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    series(text, name, want).next()
}

/// The values of the series of `name` (Prometheus text format) whose labels include
/// every pair of `want`, exactly: `reason="x"` does not match `other_reason="x"`.
fn series<'a>(
    text: &'a str,
    name: &'a str,
    want: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(move |l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let labels = parse_labels(labels)?;
            want.iter()
                .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
                .then(|| value.parse().ok())?
        })
}

/// `a="x",b="y\"z"` → pairs, with the text format's escapes (`\\`, `\"`, `\n`) undone.
fn parse_labels(mut s: &str) -> Option<Vec<(&str, String)>> {
    let mut out = Vec::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key.trim_start_matches(',').trim(), value));
        s = &rest[end + 1..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE x counter
x_total{reason="a",other_reason="b"} 2
x_total{reason="b",msg="q\"uo,te"} 3
x_total 7
"#;

    #[test]
    fn labels_match_exactly_and_values_sum() {
        assert_eq!(metric_sum(TEXT, "x_total", &[("reason", "b")]), 3.0);
        assert_eq!(metric_sum(TEXT, "x_total", &[]), 12.0);
        assert_eq!(
            metric_value(TEXT, "x_total", &[("msg", "q\"uo,te")]),
            Some(3.0)
        );
        assert_eq!(metric_value(TEXT, "x_total", &[("reason", "c")]), None);
        assert_eq!(metric_value(TEXT, "x", &[]), None);
    }
}
