//! tandem-tidy: the repository's tidy checks, run by `tidy/tests/tidy.rs` as part of
//! `cargo test --workspace` (issue 11, point 7). It owns five rules that keep the code
//! base easy to read and to review, and fails the test suite when one is broken:
//!
//! 1. **No module cycles** among the engine crate's top-level modules (those `lib.rs`
//!    declares, living in `engine/src/<module>/` or `engine/src/<module>.rs`). Module A
//!    depends on B when non-test code under A names `crate::B`: in `use crate::B...`, in a
//!    `use crate::{B, ...}` group (nested groups are walked; only the group's first
//!    segments count), or as a path `crate::B::...` in code. A cycle is reported as the
//!    path `a -> b -> a`, with every `path:line` that makes each step. No allow-list.
//! 2. **No function over [`MAX_FN_LINES`] (100) lines**, counted from the line of the
//!    `fn` keyword to the line of its closing brace, every line included (comments and
//!    blank lines too; attributes and doc comments above the `fn` are not). Test functions
//!    count. Existing offenders are listed in `tidy/allow/long-functions.txt` as
//!    `path::fn_name  <lines>`; that list is exact and only shrinks: a listed function
//!    that grows past its recorded count fails, and so does an entry whose function is
//!    gone or now fits in 100 lines.
//! 3. **No line over [`MAX_LINE_COLUMNS`] (100) columns**, counted in chars (not bytes),
//!    matching rustfmt's default `max_width`. No allow-list: rewrap the comment or split
//!    the string (a `\` line continuation keeps a literal's value).
//! 4. **No `unsafe` outside `engine/src/store/` and `ublk/`**: the keyword as a token in
//!    code (`unsafe {`, `unsafe fn`, `unsafe impl`); comments and strings do not count.
//!    Only the backing-IO layer and the ublk server talk to the kernel through raw
//!    pointers; everything else stays in safe Rust.
//! 5. **No `pub` item that nothing outside its module uses** (in `engine/src` and
//!    `ublk/src`): a `pub` item (not `pub(crate)` / `pub(super)` / `pub(in ..)`) whose
//!    name occurs in no other file of the workspace outside its own module should be
//!    `pub(crate)`, private, or deleted. Existing offenders that are API on purpose are
//!    listed in `tidy/allow/unused-pub.txt` as `path::name`, exact and shrinking like (2).
//!
//! # Heuristics
//!
//! The scanner is a small lexer, not a parser ([`mask`]): it blanks out comments
//! (nested block comments included), string literals (with escapes, byte and C strings,
//! raw strings with any number of `#`) and char literals (told apart from lifetimes by
//! the closing quote), keeping every newline so line numbers stay right. The checks then
//! read tokens of that masked code.
//!
//! * Test-only code is left out of checks 1 and 5 (it may use anything): files included
//!   only through a `#[cfg(test)] mod x;` declaration (and every file below `x/`), files
//!   starting with `#![cfg(test)]`, and every item or statement that follows a
//!   `#[cfg(test)]` attribute, skipped by matching brackets up to its closing `}` or `;`
//!   (or `,` for a struct field or an expression). Only the exact `cfg(test)` counts:
//!   `cfg(any(test, ..))` code is not test-only.
//! * Check 5 looks only at free items at module level (file level or inside an inline
//!   `mod x { .. }`, never inside `impl`, `trait` or function bodies): `fn`, `struct`,
//!   `enum`, `union`, `trait`, `const`, `static`, `type` and `mod`, and for structs and
//!   enums only the type name (not fields, variants or methods, whose names like `new` or
//!   `len` are too generic to grep). "Used" means the name occurs as an identifier in the
//!   code (not comments or strings) of any Rust file of the workspace other than the
//!   defining file and outside the item's module: for a file under
//!   `<src>/<module>/` that is the whole `<src>/<module>/` directory, for a file directly
//!   in `<src>/` (`config.rs`, `lib.rs`) the file alone. A name that occurs elsewhere by
//!   coincidence counts as used, so the check misses some offenders but never flags a
//!   used item.
//! * A function is `fn` followed by a name (so `fn(u8)` pointer types and
//!   `fn $name` in macros are skipped) whose signature reaches a `{` outside parentheses
//!   and brackets before any `;`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

