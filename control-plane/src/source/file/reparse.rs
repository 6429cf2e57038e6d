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
//!
//! A version is read against the last *committed* one ([`Reparser::read`], then
//! [`Reparser::commit`] once its model is taken): a version that is refused leaves the
//! reparser where it was, so the next is compared with the last good one. What a
//! reading hands on is proportional to the change: the workloads whose item text is new
//! and the keys of those whose text is gone ([`Workloads::Changes`]), and everything
//! else only if its text changed at all.

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::{
    FileError, MeshFile, NamespaceFile, NodeFile, PolicyFile, ServiceFile, WaypointFile,
    WorkloadFile, invalid, parse_file,
};
use crate::model::authn::RequestAuthenticationSpec;
use crate::model::traffic::DestinationRuleSpec;
use crate::model::{HttpRouteSpec, MeshSpec, WorkloadSpec};

/// foldhash: the whole file's text is hashed on every change, and SipHash was a tenth
/// of a re-parse.
type Fast = foldhash::fast::RandomState;

/// Item text → its parsed value, for one list section of the committed version.
struct Items<T> {
    by_text: HashMap<Box<str>, Entry<T>, Fast>,
}

struct Entry<T> {
    value: T,
    /// The last reading whose text has this item.
    seen: u64,
}

/// One section's items that the committed version does not have, parsed alone.
type Added<'t, T> = HashMap<&'t str, T, Fast>;

impl<T> Default for Items<T> {
    fn default() -> Self {
        Self {
            by_text: HashMap::default(),
        }
    }
}

impl<T: DeserializeOwned + Clone> Items<T> {
    /// Marks the committed items that `texts` has as seen by reading `epoch` and parses
    /// the others alone into `added`. `None` if one does not parse alone as exactly one
    /// item; else whether a text occurs twice.
    fn read<'t>(
        &mut self,
        texts: &[&'t str],
        epoch: u64,
        added: &mut Added<'t, T>,
        parsed: &mut u64,
    ) -> Option<bool> {
        let mut twice = false;
        for &text in texts {
            if let Some(e) = self.by_text.get_mut(text) {
                twice |= e.seen == epoch;
                e.seen = epoch;
            } else if added.contains_key(text) {
                twice = true;
            } else {
                *parsed += 1;
                // An item's lines are a one-item block sequence themselves.
                let mut one: Vec<T> = serde_yaml_ng::from_str(text).ok()?;
                if one.len() != 1 {
                    return None;
                }
                added.insert(text, one.pop()?);
            }
        }
        Some(twice)
    }

    /// The values of `texts`, in order (each committed or in `added`: [`read`] saw it).
    ///
    /// [`read`]: Items::read
    fn values(&self, texts: &[&str], added: &Added<'_, T>) -> Vec<T> {
        texts
            .iter()
            .map(|&t| match self.by_text.get(t) {
                Some(e) => e.value.clone(),
                None => added[t].clone(),
            })
            .collect()
    }

    /// The committed items that reading `epoch` did not see.
    fn unseen(&self, epoch: u64) -> impl Iterator<Item = &T> {
        self.by_text
            .values()
            .filter(move |e| e.seen != epoch)
            .map(|e| &e.value)
    }

    /// Makes reading `epoch` the committed version: forgets what it did not see, and
    /// remembers what it `added`.
    fn commit(&mut self, epoch: u64, added: Added<'_, T>) {
        if self.by_text.values().any(|e| e.seen != epoch) {
            self.by_text.retain(|_, e| e.seen == epoch);
        }
        for (text, value) in added {
            self.by_text
                .insert(text.into(), Entry { value, seen: epoch });
        }
    }

    /// The items of a fully parsed section: `values` as the items of `texts`, in order;
    /// none if the counts differ (the section was not split as the parser read it).
    fn of(texts: &[&str], values: &[T]) -> Self {
        let mut items = Self::default();
        if texts.len() == values.len() {
            for (t, v) in texts.iter().zip(values) {
                let value = v.clone();
                items.by_text.insert((*t).into(), Entry { value, seen: 0 });
            }
        }
        items
    }
}

