//! Each check on synthetic inputs: it can fail, and comments and strings do not trip it.

use super::*;

fn file(path: &str, text: &str) -> SourceFile {
    SourceFile::new(path, text)
}

/// A function spanning exactly `lines` lines, from its `fn` line to its closing brace.
fn function(name: &str, lines: usize) -> String {
    let mut s = format!("fn {name}() {{\n");
    for k in 0..lines - 2 {
        s.push_str(&format!("    // line {k}\n"));
    }
    s.push_str("}\n");
    s
}

#[test]
fn mask_blanks_comments_strings_and_chars_but_not_lifetimes() {
    let text = "let a = \"crate::x \\\" unsafe\"; // unsafe\n\
                /* unsafe /* nested */ unsafe */ let b = r#\"unsafe \"# ;\n\
                let c = '\\''; let d = b'\"'; fn f<'a>(x: &'a str) -> char { 'u' }\n";
    let m = mask(text);
    assert_eq!(m.lines().count(), 3);
    assert_eq!(m.chars().count(), text.chars().count());
    assert!(!m.contains("unsafe"), "{m}");
    assert!(!m.contains("crate"), "{m}");
    assert!(m.contains("fn f<'a>(x: &'a str) -> char { \" \" }"), "{m}");
    assert!(m.contains("let b = \"          \" ;"), "{m}");
}

#[test]
fn mask_handles_raw_strings_with_hashes_and_byte_strings() {
    let text = "let a = br##\"x\"# \"## ; let b = c\"y\"; let r#type = 1; unsafe {}";
    let m = mask(text);
    assert_eq!(
        m,
        "let a = \"          \" ; let b = \"  \"; let r#type = 1; unsafe {}"
    );
}

fn engine(files: &[(&str, &str)]) -> Vec<SourceFile> {
    let mut v = vec![file(
        "engine/src/lib.rs",
        "pub mod a;\npub mod b;\nmod c;\n",
    )];
    v.extend(files.iter().map(|(p, t)| file(p, t)));
    v
}

#[test]
fn a_two_module_cycle_is_reported_as_a_path() {
    let files = engine(&[
        ("engine/src/a/mod.rs", "mod inner;\nuse crate::b::Thing;\n"),
        ("engine/src/a/inner.rs", "fn f() { crate::c::g(); }\n"),
        ("engine/src/b.rs", "use crate::{c, a::{x, y}};\n"),
        ("engine/src/c.rs", "pub fn g() {}\n"),
    ]);
    let msgs = check_module_cycles(&files, "engine/src");
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].starts_with("module cycle in engine/src: a -> b -> a\n"),
        "{}",
        msgs[0]
    );
    assert!(
        msgs[0].contains("engine/src/a/mod.rs:2: names crate::b"),
        "{}",
        msgs[0]
    );
    assert!(
        msgs[0].contains("engine/src/b.rs:1: names crate::a"),
        "{}",
        msgs[0]
    );
}

#[test]
fn a_three_module_cycle_is_found() {
    let files = engine(&[
        ("engine/src/a/mod.rs", "fn f() { let _ = crate::b::X; }\n"),
        ("engine/src/b.rs", "use crate::c;\n"),
        ("engine/src/c.rs", "use crate::{self as k, a};\n"),
    ]);
    let cycles = module_cycles(&module_dependencies(&files, "engine/src"));
    assert_eq!(cycles, vec![vec!["a", "b", "c", "a"]]);
}

#[test]
fn test_code_comments_and_strings_make_no_dependency() {
    let files = engine(&[
        (
            "engine/src/a/mod.rs",
            "use crate::b;\n#[cfg(test)]\nmod a_tests;\n#[cfg(test)]\nmod more {}\n",
        ),
        ("engine/src/a/a_tests.rs", "use crate::b;\n"),
        (
            "engine/src/b.rs",
            "// crate::a\n/// [`crate::a`]\nconst S: &str = \"crate::a::x\";\n\
             #[cfg(test)]\n#[allow(unused)]\nuse crate::a::x;\n\
             #[cfg(test)]\nmod tests {\n    use crate::a;\n    fn f() { let s = \"}\"; }\n}\n\
             fn g() {\n    #[cfg(test)]\n    crate::a::h();\n}\n",
        ),
    ]);
    let deps = module_dependencies(&files, "engine/src");
    let want = Dependency {
        from: "a".into(),
        to: "b".into(),
        path: "engine/src/a/mod.rs".into(),
        line: 1,
    };
    assert_eq!(deps, vec![want]);
    assert!(check_module_cycles(&files, "engine/src").is_empty());
}