/// A function may span at most this many lines, from its `fn` line to its closing brace.
pub const MAX_FN_LINES: usize = 100;
/// A line may hold at most this many chars (rustfmt's default `max_width`).
pub const MAX_LINE_COLUMNS: usize = 100;

/// Where the long-function allow-list lives, relative to the workspace root.
pub const LONG_FUNCTIONS_ALLOW_LIST: &str = "tidy/allow/long-functions.txt";
/// Where the unused-pub allow-list lives, relative to the workspace root.
pub const UNUSED_PUB_ALLOW_LIST: &str = "tidy/allow/unused-pub.txt";

/// The directories (relative to the workspace root) whose Rust sources the checks read.
pub const SOURCE_DIRS: &[&str] = &[
    "engine/src",
    "engine/tests",
    "ublk/src",
    "bench/src",
    "bench/benches",
    "tests/src",
    "tests/tests",
    "fuzz/fuzz_targets",
    "tidy/src",
    "tidy/tests",
];

/// Where `unsafe` is allowed (path prefixes relative to the workspace root).
pub const UNSAFE_ALLOWED: &[&str] = &["engine/src/store/", "ublk/"];

/// One Rust source file: its path relative to the workspace root (`/`-separated) and text.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: String,
    pub text: String,
}

impl SourceFile {
    pub fn new(path: impl Into<String>, text: impl Into<String>) -> Self {
        SourceFile {
            path: path.into(),
            text: text.into(),
        }
    }
}

/// Reads every `*.rs` file under `dirs` (relative to `root`), sorted by path. A missing
/// directory is an error, so a renamed one cannot silently drop out of the checks.
pub fn load_sources(root: &Path, dirs: &[&str]) -> std::io::Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    for dir in dirs {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let p = entry?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| e == "rs") {
                    let rel = p.strip_prefix(root).unwrap_or(&p);
                    let rel = rel.to_string_lossy().replace('\\', "/");
                    files.push(SourceFile::new(rel, std::fs::read_to_string(&p)?));
                }
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

// ---------------------------------------------------------------------------------------
// The scanner.