/// Declares the list sections other than `workloads` once: their YAML keys, `MeshFile`
/// fields and item types. (Workloads are read as changes; the others whole.)
macro_rules! sections {
    ($($key:literal => $field:ident: $item:ty),* $(,)?) => {
        /// The item caches of every list section, for the committed version.
        #[derive(Default)]
        struct Caches {
            workloads: Items<WorkloadFile>,
            $($field: Items<$item>,)*
        }

        /// The items a reading parsed alone, by section.
        #[derive(Default)]
        struct AddedItems<'t> {
            workloads: Added<'t, WorkloadFile>,
            $($field: Added<'t, $item>,)*
        }

        /// The YAML keys of the list sections.
        const LIST_KEYS: &[&str] = &["workloads", $($key),*];

        impl Caches {
            /// Reads every block section's items (see [`Items::read`]): `None` if one
            /// does not parse alone, else whether a workload's text occurs twice.
            fn read<'t>(
                &mut self,
                items: &HashMap<&str, Vec<&'t str>>,
                epoch: u64,
                added: &mut AddedItems<'t>,
                parsed: &mut u64,
            ) -> Option<bool> {
                let none = &[][..];
                let texts = |key: &str| items.get(key).map_or(none, Vec::as_slice);
                let twice = self.workloads.read(texts("workloads"), epoch, &mut added.workloads, parsed)?;
                $(self.$field.read(texts($key), epoch, &mut added.$field, parsed)?;)*
                Some(twice)
            }

            /// The file from its skeleton's parse and the block sections' items, all
            /// but the workloads (those stay as the skeleton has them).
            fn assemble_rest(
                &self,
                mut file: MeshFile,
                items: &HashMap<&str, Vec<&str>>,
                added: &AddedItems<'_>,
            ) -> MeshFile {
                $(if let Some(texts) = items.get($key) {
                    file.$field = self.$field.values(texts, &added.$field);
                })*
                file
            }

            fn commit(&mut self, epoch: u64, added: AddedItems<'_>) {
                self.workloads.commit(epoch, added.workloads);
                $(self.$field.commit(epoch, added.$field);)*
            }

            /// The caches of a fully parsed `file`.
            fn of(file: &MeshFile, items: &HashMap<&str, Vec<&str>>) -> Self {
                let none = &[][..];
                let texts = |key: &str| items.get(key).map_or(none, Vec::as_slice);
                Self {
                    workloads: Items::of(texts("workloads"), &file.workloads),
                    $($field: Items::of(texts($key), &file.$field),)*
                }
            }
        }
    };
}

sections! {
    "namespaces" => namespaces: NamespaceFile,
    "nodes" => nodes: NodeFile,
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
    /// The committed version's items (a full parse filled them at first).
    caches: Caches,
    /// The committed version's text without its workload items (see [`Split`]); `None`
    /// when it could not be split (then the caches are empty and the next read is full).
    rest_text: Option<String>,
    /// The workload cache holds exactly the committed version's workloads (not so if
    /// they were a flow list in the skeleton, or the full parse read a different number
    /// of items than the split found, or two items had one text): only then can a
    /// reading say what changed rather than list them all.
    exact: bool,
    /// Counts readings (each marks the items it sees with its number).
    epoch: u64,
    /// How many versions were read incrementally.
    pub incremental_parses: u64,
    /// How many items those readings parsed (the others came from the last version).
    pub items_parsed: u64,
}

/// A version as [`Reparser::read`] found it, relative to the committed one. Nothing of
/// it is remembered until it is [committed](Reparser::commit).
pub struct Reading<'t> {
    /// Everything but the workloads (its `workloads` empty); `None` when that part's
    /// text is the committed version's (so is its meaning).
    pub rest: Option<MeshSpec>,
    /// The workloads.
    pub workloads: Workloads,
    /// Which reading this is: only the latest can be committed.
    epoch: u64,
    pending: Pending<'t>,
}

