//! Re-reading a changed mesh file without parsing all of it again.
//!
//! A 10k-workload file is 1.3 MB of YAML, and the YAML parser reads it at about
//! 16 MB/s: 80 ms per change, before any of Ambit's own work. A change usually touches a
//! few entries, so [`Reparser`] splits the text into its top-level sections and each
//! list section into its items by their lines, parses only the items whose text it has
//! not seen, and takes the others from the last version. The rest of the document (the
//! sections that are not block lists, each list section as `key: []`) is parsed as one
//! small document, so top-level errors and duplicate sections are the parser's own.
//!
//! It never changes what a file means: the result is what [`parse_file`] gives for the
//! same text, or the full parse is what runs. It falls back to the full parse for any
//! text it cannot split with certainty (anchors and aliases, which tie items to each
//! other; tabs, carriage returns, directives, document markers, a byte-order mark,
//! quoted or complex top-level keys; a line that belongs to no item), for a first text,
//! and whenever a piece fails to parse on its own, so every error comes from the full
//! parse with its line and column.

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::{
    FileError, MeshFile, NamespaceFile, NodeFile, PolicyFile, ServiceFile, WaypointFile,
    WorkloadFile, parse_file,
};
use crate::model::authn::RequestAuthenticationSpec;
use crate::model::traffic::DestinationRuleSpec;
use crate::model::{HttpRouteSpec, MeshSpec};

/// Item text → its parsed value, for one list section. (foldhash: the whole file's
/// text is hashed on every change, and SipHash was a tenth of a re-parse.)
struct Items<T> {
    by_text: HashMap<Box<str>, T, foldhash::fast::RandomState>,
}

impl<T> Default for Items<T> {
    fn default() -> Self {
        Self {
            by_text: HashMap::default(),
        }
    }
}

impl<T: DeserializeOwned + Clone> Items<T> {
    /// The items of `texts`, each taken from the last version's cache if its text is
    /// unchanged, else parsed alone; this version's cache (`next`) gets exactly these
    /// texts. `None` if one does not parse alone as exactly one item.
    fn take(&mut self, texts: &[&str], next: &mut Self, parsed: &mut u64) -> Option<Vec<T>> {
        let mut out = Vec::with_capacity(texts.len());
        for &text in texts {
            if let Some(v) = next.by_text.get(text) {
                // The same text twice in one version.
                out.push(v.clone());
                continue;
            }
            let (key, item) = match self.by_text.remove_entry(text) {
                Some(kv) => kv,
                None => {
                    *parsed += 1;
                    // An item's lines are a one-item block sequence themselves.
                    let mut one: Vec<T> = serde_yaml_ng::from_str(text).ok()?;
                    if one.len() != 1 {
                        return None;
                    }
                    (text.into(), one.pop()?)
                }
            };
            out.push(item.clone());
            next.by_text.insert(key, item);
        }
        Some(out)
    }

    /// Remembers `values` as the items of `texts` (from a full parse, in order); nothing
    /// if the counts differ (the section was not split as the parser read it).
    fn remember(&mut self, texts: &[&str], values: &[T]) {
        self.by_text.clear();
        if texts.len() == values.len() {
            for (t, v) in texts.iter().zip(values) {
                self.by_text.insert((*t).into(), v.clone());
            }
        }
    }
}

/// Declares the list sections once: their YAML keys, `MeshFile` fields and item types.
macro_rules! sections {
    ($($key:literal => $field:ident: $item:ty),* $(,)?) => {
        /// The item caches of every list section.
        #[derive(Default)]
        struct Caches {
            $($field: Items<$item>,)*
        }

        /// The YAML keys of the list sections.
        const LIST_KEYS: &[&str] = &[$($key),*];

        impl Caches {
            /// The file from its skeleton's parse and each section's items (by key),
            /// moving what is reused into `next`, the caches of this version.
            fn assemble(
                &mut self,
                mut file: MeshFile,
                items: &HashMap<&str, Vec<&str>>,
                next: &mut Caches,
                parsed: &mut u64,
            ) -> Option<MeshFile> {
                $(if let Some(texts) = items.get($key) {
                    file.$field = self.$field.take(texts, &mut next.$field, parsed)?;
                })*
                Some(file)
            }

            /// Remembers a fully parsed `file`'s items.
            fn remember(&mut self, file: &MeshFile, items: &HashMap<&str, Vec<&str>>) {
                $(self.$field.remember(
                    items.get($key).map_or(&[][..], Vec::as_slice),
                    &file.$field,
                );)*
            }
        }
    };
}