#[test]
fn test_only_files_follow_cfg_test_mod_declarations() {
    let files = [
        file("e/src/lib.rs", "mod a;\n#[cfg(test)]\nmod tests;\n"),
        file("e/src/tests.rs", ""),
        file(
            "e/src/a.rs",
            "#[cfg(test)]\n#[path = \"x\"]\npub(crate) mod a_tests;\n",
        ),
        file("e/src/a/a_tests.rs", "mod deeper;"),
        file("e/src/a/a_tests/deeper.rs", ""),
        file("e/src/a/other.rs", ""),
        file("e/src/t.rs", "#![cfg(test)]\nfn x() {}\n"),
    ];
    let got: Vec<String> = test_only_files(&files).into_iter().collect();
    let want = [
        "e/src/a/a_tests.rs",
        "e/src/a/a_tests/deeper.rs",
        "e/src/t.rs",
        "e/src/tests.rs",
    ];
    assert_eq!(got, want);
}

#[test]
fn a_101_line_function_is_too_long_and_100_lines_are_not() {
    let text = format!("{}\n{}", function("ok", 100), function("too_long", 101));
    let long = long_functions_in(&file("x/src/f.rs", &text), MAX_FN_LINES);
    let want = LongFn {
        path: "x/src/f.rs".into(),
        name: "too_long".into(),
        line: 102,
        lines: 101,
    };
    assert_eq!(long, vec![want]);
    let msgs = check_long_functions(&[file("x/src/f.rs", &text)], "");
    assert_eq!(msgs, vec!["x/src/f.rs:102: fn too_long is 101 lines: NEW"]);
}

#[test]
fn function_bodies_are_found_past_signatures_and_declarations() {
    let body = function("inner", 101).replace("fn inner() {", "fn inner<'a>(x: [u8; 4]) {");
    let text = format!(
        "trait T {{ fn decl(&self); }}\ntype P = fn(u8) -> u8;\n\
         macro_rules! m {{ ($n:ident) => {{ fn $n() {{}} }}; }}\n\
         const S: &str = \"fn fake() {{\";\n{body}"
    );
    let long = long_functions_in(&file("f.rs", &text), MAX_FN_LINES);
    assert_eq!(long.len(), 1, "{long:?}");
    assert_eq!(
        (long[0].name.as_str(), long[0].line, long[0].lines),
        ("inner", 5, 101)
    );
}

#[test]
fn the_long_function_allow_list_is_exact() {
    let files = [file(
        "f.rs",
        &format!("{}{}", function("a", 120), function("b", 101)),
    )];
    let list = "# header\nf.rs::a  120\nf.rs::b 101\n";
    assert!(check_long_functions(&files, list).is_empty());
    // A listed function that grew.
    let msgs = check_long_functions(&files, "f.rs::a 119\nf.rs::b 101\n");
    let want = format!(
        "f.rs:1: fn a is 120 lines: GREW past the 119 lines recorded at \
         {LONG_FUNCTIONS_ALLOW_LIST}:1"
    );
    assert_eq!(msgs, vec![want]);
    // Stale entries: a function now short enough, and one that is gone.
    let files = [file(
        "f.rs",
        &format!("{}{}", function("a", 120), function("b", 100)),
    )];
    let msgs = check_long_functions(&files, "f.rs::a 120\nf.rs::b 101\nf.rs::gone 200\n");
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(msgs.iter().all(|m| m.contains("STALE entry")), "{msgs:?}");
    // Malformed lines are errors.
    let msgs = check_long_functions(&files, "f.rs::a 120\nf.rs::a many\n");
    assert!(msgs[0].contains("malformed entry"), "{msgs:?}");
}