/// A reading's workloads.
#[derive(Debug)]
pub enum Workloads {
    /// Every workload, in file order.
    All(Vec<WorkloadSpec>),
    /// The committed version's workloads, changed: the keys of those whose item text is
    /// gone, and the items whose text is new (in file order). The same key can be in
    /// both (an edited workload); a key can occur twice in `new`, or be in `new` and in
    /// the committed version but not in `gone` — a file with two workloads of one key,
    /// which is invalid (the full build says where).
    Changes {
        /// Keys ([`WorkloadSpec::key`]) of the workloads whose text is gone.
        gone: Vec<String>,
        /// The workloads whose text is new.
        new: Vec<WorkloadSpec>,
        /// How many workload items the version has.
        total: usize,
    },
}

/// What committing a reading remembers.
enum Pending<'t> {
    /// A full parse: the caches of its items, its text without the workloads and
    /// whether the workload cache is exact, or `None` (it could not be split; nothing
    /// is remembered).
    Replace(Option<(Caches, String, bool)>),
    /// An incremental reading: the items it parsed, its workload item texts (in
    /// order), its text without the workloads, and whether the workload cache will be
    /// exact.
    Update {
        added: AddedItems<'t>,
        workloads: Vec<&'t str>,
        rest_text: String,
        exact: bool,
    },
}

impl Reparser {
    /// A reparser that has seen nothing yet (its first parse is a full one).
    pub fn new() -> Self {
        Self::default()
    }

    /// `text` as [`parse_spec`](super::parse_spec) reads it, committed if it reads
    /// (whether or not its model would be valid: not to be mixed with a
    /// [`Derived`](super::Derived)'s readings, which commit only valid versions).
    pub fn parse_spec(&mut self, path: &Path, text: &str) -> Result<MeshSpec, FileError> {
        let mut reading = self.read_with(path, text, true)?;
        let rest = reading.rest.take().expect("read whole");
        let workloads = self.workloads(&mut reading);
        self.commit(reading);
        Ok(MeshSpec { workloads, ..rest })
    }