sections! {
    "namespaces" => namespaces: NamespaceFile,
    "nodes" => nodes: NodeFile,
    "workloads" => workloads: WorkloadFile,
    "services" => services: ServiceFile,
    "policies" => policies: PolicyFile,
    "waypoints" => waypoints: WaypointFile,
    "httpRoutes" => http_routes: HttpRouteSpec,
    "destinationRules" => destination_rules: DestinationRuleSpec,
    "requestAuthentications" => request_authentications: RequestAuthenticationSpec,
}

/// Parses successive versions of one mesh file, re-parsing only what changed.
#[derive(Default)]
pub struct Reparser {
    caches: Caches,
    /// The caches hold the last version's items (a full parse filled them).
    primed: bool,
    /// How many versions were parsed incrementally.
    pub incremental_parses: u64,
    /// How many items those parses parsed (the others came from the last version).
    pub items_parsed: u64,
}

impl Reparser {
    /// A reparser that has seen nothing yet (its first parse is a full one).
    pub fn new() -> Self {
        Self::default()
    }

    /// `text` as [`parse_spec`](super::parse_spec) reads it, parsing only the items not
    /// seen in the last version.
    pub fn parse_spec(&mut self, path: &Path, text: &str) -> Result<MeshSpec, FileError> {
        self.parse(path, text)?
            .into_spec()
            .map_err(super::invalid(path))
    }

    /// `text` as [`parse_file`] reads it, parsing only the items not seen last time.
    fn parse(&mut self, path: &Path, text: &str) -> Result<MeshFile, FileError> {
        let split = split(text);
        if self.primed
            && let Some(s) = &split
            && let Some(file) = self.incremental(s)
        {
            return Ok(file);
        }
        // The full parse: the first time, for texts it cannot split, and for errors.
        let file = parse_file(path, text)?;
        match &split {
            Some(s) => self.caches.remember(&file, &s.items),
            None => self.caches = Caches::default(),
        }
        self.primed = split.is_some();
        Ok(file)
    }

    fn incremental(&mut self, s: &Split<'_>) -> Option<MeshFile> {
        let skeleton: MeshFile = serde_yaml_ng::from_str(&s.skeleton).ok()?;
        let mut next = Caches::default();
        let mut parsed = 0;
        let file = self
            .caches
            .assemble(skeleton, &s.items, &mut next, &mut parsed)?;
        self.caches = next;
        self.incremental_parses += 1;
        self.items_parsed += parsed;
        Some(file)
    }
}

/// A text split for an incremental parse.
#[derive(Debug, PartialEq)]
struct Split<'a> {
    /// The document without the list sections' items (each is `key: []`).
    skeleton: String,
    /// Each block list section's items, by key, in order.
    items: HashMap<&'a str, Vec<&'a str>>,
}

/// Splits `text`, or `None` where a split could differ from how YAML reads it.
fn split(text: &str) -> Option<Split<'_>> {
    if text.starts_with('\u{feff}') || text.contains(['\t', '\r']) || has_anchor_or_alias(text) {
        return None;
    }
    let mut skeleton = String::new();
    let mut items: HashMap<&str, Vec<&str>> = HashMap::new();
    // Top-level entries: (key, its line's rest, the lines after it), in order.
    let mut entries: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    // (A text without one is empty or not a mapping: the full parse says what it is.)
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        if bare.starts_with("---") || bare.starts_with("...") || bare.starts_with('%') {
            return None;
        }
        let continues = bare.is_empty()
            || bare.starts_with(' ')
            || bare.starts_with('#')
            || bare == "-"
            || bare.starts_with("- ");
        if continues {
            match entries.last_mut() {
                Some((_, _, body)) => body.push(line),
                // Before the first key: comments and blank lines only.
                None if bare.trim_start().is_empty() || bare.trim_start().starts_with('#') => {
                    skeleton.push_str(line)
                }
                None => return None,
            }
            continue;
        }
        let (key, rest) = bare.split_once(':')?;
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return None;
        }
        if !(rest.is_empty() || rest.starts_with(' ')) {
            return None;
        }
        entries.push((key, &line[key.len() + 1..], Vec::new()));
    }
    if entries.is_empty() {
        return None;
    }
    for (key, rest, body) in entries {
        let rest_bare = rest.trim();
        let block_list = LIST_KEYS.contains(&key)
            && (rest_bare.is_empty() || rest_bare.starts_with('#'))
            && body.iter().any(|l| !is_blank_or_comment(l));
        if !block_list {
            skeleton.push_str(key);
            skeleton.push(':');
            skeleton.push_str(rest);
            body.iter().for_each(|l| skeleton.push_str(l));
            continue;
        }
        if items.contains_key(key) {
            // A repeated section: the parser refuses it; let it say so.
            return None;
        }
        items.insert(key, split_items(text, &body)?);
        skeleton.push_str(key);
        skeleton.push_str(": []\n");
    }
    Some(Split { skeleton, items })
}

