//! The crate's modules import each other in one direction only: the `crate::` and `super::`
//! paths of every file (tests aside) are resolved to the module file they name, and the
//! graph they make must have no cycle (a module and its own submodules aside). The layers
//! are drawn in ARCHITECTURE.md, "The daemon".

use std::collections::BTreeSet;
use std::path::Path;

// The test kit's, by path: the kit depends on this crate.
#[path = "../../testkit/src/module_graph.rs"]
mod module_graph;

use module_graph::{cycle, first_cycle, import_graph};

fn graph() -> std::collections::BTreeMap<String, BTreeSet<String>> {
    import_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    if let Some(c) = first_cycle(&graph()) {
        panic!("import cycle: {}", c.join(" -> "));
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