#[test]
fn two_long_functions_of_one_name_need_two_entries() {
    let text = format!("{}{}", function("new", 150), function("new", 110));
    let files = [file("f.rs", &text)];
    assert!(check_long_functions(&files, "f.rs::new 150\nf.rs::new 110\n").is_empty());
    let msgs = check_long_functions(&files, "f.rs::new 150\n");
    assert_eq!(msgs, vec!["f.rs:151: fn new is 110 lines: NEW"]);
}

#[test]
fn a_101_column_line_fails_and_100_chars_of_multibyte_text_do_not() {
    let ok = "é".repeat(100);
    let long = "x".repeat(101);
    let files = [file("f.rs", &format!("{ok}\n{long}\n"))];
    assert_eq!(check_long_lines(&files), vec!["f.rs:2: 101 columns"]);
}

#[test]
fn unsafe_is_only_allowed_in_the_listed_directories() {
    let code = "fn f() {\n    unsafe { g() }\n}\nunsafe impl Send for X {}\n";
    let files = [
        file("engine/src/net/x.rs", code),
        file("engine/src/store/x.rs", code),
        file("ublk/src/lib.rs", code),
        file(
            "engine/src/y.rs",
            "// unsafe\n/// `unsafe fn`\nconst S: &str = \"unsafe {\";\n",
        ),
        file(
            "engine/src/z.rs",
            "#![forbid(unsafe_code)]\nfn unsafe_name() {}\n",
        ),
    ];
    let msgs = check_unsafe(&files, UNSAFE_ALLOWED);
    assert_eq!(
        msgs,
        vec![
            "engine/src/net/x.rs:2: unsafe",
            "engine/src/net/x.rs:4: unsafe"
        ]
    );
}

#[test]
fn pub_items_are_free_module_level_items_only() {
    let text = "pub fn f() {}\npub(crate) fn g() {}\npub const fn h() {}\n\
                pub struct S { pub field: u8 }\nimpl S { pub fn method(&self) {} }\n\
                pub trait T { fn m(&self); }\npub mod inline { pub static mut X: u8 = 0; }\n\
                fn body() { pub fn nested() {} }\npub use x::Y;\n\
                pub unsafe extern \"C\" fn e() {}\n\
                #[cfg(test)]\npub fn test_helper() {}\n";
    let items = pub_items(&file("f.rs", text));
    let got: Vec<(&str, &str, usize)> = items
        .iter()
        .map(|p| (p.kind.as_str(), p.name.as_str(), p.line))
        .collect();
    let want = [
        ("fn", "f", 1),
        ("fn", "h", 3),
        ("struct", "S", 4),
        ("trait", "T", 6),
        ("mod", "inline", 7),
        ("static", "X", 7),
        ("fn", "e", 10),
    ];
    assert_eq!(got, want);
}

#[test]
fn a_pub_item_used_only_inside_its_module_is_reported() {
    let all = [
        file(
            "engine/src/net/mod.rs",
            "pub fn used_by_volume() {}\npub fn only_net() {}\n",
        ),
        file(
            "engine/src/net/session.rs",
            "fn f() { super::only_net(); }\n",
        ),
        file(
            "engine/src/volume/mod.rs",
            "use crate::net::used_by_volume;\n// only_net\n",
        ),
        file(
            "engine/src/config.rs",
            "pub struct Unused;\npub struct UsedByTest;\n",
        ),
        file(
            "engine/tests/t.rs",
            "fn f(_: tandem_engine::config::UsedByTest) {}\n",
        ),
        file(
            "engine/src/lib.rs",
            "pub mod config;\npub mod net;\nmod volume;\n",
        ),
    ];
    let srcs = ["engine/src"];
    let unused: Vec<String> = unused_pub_items(&all, &srcs)
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(unused, ["only_net", "Unused"]);
    let msgs = check_unused_pub(&all, &srcs, "engine/src/config.rs::Unused\n");
    assert_eq!(
        msgs,
        vec![
            "engine/src/net/mod.rs:2: pub fn only_net is used nowhere outside engine/src/net/: NEW"
        ]
    );
    // A stale entry: the item is used now.
    let list = "engine/src/config.rs::Unused\nengine/src/net/mod.rs::only_net\n\
                engine/src/config.rs::UsedByTest\n";
    let msgs = check_unused_pub(&all, &srcs, list);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].contains(":3: STALE entry engine/src/config.rs::UsedByTest"),
        "{msgs:?}"
    );
}