    /// Reads `text` against the committed version, parsing only the items it does not
    /// have (a full parse the first time, for texts it cannot split, and for errors).
    pub fn read<'t>(&mut self, path: &Path, text: &'t str) -> Result<Reading<'t>, FileError> {
        self.read_with(path, text, false)
    }

    /// [`read`](Reparser::read), with the rest even if unchanged if `whole`.
    fn read_with<'t>(
        &mut self,
        path: &Path,
        text: &'t str,
        whole: bool,
    ) -> Result<Reading<'t>, FileError> {
        self.epoch += 1;
        let split = split(text);
        if let (Some(committed), Some(s)) = (&self.rest_text, &split) {
            let rest_changed = whole || *committed != s.rest_text;
            if let Some(reading) = self.incremental(path, rest_changed, s) {
                return reading;
            }
        }
        let mut file = parse_file(path, text)?;
        let pending = Pending::Replace(split.map(|s| {
            let caches = Caches::of(&file, &s.items);
            let exact = caches.workloads.by_text.len() == file.workloads.len();
            (caches, s.rest_text, exact)
        }));
        let workloads = std::mem::take(&mut file.workloads);
        Ok(Reading {
            rest: Some(file.into_spec().map_err(invalid(path))?),
            workloads: Workloads::All(workloads.into_iter().map(WorkloadSpec::from).collect()),
            epoch: self.epoch,
            pending,
        })
    }

    /// An incremental reading of split text `s`, or `None` if a piece does not parse
    /// alone (the full parse then says where and why).
    fn incremental<'t>(
        &mut self,
        path: &Path,
        rest_changed: bool,
        s: &Split<'t>,
    ) -> Option<Result<Reading<'t>, FileError>> {
        let epoch = self.epoch;
        let mut added = AddedItems::default();
        let mut parsed = 0;
        let twice = self.caches.read(&s.items, epoch, &mut added, &mut parsed)?;
        let mut rest = None;
        if rest_changed {
            let skeleton: MeshFile = serde_yaml_ng::from_str(&s.skeleton).ok()?;
            rest = Some(self.caches.assemble_rest(skeleton, &s.items, &added));
        }
        let texts = s.items.get("workloads").cloned().unwrap_or_default();
        let block = s.items.contains_key("workloads");
        let exact = match &rest {
            _ if block => !twice,
            // Not a block list: the cache will be empty.
            Some(file) => file.workloads.is_empty(),
            None => self.exact,
        };
        let workloads = match &mut rest {
            // Not a block list: the skeleton's (whole, and the cache has none).
            Some(file) if !block => Workloads::All(
                std::mem::take(&mut file.workloads)
                    .into_iter()
                    .map(WorkloadSpec::from)
                    .collect(),
            ),
            // The same skeleton as the committed version's: the same workloads.
            None if !block => Workloads::Changes {
                gone: Vec::new(),
                new: Vec::new(),
                total: 0,
            },
            // The cache cannot say what changed.
            _ if twice || !self.exact => Workloads::All(self.all_workloads(&texts, &added)),
            _ => Workloads::Changes {
                gone: self
                    .caches
                    .workloads
                    .unseen(epoch)
                    .map(|w| WorkloadSpec::from(w.clone()).key())
                    .collect(),
                new: texts
                    .iter()
                    .filter_map(|t| added.workloads.get(t))
                    .map(|w| WorkloadSpec::from(w.clone()))
                    .collect(),
                total: texts.len(),
            },
        };
        self.incremental_parses += 1;
        self.items_parsed += parsed;
        let rest = match rest.map(MeshFile::into_spec) {
            Some(Err(problems)) => return Some(Err(invalid(path)(problems))),
            Some(Ok(spec)) => Some(spec),
            None => None,
        };
        Some(Ok(Reading {
            rest,
            workloads,
            epoch,
            pending: Pending::Update {
                added,
                workloads: texts,
                rest_text: s.rest_text.clone(),
                exact,
            },
        }))
    }

    /// Every workload of `reading`, in file order (what a full build takes).
    pub fn workloads(&self, reading: &mut Reading<'_>) -> Vec<WorkloadSpec> {
        assert_eq!(reading.epoch, self.epoch, "a reading other than the latest");
        match (&mut reading.workloads, &reading.pending) {
            (Workloads::All(all), _) => std::mem::take(all),
            (
                Workloads::Changes { .. },
                Pending::Update {
                    added, workloads, ..
                },
            ) => self.all_workloads(workloads, added),
            (Workloads::Changes { .. }, Pending::Replace(_)) => {
                unreachable!("a full parse reads all workloads")
            }
        }
    }

    /// The workloads of item `texts`, each committed or parsed by this reading.
    fn all_workloads(&self, texts: &[&str], added: &AddedItems<'_>) -> Vec<WorkloadSpec> {
        let files = self.caches.workloads.values(texts, &added.workloads);
        files.into_iter().map(WorkloadSpec::from).collect()
    }

    /// Makes `reading` the committed version, which the next is read against.
    ///
    /// # Panics
    ///
    /// If `reading` is not the latest (its item marks are no longer the caches').
    pub fn commit(&mut self, reading: Reading<'_>) {
        assert_eq!(reading.epoch, self.epoch, "a reading other than the latest");
        match reading.pending {
            Pending::Replace(Some((caches, rest_text, exact))) => {
                self.caches = caches;
                self.rest_text = Some(rest_text);
                self.exact = exact;
            }
            Pending::Replace(None) => {
                self.caches = Caches::default();
                self.rest_text = None;
                self.exact = false;
            }
            Pending::Update {
                added,
                rest_text,
                exact,
                ..
            } => {
                self.caches.commit(reading.epoch, added);
                self.rest_text = Some(rest_text);
                self.exact = exact;
            }
        }
    }
}

/// A text split for an incremental parse.
#[derive(Debug, PartialEq)]
struct Split<'a> {
    /// The document without the list sections' items (each is `key: []`).
    skeleton: String,
    /// Each block list section's items, by key, in order.
    items: HashMap<&'a str, Vec<&'a str>>,
    /// The text without the workloads' items: the skeleton, then each other block
    /// section's key, length and items. Two texts with the same mean the same but for
    /// their workload items.
    rest_text: String,
}

