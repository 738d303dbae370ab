//! The crate's modules import each other in one direction only (tests aside): no module
//! imports one that imports it back. The layers are drawn in ARCHITECTURE.md.

use std::path::Path;

use warmvm_testkit::module_graph::{first_cycle, import_graph};

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let edges = import_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        edges["cli"].contains("args") && edges["client"].contains("failure"),
        "the check reads the imports: {edges:?}"
    );
    if let Some(c) = first_cycle(&edges) {
        panic!("import cycle: {}", c.join(" -> "));
    }
}