fn is_ident_char(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// End (exclusive) of a `"` string whose body starts at `j`.
fn string_end(s: &[char], mut j: usize) -> usize {
    while j < s.len() {
        match s[j] {
            '\\' => j += 2,
            '"' => return j + 1,
            _ => j += 1,
        }
    }
    s.len()
}

/// End (exclusive) of a raw string whose `#`s (or opening quote) start at `i`, if it is one.
fn raw_string_end(s: &[char], i: usize) -> Option<usize> {
    let hashes = s[i..].iter().take_while(|c| **c == '#').count();
    if s.get(i + hashes) != Some(&'"') {
        return None;
    }
    let mut j = i + hashes + 1;
    while j < s.len() {
        if s[j] == '"'
            && s[j + 1..]
                .iter()
                .take(hashes)
                .filter(|c| **c == '#')
                .count()
                == hashes
        {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(s.len())
}

/// End (exclusive) of a char literal starting with the quote at `i`, or `None` for a
/// lifetime or label (`'a`, `'static`).
fn char_literal_end(s: &[char], i: usize) -> Option<usize> {
    match (s.get(i + 1), s.get(i + 2)) {
        (Some('\\'), _) => {
            let mut j = i + 3;
            while j < s.len() && s[j] != '\'' && s[j] != '\n' {
                j += 1;
            }
            Some((j + 1).min(s.len()))
        }
        (Some(c), Some('\'')) if *c != '\'' => Some(i + 3),
        _ => None,
    }
}

fn blank(out: &mut [char], from: usize, to: usize) {
    for c in &mut out[from..to] {
        if *c != '\n' {
            *c = ' ';
        }
    }
}

/// `text` with every comment blanked and every literal (string, byte string, raw string,
/// char) reduced to `"` + blanks + `"`; newlines are kept, and so is every column.
pub fn mask(text: &str) -> String {
    let s: Vec<char> = text.chars().collect();
    let mut out = s.clone();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        let literal = if c == '/' && next == Some('/') {
            let end = s[i..]
                .iter()
                .position(|c| *c == '\n')
                .map_or(s.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
            continue;
        } else if c == '/' && next == Some('*') {
            let end = block_comment_end(&s, i);
            blank(&mut out, i, end);
            i = end;
            continue;
        } else if c == '"' {
            Some((i, string_end(&s, i + 1)))
        } else if c == '\'' {
            char_literal_end(&s, i).map(|end| (i, end))
        } else if is_ident_char(c) {
            let start = i;
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let end = match (word.as_str(), s.get(i)) {
                ("r" | "br" | "cr", Some('#' | '"')) => raw_string_end(&s, i),
                ("b" | "c", Some('"')) => Some(string_end(&s, i + 1)),
                ("b", Some('\'')) => char_literal_end(&s, i),
                _ => None,
            };
            match end {
                Some(end) => Some((start, end)),
                None => continue,
            }
        } else {
            None
        };
        match literal {
            Some((start, end)) => {
                blank(&mut out, start, end);
                out[start] = '"';
                out[end - 1] = '"';
                i = end;
            }
            None => i += 1,
        }
    }
    out.into_iter().collect()
}

fn block_comment_end(s: &[char], i: usize) -> usize {
    let mut depth = 0usize;
    let mut j = i;
    while j < s.len() {
        if s[j] == '/' && s.get(j + 1) == Some(&'*') {
            depth += 1;
            j += 2;
        } else if s[j] == '*' && s.get(j + 1) == Some(&'/') {
            depth -= 1;
            j += 2;
            if depth == 0 {
                return j;
            }
        } else {
            j += 1;
        }
    }
    s.len()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Ident(String),
    Punct(char),
    Literal,
    Lifetime,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    line: usize,
    /// Char offsets in the masked text.
    start: usize,
    end: usize,
}

impl Token {
    fn is(&self, word: &str) -> bool {
        matches!(&self.kind, Kind::Ident(w) if w == word)
    }
    fn is_punct(&self, c: char) -> bool {
        self.kind == Kind::Punct(c)
    }
    fn ident(&self) -> Option<&str> {
        match &self.kind {
            Kind::Ident(w) => Some(w),
            _ => None,
        }
    }
}

/// Tokens of masked code (see [`mask`]).
fn tokenize(masked: &str) -> Vec<Token> {
    let s: Vec<char> = masked.chars().collect();
    let mut toks = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < s.len() {
        let c = s[i];
        let start = i;
        let kind = if c == '\n' {
            line += 1;
            i += 1;
            continue;
        } else if c.is_whitespace() {
            i += 1;
            continue;
        } else if c == '"' {
            i = s[i + 1..]
                .iter()
                .position(|c| *c == '"')
                .map_or(s.len(), |p| i + p + 2);
            Kind::Literal
        } else if is_ident_char(c) {
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            Kind::Ident(s[start..i].iter().collect())
        } else if c == '\'' && s.get(i + 1).is_some_and(|c| is_ident_char(*c)) {
            i += 1;
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            Kind::Lifetime
        } else {
            i += 1;
            Kind::Punct(c)
        };
        toks.push(Token {
            kind,
            line,
            start,
            end: i,
        });
        // A literal may span lines.
        line += s[start..i].iter().filter(|c| **c == '\n').count();
    }
    toks
}

/// Index just past the bracket that closes the one at `open` (or the end).
fn matching(toks: &[Token], open: usize) -> usize {
    let mut depth = 0usize;
    for (j, t) in toks.iter().enumerate().skip(open) {
        if t.is_punct('(') || t.is_punct('[') || t.is_punct('{') {
            depth += 1;
        } else if t.is_punct(')') || t.is_punct(']') || t.is_punct('}') {
            depth = depth.saturating_sub(1);
            if depth == 0 {
                return j + 1;
            }
        }
    }
    toks.len()
}

/// If `#[cfg(test)]` (or `#![cfg(test)]`) starts at `i`, the index just past it.
fn cfg_test_at(toks: &[Token], i: usize) -> Option<usize> {
    let bang = usize::from(toks.get(i + 1).is_some_and(|t| t.is_punct('!')));
    let want = ["#", "[", "cfg", "(", "test", ")", "]"];
    let ok = want.iter().enumerate().all(|(k, w)| {
        let j = if k == 0 { i } else { i + k + bang };
        toks.get(j).is_some_and(|t| match &t.kind {
            Kind::Ident(x) => x == w,
            Kind::Punct(c) => w.len() == 1 && w.starts_with(*c),
            _ => false,
        })
    });
    ok.then_some(i + want.len() + bang)
}

/// Skips outer attributes (`#[..]`) starting at `i`.
fn skip_attributes(toks: &[Token], mut i: usize) -> usize {
    while toks.get(i).is_some_and(|t| t.is_punct('#'))
        && toks.get(i + 1).is_some_and(|t| t.is_punct('['))
    {
        i = matching(toks, i + 1);
    }
    i
}

/// Skips `pub`, `pub(crate)`, `pub(in ..)` starting at `i`.
fn skip_visibility(toks: &[Token], mut i: usize) -> usize {
    if toks.get(i).is_some_and(|t| t.is("pub")) {
        i += 1;
        if toks.get(i).is_some_and(|t| t.is_punct('(')) {
            i = matching(toks, i);
        }
    }
    i
}

const ITEM_KEYWORDS: &[&str] = &[
    "mod",
    "fn",
    "impl",
    "struct",
    "enum",
    "union",
    "trait",
    "use",
    "const",
    "static",
    "type",
    "extern",
    "unsafe",
    "async",
    "macro_rules",
];

/// End (exclusive token index) of the item, statement, field or expression that starts at
/// `i`, just after a `#[cfg(test)]`: its closing `}` or `;` at bracket depth 0 (or `,` when
/// it is not an item), or the bracket that closes the enclosing block.
fn cfg_test_item_end(toks: &[Token], i: usize) -> usize {
    let i = skip_attributes(toks, i);
    let first = skip_visibility(toks, i);
    let is_item = toks
        .get(first)
        .and_then(Token::ident)
        .is_some_and(|w| ITEM_KEYWORDS.contains(&w));
    let mut depth = 0usize;
    for (j, t) in toks.iter().enumerate().skip(i) {
        if t.is_punct('(') || t.is_punct('[') || t.is_punct('{') {
            depth += 1;
        } else if t.is_punct(')') || t.is_punct(']') || t.is_punct('}') {
            if depth == 0 {
                return j;
            }
            depth -= 1;
            if depth == 0 && t.is_punct('}') {
                return j + 1;
            }
        } else if depth == 0 && (t.is_punct(';') || (!is_item && t.is_punct(','))) {
            return j + 1;
        }
    }
    toks.len()
}

/// Masked code of `text` without its `#[cfg(test)]` items (blanked, lines kept).
fn non_test_code(text: &str) -> String {
    let masked = mask(text);
    let toks = tokenize(&masked);
    let mut out: Vec<char> = masked.chars().collect();
    let mut i = 0;
    while i < toks.len() {
        match cfg_test_at(&toks, i) {
            Some(_) if i == 0 && toks[1].is_punct('!') => {
                // `#![cfg(test)]` first in the file: all of it is test code.
                blank(&mut out, 0, toks[toks.len() - 1].end);
                break;
            }
            Some(after) if toks[i + 1].is_punct('!') => i = after,
            Some(after) => {
                let end = cfg_test_item_end(&toks, after);
                if end > i {
                    let to = toks[end - 1].end.max(toks[i].end);
                    blank(&mut out, toks[i].start, to);
                }
                i = end.max(after);
            }
            None => i += 1,
        }
    }
    out.into_iter().collect()
}

/// The directory where the children of the module in `path` live.
fn children_dir(path: &str) -> String {
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    match file {
        "lib.rs" | "main.rs" | "mod.rs" => dir.to_string(),
        _ => path.trim_end_matches(".rs").to_string(),
    }
}

/// Files that are only compiled for tests: included from a `#[cfg(test)] mod x;`
/// declaration (with everything below `x/`), or starting with `#![cfg(test)]`.
pub fn test_only_files(files: &[SourceFile]) -> BTreeSet<String> {
    let mut prefixes = Vec::new();
    let mut whole = BTreeSet::new();
    for f in files {
        let toks = tokenize(&mask(&f.text));
        if cfg_test_at(&toks, 0).is_some() && toks[1].is_punct('!') {
            whole.insert(f.path.clone());
        }
        for i in 0..toks.len() {
            let Some(after) = cfg_test_at(&toks, i) else {
                continue;
            };
            let j = skip_visibility(&toks, skip_attributes(&toks, after));
            let decl = (toks.get(j), toks.get(j + 1), toks.get(j + 2));
            if let (Some(m), Some(name), Some(semi)) = decl {
                if let (true, Some(name), true) = (m.is("mod"), name.ident(), semi.is_punct(';')) {
                    let dir = children_dir(&f.path);
                    let dir = if dir.is_empty() {
                        String::new()
                    } else {
                        format!("{dir}/")
                    };
                    prefixes.push((format!("{dir}{name}.rs"), format!("{dir}{name}/")));
                }
            }
        }
    }
    let mut out = whole;
    for f in files {
        if prefixes
            .iter()
            .any(|(file, dir)| f.path == *file || f.path.starts_with(dir))
        {
            out.insert(f.path.clone());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Check 1: module cycles.

/// One place where module `from` names `crate::to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub from: String,
    pub to: String,
    pub path: String,
    pub line: usize,
}

/// The top-level modules `<src>/lib.rs` declares (`mod x;` / `pub mod x;` / `mod x {}`).
fn top_level_modules(files: &[SourceFile], src: &str) -> BTreeSet<String> {
    let lib = format!("{src}/lib.rs");
    let Some(f) = files.iter().find(|f| f.path == lib) else {
        return BTreeSet::new();
    };
    let toks = tokenize(&non_test_code(&f.text));
    let mut mods = BTreeSet::new();
    for w in toks.windows(3) {
        if w[0].is("mod") && (w[2].is_punct(';') || w[2].is_punct('{')) {
            if let Some(name) = w[1].ident() {
                mods.insert(name.to_string());
            }
        }
    }
    mods
}

/// The first path segments named by the `crate::` path or `use` group at `i` (the token
/// after `crate::`), with their lines.
fn crate_path_heads(toks: &[Token], i: usize) -> Vec<(String, usize)> {
    let Some(t) = toks.get(i) else {
        return Vec::new();
    };
    if let Some(name) = t.ident() {
        return vec![(name.to_string(), t.line)];
    }
    if !t.is_punct('{') {
        return Vec::new();
    }
    let (mut heads, mut depth, mut first) = (Vec::new(), 0usize, true);
    for t in &toks[i..] {
        if t.is_punct('{') {
            depth += 1;
            first = depth == 1;
        } else if t.is_punct('}') {
            depth -= 1;
            if depth == 0 {
                break;
            }
        } else if depth == 1 && t.is_punct(',') {
            first = true;
        } else if depth == 1 {
            if let (true, Some(name)) = (first, t.ident()) {
                heads.push((name.to_string(), t.line));
            }
            first = false;
        }
    }
    heads
}

/// Every place where non-test code of one top-level module of the crate in `src` (e.g.
/// `engine/src`) names another one through `crate::`.
pub fn module_dependencies(files: &[SourceFile], src: &str) -> Vec<Dependency> {
    let mods = top_level_modules(files, src);
    let test_only = test_only_files(files);
    let mut deps = Vec::new();
    for f in files {
        let Some(rel) = f.path.strip_prefix(&format!("{src}/")) else {
            continue;
        };
        let head = rel.split('/').next().unwrap_or(rel);
        let from = head.trim_end_matches(".rs");
        if !mods.contains(from) || test_only.contains(&f.path) {
            continue;
        }
        let toks = tokenize(&non_test_code(&f.text));
        for i in 0..toks.len() {
            let is_crate = toks[i].is("crate")
                && toks.get(i + 1).is_some_and(|t| t.is_punct(':'))
                && toks.get(i + 2).is_some_and(|t| t.is_punct(':'));
            if !is_crate {
                continue;
            }
            for (to, line) in crate_path_heads(&toks, i + 3) {
                if to != from && mods.contains(&to) {
                    let (from, path) = (from.to_string(), f.path.clone());
                    deps.push(Dependency {
                        from,
                        to,
                        path,
                        line,
                    });
                }
            }
        }
    }
    deps
}

/// The module cycles of the dependencies: for each module, the shortest cycle through it
/// among modules that sort after it (so each cycle is found once, from its first module).
/// Each cycle is a path that starts and ends with the same module.
pub fn module_cycles(deps: &[Dependency]) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for d in deps {
        graph.entry(&d.from).or_default().insert(&d.to);
    }
    let mut cycles = Vec::new();
    for &start in graph.keys() {
        let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([start]);
        'bfs: while let Some(n) = queue.pop_front() {
            for &m in graph.get(n).into_iter().flatten() {
                if m == start {
                    let mut path = vec![start.to_string(), n.to_string()];
                    let mut k = n;
                    while k != start {
                        k = prev[k];
                        path.push(k.to_string());
                    }
                    path.reverse();
                    cycles.push(path);
                    break 'bfs;
                }
                if m > start && !prev.contains_key(m) {
                    prev.insert(m, n);
                    queue.push_back(m);
                }
            }
        }
    }
    cycles
}

/// Check 1 for the crate in `src`: one message per cycle, empty when there is none.
pub fn check_module_cycles(files: &[SourceFile], src: &str) -> Vec<String> {
    let deps = module_dependencies(files, src);
    let mut out = Vec::new();
    for cycle in module_cycles(&deps) {
        let mut msg = format!("module cycle in {src}: {}", cycle.join(" -> "));
        for step in cycle.windows(2) {
            msg.push_str(&format!("\n  {} -> {}:", step[0], step[1]));
            for d in deps.iter().filter(|d| d.from == step[0] && d.to == step[1]) {
                msg.push_str(&format!(
                    "\n    {}:{}: names crate::{}",
                    d.path, d.line, d.to
                ));
            }
        }
        msg.push_str(
            "\n  fix: break one step (move the shared piece into the module both can depend \
             on, or pass it in from the caller); cycles have no allow-list",
        );
        out.push(msg);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Allow-lists.

/// One entry of an allow-list file: `key [count]`, with its line in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    pub key: String,
    pub count: Option<usize>,
    pub line: usize,
}

/// Parses an allow-list: one `key [count]` per line; `#` starts a comment line. Malformed
/// lines are returned as errors.
pub fn parse_allow_list(text: &str) -> (Vec<AllowEntry>, Vec<String>) {
    let (mut entries, mut errors) = (Vec::new(), Vec::new());
    for (n, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut words = l.split_whitespace();
        let key = words.next().unwrap_or_default().to_string();
        let count = words.next().map(str::parse::<usize>);
        match (count, words.next()) {
            (None, None) => entries.push(AllowEntry {
                key,
                count: None,
                line: n + 1,
            }),
            (Some(Ok(c)), None) => entries.push(AllowEntry {
                key,
                count: Some(c),
                line: n + 1,
            }),
            _ => errors.push(format!("line {}: malformed entry {l:?}", n + 1)),
        }
    }
    (entries, errors)
}

/// One offender of a check with an allow-list: its key (`path::name`), its size (lines of
/// a long function, 0 otherwise) and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub key: String,
    pub size: usize,
    pub location: String,
}

/// Matches findings against an exact allow-list. The same key may occur several times
/// (two long functions of one name in one file): the largest finding pairs with the
/// largest entry. Returns one message per finding not covered, per finding larger than
/// its entry's count, and per stale entry.
pub fn match_allow_list(findings: &[Finding], list_name: &str, list: &str) -> Vec<String> {
    let (entries, mut out) = parse_allow_list(list);
    for e in &mut out {
        *e = format!("{list_name}: {e}");
    }
    let mut found: BTreeMap<&str, Vec<&Finding>> = BTreeMap::new();
    for f in findings {
        found.entry(&f.key).or_default().push(f);
    }
    let mut allowed: BTreeMap<&str, Vec<&AllowEntry>> = BTreeMap::new();
    for e in &entries {
        allowed.entry(&e.key).or_default().push(e);
    }
    let keys: BTreeSet<&str> = found.keys().chain(allowed.keys()).copied().collect();
    for key in keys {
        let mut fs = found.remove(key).unwrap_or_default();
        let mut es = allowed.remove(key).unwrap_or_default();
        fs.sort_by_key(|f| std::cmp::Reverse(f.size));
        es.sort_by_key(|e| std::cmp::Reverse(e.count));
        for k in 0..fs.len().max(es.len()) {
            match (fs.get(k), es.get(k)) {
                (Some(f), None) => out.push(format!("{}: NEW", f.location)),
                (Some(f), Some(e)) if e.count.is_some_and(|c| f.size > c) => out.push(format!(
                    "{}: GREW past the {} lines recorded at {list_name}:{}",
                    f.location,
                    e.count.unwrap_or_default(),
                    e.line
                )),
                (None, Some(e)) => out.push(format!(
                    "{list_name}:{}: STALE entry {}: no such offender any more; delete the line",
                    e.line, e.key
                )),
                _ => {}
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Check 2: long functions.

/// A function longer than [`MAX_FN_LINES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongFn {
    pub path: String,
    pub name: String,
    /// The line of the `fn` keyword.
    pub line: usize,
    /// Lines from the `fn` line to the closing brace's line, both included.
    pub lines: usize,
}

/// Every function of `file` longer than `max` lines.
pub fn long_functions_in(file: &SourceFile, max: usize) -> Vec<LongFn> {
    let toks = tokenize(&mask(&file.text));
    let mut out = Vec::new();
    for i in 0..toks.len() {
        let name = match (toks[i].is("fn"), toks.get(i + 1).and_then(Token::ident)) {
            (true, Some(name)) => name,
            _ => continue,
        };
        let mut j = i + 2;
        let body = loop {
            match toks.get(j) {
                None => break None,
                Some(t) if t.is_punct(';') => break None,
                Some(t) if t.is_punct('{') => break Some(j),
                Some(t) if t.is_punct('(') || t.is_punct('[') => j = matching(&toks, j),
                Some(_) => j += 1,
            }
        };
        let Some(open) = body else { continue };
        let close = matching(&toks, open).saturating_sub(1);
        let lines = toks[close].line - toks[i].line + 1;
        if lines > max {
            let (path, name) = (file.path.clone(), name.to_string());
            out.push(LongFn {
                path,
                name,
                line: toks[i].line,
                lines,
            });
        }
    }
    out
}

/// Check 2: functions over [`MAX_FN_LINES`] lines not covered by the allow-list text
/// `list`, listed functions that grew, and stale entries.
pub fn check_long_functions(files: &[SourceFile], list: &str) -> Vec<String> {
    let findings: Vec<Finding> = files
        .iter()
        .flat_map(|f| long_functions_in(f, MAX_FN_LINES))
        .map(|l| Finding {
            key: format!("{}::{}", l.path, l.name),
            size: l.lines,
            location: format!("{}:{}: fn {} is {} lines", l.path, l.line, l.name, l.lines),
        })
        .collect();
    match_allow_list(&findings, LONG_FUNCTIONS_ALLOW_LIST, list)
}

// ---------------------------------------------------------------------------------------
// Check 3: long lines.

/// Check 3: every line over [`MAX_LINE_COLUMNS`] chars, as `path:line: N columns`.
pub fn check_long_lines(files: &[SourceFile]) -> Vec<String> {
    let mut out = Vec::new();
    for f in files {
        for (n, line) in f.text.lines().enumerate() {
            let cols = line.chars().count();
            if cols > MAX_LINE_COLUMNS {
                out.push(format!("{}:{}: {cols} columns", f.path, n + 1));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Check 4: unsafe.

/// Check 4: every `unsafe` token in code outside the `allowed` path prefixes.
pub fn check_unsafe(files: &[SourceFile], allowed: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for f in files
        .iter()
        .filter(|f| !allowed.iter().any(|a| f.path.starts_with(a)))
    {
        for t in tokenize(&mask(&f.text)).iter().filter(|t| t.is("unsafe")) {
            out.push(format!("{}:{}: unsafe", f.path, t.line));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Check 5: pub items nothing outside their module uses.

/// A `pub` free item at module level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubItem {
    pub path: String,
    pub line: usize,
    pub kind: String,
    pub name: String,
}

const PUB_KINDS: &[&str] = &[
    "fn", "struct", "enum", "union", "trait", "const", "static", "type", "mod",
];

/// The `pub` free items at module level of `file`'s non-test code.
pub fn pub_items(file: &SourceFile) -> Vec<PubItem> {
    let toks = tokenize(&non_test_code(&file.text));
    // One entry per open `{`: whether it is the body of an inline `mod`.
    let mut blocks: Vec<bool> = Vec::new();
    let mut out = Vec::new();
    for i in 0..toks.len() {
        let t = &toks[i];
        if t.is_punct('{') {
            blocks.push(i >= 2 && toks[i - 2].is("mod") && toks[i - 1].ident().is_some());
        } else if t.is_punct('}') {
            blocks.pop();
        } else if t.is("pub")
            && blocks.iter().all(|m| *m)
            && !toks.get(i + 1).is_some_and(|t| t.is_punct('('))
        {
            out.extend(pub_item_at(&toks, i + 1, &file.path));
        }
    }
    out
}

/// The item after a `pub` at `i`, if it is one of [`PUB_KINDS`].
fn pub_item_at(toks: &[Token], mut i: usize, path: &str) -> Option<PubItem> {
    loop {
        let w = toks.get(i)?.ident()?;
        match w {
            "async" | "unsafe" | "default" => i += 1,
            "extern" => {
                i += if toks.get(i + 1)?.kind == Kind::Literal {
                    2
                } else {
                    1
                }
            }
            "const"
                if toks
                    .get(i + 1)
                    .is_some_and(|t| t.is("fn") || t.is("unsafe")) =>
            {
                i += 1
            }
            _ => break,
        }
    }
    let kind = toks[i].ident()?;
    if !PUB_KINDS.contains(&kind) {
        return None;
    }
    let mut n = i + 1;
    if kind == "static" && toks.get(n).is_some_and(|t| t.is("mut")) {
        n += 1;
    }
    let name = toks.get(n)?.ident()?;
    Some(PubItem {
        path: path.to_string(),
        line: toks[i].line,
        kind: kind.to_string(),
        name: name.to_string(),
    })
}

/// The part of the workspace that is "inside" the module of a file in one of `srcs`:
/// `<src>/<module>/` for a file in a module directory, else the file itself.
fn module_scope(path: &str, srcs: &[&str]) -> String {
    for src in srcs {
        if let Some(rel) = path.strip_prefix(&format!("{src}/")) {
            if let Some((module, _)) = rel.split_once('/') {
                return format!("{src}/{module}/");
            }
        }
    }
    path.to_string()
}

/// Check 5 without the allow-list: the `pub` free items of the non-test files under
/// `srcs` whose name occurs in no file of `all` outside the item's module.
pub fn unused_pub_items(all: &[SourceFile], srcs: &[&str]) -> Vec<PubItem> {
    let mut uses: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for f in all {
        for t in tokenize(&mask(&f.text)) {
            if let Kind::Ident(w) = t.kind {
                uses.entry(w).or_default().insert(&f.path);
            }
        }
    }
    let test_only = test_only_files(all);
    let mut out = Vec::new();
    let defining = all.iter().filter(|f| {
        srcs.iter().any(|s| f.path.starts_with(&format!("{s}/"))) && !test_only.contains(&f.path)
    });
    for f in defining {
        let scope = module_scope(&f.path, srcs);
        for item in pub_items(f) {
            let used = uses.get(&item.name).is_some_and(|files| {
                files
                    .iter()
                    .any(|p| *p != f.path && !p.starts_with(scope.as_str()))
            });
            if !used {
                out.push(item);
            }
        }
    }
    out
}

/// Check 5: unused `pub` items not covered by the allow-list text `list`, and stale
/// entries.
pub fn check_unused_pub(all: &[SourceFile], srcs: &[&str], list: &str) -> Vec<String> {
    let findings: Vec<Finding> = unused_pub_items(all, srcs)
        .into_iter()
        .map(|p| {
            let scope = module_scope(&p.path, srcs);
            Finding {
                key: format!("{}::{}", p.path, p.name),
                size: 0,
                location: format!(
                    "{}:{}: pub {} {} is used nowhere outside {scope}",
                    p.path, p.line, p.kind, p.name
                ),
            }
        })
        .collect();
    match_allow_list(&findings, UNUSED_PUB_ALLOW_LIST, list)
}

#[cfg(test)]
mod tests;
