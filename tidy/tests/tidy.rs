//! The tidy checks over the real workspace (see `tidy/src/lib.rs` for what each one
//! enforces and how). One test per check, so a failure names its rule.

use std::path::{Path, PathBuf};

use tandem_tidy::{
    check_long_functions, check_long_lines, check_module_cycles, check_unsafe, check_unused_pub,
    load_sources, SourceFile, LONG_FUNCTIONS_ALLOW_LIST, MAX_FN_LINES, MAX_LINE_COLUMNS,
    SOURCE_DIRS, UNSAFE_ALLOWED, UNUSED_PUB_ALLOW_LIST,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tidy/ has a parent")
        .to_path_buf()
}

fn sources() -> Vec<SourceFile> {
    let files = load_sources(&root(), SOURCE_DIRS).expect("read the workspace's Rust sources");
    assert!(
        files.iter().any(|f| f.path == "engine/src/lib.rs"),
        "not the workspace root"
    );
    files
}

fn allow_list(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn fail_if_any(offenders: &[String], what: &str, fix: &str) {
    assert!(
        offenders.is_empty(),
        "{} {what}:\n{}\n\nhow to fix: {fix}",
        offenders.len(),
        offenders.join("\n")
    );
}

#[test]
fn no_module_cycles_in_the_engine() {
    let offenders = check_module_cycles(&sources(), "engine/src");
    fail_if_any(
        &offenders,
        "module cycle(s) among engine/src's top-level modules",
        "make the dependency one-way: move what both sides need into a module both may use \
         (or below the lower one), or pass it in as a parameter or trait; there is no \
         allow-list for cycles",
    );
}

#[test]
fn no_function_over_100_lines() {
    let offenders = check_long_functions(&sources(), &allow_list(LONG_FUNCTIONS_ALLOW_LIST));
    fail_if_any(
        &offenders,
        &format!("function(s) over {MAX_FN_LINES} lines, or allow-list entries out of date"),
        &format!(
            "NEW / GREW: split the function or, if unavoidable, add it to (or raise its \
             count in) {LONG_FUNCTIONS_ALLOW_LIST}; STALE: delete the entry (the list only \
             shrinks)"
        ),
    );
}

#[test]
fn no_line_over_100_columns() {
    let offenders = check_long_lines(&sources());
    fail_if_any(
        &offenders,
        &format!("line(s) over {MAX_LINE_COLUMNS} columns (chars)"),
        "rewrap the comment, split the string literal (a `\\` at the end of a line inside \
         a string keeps its value), or let `cargo fmt` wrap the code; there is no allow-list",
    );
}

#[test]
fn unsafe_only_in_store_and_ublk() {
    let offenders = check_unsafe(&sources(), UNSAFE_ALLOWED);
    fail_if_any(
        &offenders,
        &format!("`unsafe` outside {}", UNSAFE_ALLOWED.join(" and ")),
        "use a safe API, or move the unsafe code behind a safe function in \
         engine/src/store/ (the backing-IO layer)",
    );
}

#[test]
fn no_pub_item_unused_outside_its_module() {
    let offenders = check_unused_pub(
        &sources(),
        &["engine/src", "ublk/src"],
        &allow_list(UNUSED_PUB_ALLOW_LIST),
    );
    fail_if_any(
        &offenders,
        "pub item(s) used nowhere outside their module, or allow-list entries out of date",
        &format!(
            "NEW: make the item pub(crate) or private (or delete it if it is dead), or if it \
             is API on purpose add `path::name` to {UNUSED_PUB_ALLOW_LIST}; STALE: delete \
             the entry (the list only shrinks)"
        ),
    );
}
