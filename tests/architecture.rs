//! The crate's rooms (top-level modules of `src/`) form a layered graph: no
//! room imports one that imports it back, directly or through others. This
//! test reads the sources, so a loop fails CI the day it is written.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The room a file belongs to: `src/proxy/mod.rs` → `proxy`, `src/server.rs` → `server`.
fn room_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The source without its `#[cfg(test)]` modules: a unit test may use a
/// helper of another room (the demo PKI, say) without making the shipped
/// code depend on it.
fn without_test_modules(text: &str) -> String {
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines.peek().is_some_and(|l| {
                let l = l.trim_start();
                l.starts_with("mod ") || l.starts_with("#[") || l.starts_with("pub mod ")
            })
        {
            // Skip attributes, then the module up to its matching brace.
            let mut depth = 0i64;
            let mut opened = false;
            for l in lines.by_ref() {
                depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
                opened |= l.contains('{');
                if opened && depth <= 0 {
                    break;
                }
            }
            continue;
        }
        out.push(line);
    }
    out.join("\n")
}

/// The rooms a source text names through `crate::room` paths, including
/// `use crate::{a::…, b}` groups. Line comments and test modules are ignored.
fn imports(text: &str) -> BTreeSet<String> {
    let text = without_test_modules(text);
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(pos) = code[i..].find("crate::") {
        let start = i + pos + "crate::".len();
        i = start;
        // `crate::` preceded by an identifier character is another path (`$crate::`, `my_crate::`).
        if let Some(&b) = bytes.get(start.wrapping_sub("crate::".len() + 1))
            && (b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
        {
            continue;
        }
        if bytes.get(start) == Some(&b'{') {
            // A group: take the first segment of each top-level item.
            let mut depth = 0usize;
            let mut item = String::new();
            for &c in &bytes[start + 1..] {
                match c {
                    b'{' => depth += 1,
                    b'}' if depth == 0 => break,
                    b'}' => depth -= 1,
                    b',' if depth == 0 => {
                        push_first(&item, &mut out);
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c as char);
            }
            push_first(&item, &mut out);
        } else {
            push_first(&code[start..], &mut out);
        }
    }
    out
}

fn push_first(path: &str, out: &mut BTreeSet<String>) {
    let name: String = path
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if !name.is_empty() && name != "self" {
        out.insert(name);
    }
}

/// The room graph of `src/`: room → rooms it imports (itself excluded).
fn room_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let rooms: BTreeSet<String> = files.iter().map(|f| room_of(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let room = room_of(&src, f);
        if room == "lib" || room == "main" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let entry = graph.entry(room.clone()).or_default();
        for target in imports(&text) {
            if target != room && rooms.contains(&target) {
                entry.insert(target);
            }
        }
    }
    graph
}

/// One cycle through `graph`, if any, as the list of rooms along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let at = stack.iter().position(|s| s == n).unwrap();
                let mut cycle = stack[at..].to_vec();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(n.to_owned(), Mark::Open);
        stack.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(n.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in graph.keys() {
        let mut stack = Vec::new();
        if let Some(c) = visit(n, graph, &mut marks, &mut stack) {
            return Some(c);
        }
    }
    None
}

#[test]
fn rooms_import_no_loops() {
    let graph = room_graph();
    let shown: Vec<String> = graph
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} -> {}",
                v.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import loop among src/ rooms: {}\nroom graph:\n{}",
            cycle.join(" -> "),
            shown.join("\n")
        );
    }
}

#[test]
fn config_imports_no_phase() {
    // Config holds parsed data; the phases read it, never the other way round.
    let graph = room_graph();
    let config = graph.get("config").cloned().unwrap_or_default();
    let allowed: BTreeSet<String> = ["util"].iter().map(|s| s.to_string()).collect();
    let extra: Vec<&String> = config.difference(&allowed).collect();
    assert!(extra.is_empty(), "config imports {extra:?}");
}

#[test]
fn the_scanner_skips_test_modules() {
    let t = "use crate::a::X;\n#[cfg(test)]\nmod tests {\n    use crate::demo::Y;\n    fn f() { crate::z::g(); }\n}\nfn h() { crate::b::i(); }";
    let got: Vec<String> = imports(t).into_iter().collect();
    assert_eq!(got, ["a", "b"]);
}

#[test]
fn the_scanner_sees_groups_and_skips_comments() {
    let t =
        "use crate::{a::X, b, c::{d, e}};\n// crate::z\nlet x = crate::f::g();\nuse my_crate::h;";
    let got: Vec<String> = imports(t).into_iter().collect();
    assert_eq!(got, ["a", "b", "c", "f"]);
}
