//! The import graph of a crate's modules, read from its sources, and the cycles in it: the
//! crates whose ARCHITECTURE.md layers must hold (api, vmm, warmvm) check with it that no
//! module imports one that imports it back. Std-only, so that crates below the kit (vmm)
//! include this file by `#[path]` instead of depending on the kit.

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
            if name != "mod" && name != "lib" && name != "main" {
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

/// A module's text without its `mod tests` and its comments.
fn code(text: &str) -> String {
    text.split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default()
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `path`, written in module `here`, made absolute (`crate::`, `super::`, `self::` and a
/// child module's name resolved); `None` when it names another crate.
fn absolute(
    mods: &BTreeMap<String, String>,
    here: &[String],
    path: &[String],
) -> Option<Vec<String>> {
    let (first, rest) = path.split_first()?;
    let mut full = match first.as_str() {
        "crate" => Vec::new(),
        "super" => here[..here.len().saturating_sub(1)].to_vec(),
        "self" => here.to_vec(),
        _ => {
            let mut child = here.to_vec();
            child.push(first.clone());
            mods.contains_key(&child.join("::")).then_some(child)?
        }
    };
    full.extend(rest.iter().cloned());
    Some(full)
}

/// The names each module re-exports (`pub use`, `pub(crate) use`), with the absolute path
/// each stands for, so that `crate::Name` counts as an import of the module `Name` comes
/// from, not of the crate root that only passes it on.
fn reexports(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut all = BTreeMap::new();
    for (m, text) in mods {
        let here: Vec<String> = if m.is_empty() {
            Vec::new()
        } else {
            m.split("::").map(str::to_string).collect()
        };
        let mut names = BTreeMap::new();
        for anchor in ["pub use ", "pub(crate) use "] {
            for p in paths(&code(text), anchor) {
                if let (Some(name), Some(target)) = (p.last(), absolute(mods, &here, &p)) {
                    names.insert(name.clone(), target);
                }
            }
        }
        all.insert(m.clone(), names);
    }
    all
}

/// The deepest module `path` names, following the re-exports it goes through (`hops` more
/// at most).
fn resolve(
    mods: &BTreeMap<String, String>,
    reexported: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
    path: &[String],
    hops: usize,
) -> Option<String> {
    let k = (0..=path.len())
        .rev()
        .find(|&k| mods.contains_key(&path[..k].join("::")))?;
    let module = path[..k].join("::");
    let through = path
        .get(k)
        .and_then(|name| reexported.get(&module)?.get(name))
        .filter(|target| hops > 0 && !target.starts_with(&path[..=k]));
    match through {
        Some(target) => {
            let mut next = target.clone();
            next.extend(path[k + 1..].iter().cloned());
            resolve(mods, reexported, &next, hops - 1).or(Some(module))
        }
        None => Some(module),
    }
}

fn related(a: &str, b: &str) -> bool {
    a.is_empty()
        || b.is_empty()
        || a.starts_with(&format!("{b}::"))
        || b.starts_with(&format!("{a}::"))
}

/// Each module of the crate whose sources are in `src` (`""` for lib.rs or main.rs), and
/// the modules its code outside `mod tests` names through `crate::` or `super::` paths (its
/// own ancestors and descendants aside).
pub fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut mods = BTreeMap::new();
    modules(src, &[], &mut mods);
    let reexported = reexports(&mods);
    let mut edges = BTreeMap::new();
    for (m, text) in &mods {
        let code = code(text);
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
            if let Some(t) = resolve(&mods, &reexported, &p, 8) {
                if !related(m, &t) {
                    targets.insert(t);
                }
            }
        }
        edges.insert(m.clone(), targets);
    }
    edges
}

/// A cycle through `node`, if there is one.
pub fn cycle(
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

/// The first import cycle among `edges`' modules, as the modules along it.
pub fn first_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|m| cycle(edges, m, &mut Vec::new(), &mut done))
}
