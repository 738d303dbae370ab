//! The workspace's lints hold in every crate: clippy refuses an `unsafe` block without a
//! `// SAFETY:` comment only in crates that opt in to the workspace's lints, so a new crate
//! that forgot `[lints] workspace = true` would silently escape the rule.

use std::path::Path;

fn manifest(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_member_crate_opts_in_to_the_workspace_lints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let workspace = manifest(&root.join("Cargo.toml"));
    let lint = workspace["workspace"]["lints"]["clippy"]["undocumented_unsafe_blocks"].as_str();
    assert_eq!(
        lint,
        Some("deny"),
        "the workspace no longer denies undocumented unsafe blocks"
    );
    let members = workspace["workspace"]["members"]
        .as_array()
        .expect("members");
    assert!(members.len() > 10, "members: {members:?}");
    let mut missing = Vec::new();
    for member in members {
        let dir = member.as_str().expect("member path");
        let crate_manifest = manifest(&root.join(dir).join("Cargo.toml"));
        let opted_in = crate_manifest
            .get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(|w| w.as_bool())
            == Some(true);
        if !opted_in {
            missing.push(dir.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "crates without `[lints] workspace = true`: {missing:?}"
    );
}