/// The items of a block sequence given as its lines (all slices of `text`): each item
/// is one slice of `text` from its `- ` line to the next. `None` if a line belongs to
/// no item (indented no deeper than the dashes, but not a dash).
fn split_items<'a>(text: &'a str, lines: &[&'a str]) -> Option<Vec<&'a str>> {
    let first = lines.iter().position(|l| !is_blank_or_comment(l))?;
    let indent = lines[first].len() - lines[first].trim_start_matches(' ').len();
    let is_item = |l: &str| {
        // Exactly `indent` spaces (so slicing there is at a character boundary), a dash.
        let body = l.trim_start_matches(' ');
        l.len() - body.len() == indent
            && (body.starts_with("- ") || body.trim_end_matches('\n') == "-")
    };
    if !is_item(lines[first]) {
        return None;
    }
    // Offsets of each line in `text`.
    let offset = |l: &str| l.as_ptr() as usize - text.as_ptr() as usize;
    let end = offset(lines[lines.len() - 1]) + lines[lines.len() - 1].len();
    let mut starts = vec![offset(lines[0])];
    for l in &lines[first + 1..] {
        if is_item(l) {
            starts.push(offset(l));
        } else if !is_blank_or_comment(l) && l.len() - l.trim_start_matches(' ').len() <= indent {
            return None;
        }
    }
    starts.push(end);
    Some(starts.windows(2).map(|w| &text[w[0]..w[1]]).collect())
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// Could `text` hold an anchor (`&a`) or an alias (`*a`)? Conservative: any `&` or `*`
/// that starts a token counts, also inside quotes (then the full parse runs, correctly).
fn has_anchor_or_alias(text: &str) -> bool {
    let b = text.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        (c == b'&' || c == b'*')
            && (i == 0 || matches!(b[i - 1], b' ' | b'\n' | b'[' | b'{' | b',' | b':' | b'-'))
            && b.get(i + 1)
                .is_some_and(|n| !matches!(n, b' ' | b'\n' | b']' | b'}' | b','))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "mesh.yaml";

    /// Both parses of `text`, each turned into the model's spec (or its error text).
    fn both(r: &mut Reparser, text: &str) -> (String, String) {
        let show = |f: Result<MeshFile, FileError>| match f {
            Ok(f) => match f.into_spec() {
                Ok(spec) => format!("{spec:?}"),
                Err(problems) => format!("invalid: {problems:?}"),
            },
            Err(e) => format!("error: {e}"),
        };
        (
            show(r.parse(Path::new(PATH), text)),
            show(parse_file(Path::new(PATH), text)),
        )
    }

    fn workload(i: usize, rng: &mut fastrand::Rng) -> String {
        let labels = match rng.u8(..4) {
            0 => String::new(),
            1 => ", labels: {app: web}".into(),
            2 => format!(", labels: {{app: web, version: v{}}}", rng.u8(..3)),
            _ => ", labels: {app: db}".into(),
        };
        if rng.bool() {
            format!(
                "  - {{name: w-{i}, namespace: ns-{}, node: n-{}, ips: [10.0.{}.{}]{labels}}}\n",
                i % 3,
                i % 2,
                i / 250,
                i % 250 + 1
            )
        } else {
            // Block style, with a comment inside.
            format!(
                "  - name: w-{i}\n    # pod {i}\n    namespace: ns-{}\n    node: n-{}\n    ips:\n      - 10.0.{}.{}\n",
                i % 3,
                i % 2,
                i / 250,
                i % 250 + 1
            )
        }
    }

    fn mesh(workloads: &[String], extra: &str) -> String {
        let mut y = String::from("# the mesh\ntrustDomain: cluster.local\nnamespaces:\n");
        for n in 0..3 {
            y.push_str(&format!(
                "  - name: ns-{n}\n    labels: {{ambit.dev/dataplane: ambient}}\n"
            ));
        }
        y.push_str("nodes:\n- name: n-0\n- name: n-1\n\nworkloads:\n");
        workloads.iter().for_each(|w| y.push_str(w));
        y.push_str("services:\n  - {name: web, namespace: ns-0, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: web}}\n");
        y.push_str("policies:\n  - name: p\n    namespace: ns-1\n    action: ALLOW\n    rules:\n      - from:\n          - principals: [\"*\"]\n");
        y.push_str(extra);
        y
    }

    #[test]
    fn a_new_version_parses_as_the_full_parse_reads_it_after_any_edit() {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut ws: Vec<String> = (0..40).map(|i| workload(i, &mut rng)).collect();
        let mut r = Reparser::new();
        let (mut incremental, mut valid) = (0, 0);
        for round in 0..400 {
            let mut extra = String::new();
            match rng.u8(..14) {
                // Most edits touch one workload.
                0..=5 => {
                    let i = rng.usize(..ws.len());
                    ws[i] = workload(rng.usize(..1000), &mut rng);
                }
                6 => ws.push(workload(rng.usize(..1000), &mut rng)),
                7 if ws.len() > 1 => {
                    ws.remove(rng.usize(..ws.len()));
                }
                // Edits the splitter must not be fooled by: each either parses as the
                // full parse does or makes it fall back.
                8 => {
                    let i = rng.usize(..ws.len());
                    ws[i] = ws[i].replacen("namespace:", "namespace: &ns", 1);
                }
                9 => {
                    let i = rng.usize(..ws.len());
                    ws[i] = "  - {name: broken, namespace: ns-0\n".into();
                }
                10 => extra =
                    "workloads:\n  - {name: again, namespace: ns-0, node: n-0, ips: [10.9.9.9]}\n"
                        .into(),
                11 => {
                    let i = rng.usize(..ws.len());
                    ws[i] = ws[i].replacen("name:", "nmae:", 1);
                }
                12 => extra = "waypoints: [{name: wp, namespace: ns-0}]\n".into(),
                _ => {
                    let i = rng.usize(..ws.len());
                    ws.insert(i, "  # a comment between items\n\n".into());
                }
            }
            let text = mesh(&ws, &extra);
            let before = r.incremental_parses;
            let (fast, full) = both(&mut r, &text);
            assert_eq!(fast, full, "round {round}, text:\n{text}");
            if !full.starts_with("error") && !full.starts_with("invalid") {
                valid += 1;
                incremental += r.incremental_parses - before;
            }
            // Repair what the edits broke, so the mesh stays mostly valid.
            ws.retain(|w| !w.contains("broken") && !w.contains('&') && !w.contains("nmae"));
            if ws.is_empty() {
                ws.push(workload(0, &mut rng));
            }
        }
        assert!(valid > 200, "only {valid} valid versions");
        assert!(
            incremental * 10 > valid * 7,
            "only {incremental} of {valid} valid versions were parsed incrementally"
        );
    }

    #[test]
    fn only_the_changed_items_are_parsed_again() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut ws: Vec<String> = (0..50).map(|i| workload(i, &mut rng)).collect();
        let mut r = Reparser::new();
        r.parse(Path::new(PATH), &mesh(&ws, "")).unwrap();
        assert_eq!(
            (r.incremental_parses, r.items_parsed),
            (0, 0),
            "the first is full"
        );
        ws[7] = workload(1234, &mut rng);
        let file = r.parse(Path::new(PATH), &mesh(&ws, "")).unwrap();
        assert_eq!((r.incremental_parses, r.items_parsed), (1, 1));
        assert!(file.workloads.iter().any(|w| w.name == "w-1234"));
        assert_eq!(file.workloads.len(), 50);
    }

    #[test]
    fn texts_it_cannot_split_for_certain_are_left_to_the_full_parse() {
        for text in [
            "workloads:\n  - &a {name: w, namespace: n, node: n, ips: [10.0.0.1]}\n",
            "workloads:\n\t- {name: w}\n",
            "workloads:\r\n  - {name: w}\r\n",
            "%YAML 1.2\n---\nworkloads: []\n",
            "\"workloads\":\n  - {name: w}\n",
            "workloads:\n  - {name: w}\n stray: 1\n",
            "workloads:\n  foo: bar\n",
            "",
            "# only a comment\n",
        ] {
            assert!(split(text).is_none(), "{text:?}");
        }
        // Found by the fuzzer: a line of fewer spaces than the items, then a multi-byte
        // character where the items' dash would be.
        assert!(split("workloads:\n  - name0 frode: node-0\n \u{c30}").is_none());
        let s =
            split("nodes:\n- name: a\n# c\n- name: b\nworkloads: []\ntrustDomain: x\n").unwrap();
        assert_eq!(s.items["nodes"], ["- name: a\n# c\n", "- name: b\n"]);
        assert_eq!(s.skeleton, "nodes: []\nworkloads: []\ntrustDomain: x\n");
    }
}