/// Splits `text`, or `None` where a split could differ from how YAML reads it.
fn split(text: &str) -> Option<Split<'_>> {
    if text.starts_with('\u{feff}')
        || text.contains(['\t', '\r', '\0'])
        || has_anchor_or_alias(text)
    {
        return None;
    }
    let mut skeleton = String::new();
    let mut items: HashMap<&str, Vec<&str>> = HashMap::new();
    // Top-level entries: (key, its line's rest, the lines after it), in order.
    let mut entries: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    // (A text without one is empty or not a mapping: the full parse says what it is.)
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        if !closes_what_it_opens(bare) {
            // A quoted scalar or flow collection goes on to the next line, which may
            // then look like an item or a key without being one.
            return None;
        }
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
    // Each part with its length, so no two different rests read the same; and whether
    // the skeleton's `workloads: []` stands for a block list (or is the file's own).
    let mut rest_text = format!("{}\n{skeleton}", skeleton.len());
    if items.contains_key("workloads") {
        rest_text.push_str("\0workloads\n");
    }
    for &key in &LIST_KEYS[1..] {
        if let Some(texts) = items.get(key) {
            let len: usize = texts.iter().map(|t| t.len()).sum();
            rest_text.push_str(&format!("\0{key} {len}\n"));
            texts.iter().for_each(|t| rest_text.push_str(t));
        }
    }
    Some(Split {
        skeleton,
        items,
        rest_text,
    })
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

