//! The crate's modules import each other in one direction only: the `crate::` and `super::`
//! paths of every file (tests aside) are resolved to the module file they name, and the
//! graph they make must have no cycle (a module and its own submodules aside). The layers
//! are drawn in ARCHITECTURE.md, "The daemon".

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `.rs` file under `dir`, by module path (`reboot::modes`; `""` for lib.rs).
fn modules(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        if path.is_dir() {
            let mut p = prefix.to_vec();
            p.push(name);
            modules(&path, &p, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut p = prefix.to_vec();
            if name != "mod" && name != "lib" {
                p.push(name);
            }
            out.insert(p.join("::"), std::fs::read_to_string(&path).unwrap());
        }
    }
}

fn ident_at(s: &str) -> Option<(&str, &str)> {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| s.split_at(end))
}

/// The paths after `anchor::` in `code`, groups (`{a, b::c}`) expanded one level.
fn paths(code: &str, anchor: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(anchor) {
        let before = rest[..i].chars().last();
        rest = &rest[i + anchor.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut base = Vec::new();
        let mut s = rest;
        loop {
            if let Some(group) = s.strip_prefix('{') {
                let inner = &group[..group.find('}').unwrap_or(group.len())];
                for item in inner.split(',') {
                    let item = item.trim().split(" as ").next().unwrap_or_default();
                    let mut p = base.clone();
                    p.extend(item.split("::").map(str::to_string));
                    found.push(p);
                }
                break;
            }
            match ident_at(s) {
                Some((id, tail)) => {
                    base.push(id.to_string());
                    match tail.strip_prefix("::") {
                        Some(t) => s = t,
                        None => {
                            found.push(base);
                            break;
                        }
                    }
                }
                None => {
                    found.push(base);
                    break;
                }
            }
        }
    }
    found
}

/// The deepest module `path` names.
fn resolve(mods: &BTreeMap<String, String>, path: &[String]) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|k| path[..k].join("::"))
        .find(|m| mods.contains_key(m))
}

fn related(a: &str, b: &str) -> bool {
    a.is_empty()
        || b.is_empty()
        || a.starts_with(&format!("{b}::"))
        || b.starts_with(&format!("{a}::"))
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut mods = BTreeMap::new();
    modules(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &[],
        &mut mods,
    );
    let mut edges = BTreeMap::new();
    for (m, text) in &mods {
        let code = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default()
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let here: Vec<String> = if m.is_empty() {
            Vec::new()
        } else {
            m.split("::").map(str::to_string).collect()
        };
        // `super` is the parent module, for a mod.rs as for any other file.
        let parent = here[..here.len().saturating_sub(1)].to_vec();
        let mut targets = BTreeSet::new();
        let mut all = paths(&code, "crate::");
        all.extend(paths(&code, "super::").into_iter().map(|p| {
            let mut full = parent.clone();
            full.extend(p);
            full
        }));
        for p in all {
            if let Some(t) = resolve(&mods, &p) {
                if !related(m, &t) {
                    targets.insert(t);
                }
            }
        }
        edges.insert(m.clone(), targets);
    }
    edges
}

/// A cycle through `from`, if there is one.
fn cycle(
    edges: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    stack: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = stack.iter().position(|n| n == node) {
        let mut c = stack[i..].to_vec();
        c.push(node.to_string());
        return Some(c);
    }
    if done.contains(node) {
        return None;
    }
    stack.push(node.to_string());
    for next in &edges[node] {
        if let Some(c) = cycle(edges, next, stack, done) {
            return Some(c);
        }
    }
    stack.pop();
    done.insert(node.to_string());
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let edges = graph();
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        if let Some(c) = cycle(&edges, m, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_check_sees_the_imports_it_judges() {
    let edges = graph();
    // A few arrows that are there, and some that must not be.
    assert!(edges["router"].contains("ops") || edges["router"].contains("state"));
    assert!(edges["reboot::modes"].contains("reboot::bring_back"));
    assert!(edges["server"].contains("state"));
    assert!(!edges["state"].contains("server"));
    assert!(!edges["reboot::bring_back"].contains("reboot::modes"));
    // And a cycle is found when there is one.
    let mut with_cycle = edges.clone();
    with_cycle.get_mut("state").unwrap().insert("router".into());
    let found = cycle(&with_cycle, "state", &mut Vec::new(), &mut BTreeSet::new());
    assert!(found.is_some_and(|c| c.contains(&"router".to_string())));
}
