//! Links the guest with its own linker script as a static, freestanding ELF.
//!
//! The guest needs `panic = "abort"`, which only the workspace's `guest` profile gives it
//! (`cargo build -p warmvm-guest --profile guest`, as crates/guest-image does). Built under
//! any other profile (a `cargo build --workspace`, say) it could not link without std, so
//! the build script then sets `cfg(warmvm_guest_stub)`, which turns the binary into a host
//! stub that only explains how to build the real thing. A build script cannot see the
//! profile's panic strategy (CARGO_CFG_PANIC reports the target's default), so it goes by
//! the profile directory in OUT_DIR (`<target-dir>/[<triple>/]guest/build/...`), unless
//! `WARMVM_GUEST_FREESTANDING` (1 or 0) says otherwise. src/main.rs refuses to build the
//! freestanding guest without panic=abort, so a wrong guess fails loudly.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-env-changed=WARMVM_GUEST_FREESTANDING");
    println!("cargo:rustc-check-cfg=cfg(warmvm_guest_stub)");

    let freestanding = match env::var("WARMVM_GUEST_FREESTANDING") {
        Ok(v) => v == "1",
        Err(_) => built_with_guest_profile(),
    };
    if !freestanding {
        println!("cargo:rustc-cfg=warmvm_guest_stub");
        return;
    }

    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let script = dir.join("link.ld");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
}

/// Whether OUT_DIR lies in the `guest` profile's directory: `.../guest/build/<pkg>-<hash>/out`.
fn built_with_guest_profile() -> bool {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let parts: Vec<_> = out_dir
        .components()
        .map(|c| c.as_os_str().to_owned())
        .collect();
    parts
        .windows(2)
        .rev()
        .any(|w| w[0] == "guest" && w[1] == "build")
}