/// Does every quoted scalar and flow collection that `line` opens close on it? Errs
/// towards "no" (then the full parse runs): a quote opens a scalar only where one can
/// start (after a space, `[`, `{`, `,` or at the line's start) and a plain scalar's
/// stray `'` or bracket counts as an opening too.
fn closes_what_it_opens(line: &str) -> bool {
    let b = line.as_bytes();
    // The open flow collections, innermost in the low bit (1: `{`, 0: `[`); a line
    // nesting deeper than 64 is not split.
    let (mut open, mut depth) = (0u64, 0u32);
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(b'"') => match c {
                b'\\' => i += 1,
                b'"' => quote = None,
                _ => {}
            },
            Some(_) => {
                if c == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 1;
                    } else {
                        quote = None;
                    }
                }
            }
            None => {
                let starts = i == 0 || matches!(b[i - 1], b' ' | b'[' | b'{' | b',');
                match c {
                    b'"' | b'\'' if starts => quote = Some(c),
                    b'#' if i == 0 || b[i - 1] == b' ' => break,
                    b'[' | b'{' if depth < 64 => {
                        open = open << 1 | u64::from(c == b'{');
                        depth += 1;
                    }
                    b'[' | b'{' => return false,
                    b']' | b'}' => {
                        if depth == 0 || (open & 1 == 1) != (c == b'}') {
                            return false;
                        }
                        open >>= 1;
                        depth -= 1;
                    }
                    _ => {}
                }
            }
        }
        i += 1;
    }
    quote.is_none() && depth == 0
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
        let show = |f: Result<MeshSpec, FileError>| match f {
            Ok(spec) => format!("{spec:?}"),
            Err(FileError::Invalid { problems, .. }) => format!("invalid: {problems:?}"),
            Err(e) => format!("error: {e}"),
        };
        (
            show(r.parse_spec(Path::new(PATH), text)),
            show(super::super::parse_spec(Path::new(PATH), text)),
        )
    }

    /// Workloads by key, where keys are unique.
    type ByKey = std::collections::BTreeMap<String, WorkloadSpec>;

    fn by_key(ws: Vec<WorkloadSpec>) -> Option<ByKey> {
        let n = ws.len();
        let m: ByKey = ws.into_iter().map(|w| (w.key(), w)).collect();
        (m.len() == n).then_some(m)
    }

    /// Reads `text` as [`Derived`](super::super::Derived) does, applying its changes to
    /// `held` (the committed version's workloads) and committing it if its workloads
    /// have unique keys; checks them against the full parse, and what it says of the
    /// rest against whether the rest changed.
    fn read_as_changes(r: &mut Reparser, held: &mut ByKey, rest: &mut String, text: &str) {
        let path = Path::new(PATH);
        let Ok(full) = super::super::parse_spec(path, text) else {
            assert!(r.read(path, text).is_err());
            return;
        };
        let mut reading = r.read(path, text).unwrap();
        let full_rest = format!(
            "{:?}",
            MeshSpec {
                workloads: Vec::new(),
                ..full.clone()
            }
        );
        match &reading.rest {
            Some(spec) => assert_eq!(format!("{spec:?}"), full_rest),
            None => assert_eq!(*rest, full_rest, "the rest changed, unannounced"),
        }
        let Some(want) = by_key(full.workloads) else {
            // Two workloads of one key: never committed, as the model is refused.
            return;
        };
        let got = match &reading.workloads {
            Workloads::All(all) => by_key(all.clone()).unwrap(),
            Workloads::Changes { gone, new, .. } => {
                let mut got = held.clone();
                for k in gone {
                    assert!(got.remove(k).is_some(), "{k} was not there");
                }
                for w in new {
                    got.insert(w.key(), w.clone());
                }
                got
            }
        };
        assert_eq!(got, want);
        let all = r.workloads(&mut reading);
        assert_eq!(by_key(all).unwrap(), want, "in file order");
        r.commit(reading);
        *held = want;
        *rest = full_rest;
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
        let (mut changes, mut held, mut rest) = (Reparser::new(), ByKey::new(), String::new());
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
            read_as_changes(&mut changes, &mut held, &mut rest, &text);
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
        assert!(
            changes.incremental_parses * 10 > valid * 7,
            "only {} of {valid} valid versions were read as changes",
            changes.incremental_parses
        );
    }

    #[test]
    fn only_the_changed_items_are_parsed_again() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut ws: Vec<String> = (0..50).map(|i| workload(i, &mut rng)).collect();
        let mut r = Reparser::new();
        let first = mesh(&ws, "");
        let reading = r.read(Path::new(PATH), &first).unwrap();
        r.commit(reading);
        assert_eq!(
            (r.incremental_parses, r.items_parsed),
            (0, 0),
            "the first is full"
        );
        ws[7] = workload(1234, &mut rng);
        let text = mesh(&ws, "");
        let reading = r.read(Path::new(PATH), &text).unwrap();
        assert_eq!((r.incremental_parses, r.items_parsed), (1, 1));
        assert!(reading.rest.is_none(), "only a workload changed");
        let Workloads::Changes { gone, new, .. } = &reading.workloads else {
            panic!("{:?}", reading.workloads);
        };
        assert_eq!(gone, &["ns-1/w-7"]);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].name, "w-1234");
        // Not committed: the same change again is read against the first version.
        let again = r.read(Path::new(PATH), &text).unwrap();
        assert!(matches!(&again.workloads, Workloads::Changes { new, .. } if new.len() == 1));
        r.commit(again);
        let same = r.read(Path::new(PATH), &text).unwrap();
        assert!(
            matches!(&same.workloads, Workloads::Changes { gone, new, .. } if gone.is_empty() && new.is_empty())
        );
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
        // Quoted scalars and flow collections left open at a line's end; a NUL.
        for text in [
            "workloads:\n  - {name: w, uid: \"u1\n  - x\"}\n",
            "trustDomain: \"cluster.local\nworkloads:\n  - {name: w}\nx: \"\n",
            "workloads:\n  - {name: w, labels: {a: 'it''s\n  - b'}}\n",
            "workloads:\n  - {name: w,\n  - x: y}\n",
            "workloads:\n  - {name: w]\n",
            "nodes: []\ntrustDomain: x\0nodes 11\n- name: n1\n",
        ] {
            assert!(split(text).is_none(), "{text:?}");
        }
        // What closes on its line, comments and apostrophes inside words are fine.
        assert!(
            split(
                "workloads:\n  - {name: w, uid: \"a # b\", l: 'it''s'} # it's\n  - {name: it's}\n"
            )
            .is_some()
        );
        // Found by the fuzzer: a line of fewer spaces than the items, then a multi-byte
        // character where the items' dash would be.
        assert!(split("workloads:\n  - name0 frode: node-0\n \u{c30}").is_none());
        let s =
            split("nodes:\n- name: a\n# c\n- name: b\nworkloads: []\ntrustDomain: x\n").unwrap();
        assert_eq!(s.items["nodes"], ["- name: a\n# c\n", "- name: b\n"]);
        assert_eq!(s.skeleton, "nodes: []\nworkloads: []\ntrustDomain: x\n");
    }
}
