//! Only for the bench tests (bench.rs, bench_aging.rs, bench_qemu.rs), which move to the
//! bench crate: every other test uses the test kit (`warmvm_testkit`) directly. This goes
//! when they move.
#![allow(dead_code, unused_imports)]

pub use warmvm_testkit::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

pub fn required() -> bool {
    kvm_required()
}
