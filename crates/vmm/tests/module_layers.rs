//! The crate's modules import each other in one direction only: the `crate::` and `super::`
//! paths of every file (tests aside) are resolved to the module file they name, through the
//! re-exports they pass (`crate::VmError` is `vm`'s), and the graph they make must have no
//! cycle (a module and its own submodules aside). The layers are drawn in ARCHITECTURE.md,
//! "Inside the VMM".

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

// The test kit's, by path: the kit depends on this crate.
#[path = "../../testkit/src/module_graph.rs"]
mod module_graph;

use module_graph::{cycle, first_cycle, import_graph};

fn graph() -> BTreeMap<String, BTreeSet<String>> {
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
    assert!(edges["vm"].contains("vcpu") && edges["vm"].contains("virtio"));
    assert!(edges["state::vm"].contains("vm"));
    assert!(edges["handover::incoming"].contains("state::legacy"));
    assert!(!edges["vcpu"].contains("vm"));
    assert!(!edges["state::record"].contains("handover"));
    // Through the crate root's re-exports: `crate::Host` is `host`'s.
    assert!(edges["handover::outgoing"].contains("host"));
    // And a cycle is found when there is one.
    let mut with_cycle = edges.clone();
    with_cycle.get_mut("vcpu").unwrap().insert("vm".into());
    let found = cycle(&with_cycle, "vm", &mut Vec::new(), &mut BTreeSet::new());
    assert!(found.is_some_and(|c| c.contains(&"vcpu".to_string())));
}
