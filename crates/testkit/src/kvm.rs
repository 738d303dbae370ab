//! The one KVM gate of the tests: whether a test that needs /dev/kvm (or a tool it relies
//! on) can run, and what happens when it cannot. Without it the test is skipped with one
//! line on stderr, unless `WARMVM_REQUIRE_KVM=1` (as in CI), where the test fails instead.
//!
//! This file uses the standard library only: `warmvm-vmm` (whose `testing` module the
//! VMM's own tests use) and `warmvm-hypervisor`'s tests compile it in as well, since the
//! kit depends on them and they cannot depend on the kit.

/// True when tests must not skip: `WARMVM_REQUIRE_KVM=1`.
pub fn kvm_required() -> bool {
    std::env::var("WARMVM_REQUIRE_KVM").as_deref() == Ok("1")
}

/// `test` cannot run because of `why`: fail if tests are required to run, else say that it
/// is skipped. Returns false, for `if !cond { return skip_or_fail(..) }` style gates.
pub fn skip_or_fail(test: &str, why: &str) -> bool {
    if kvm_required() {
        panic!("{test}: {why} and WARMVM_REQUIRE_KVM=1");
    }
    eprintln!("{test}: skipped, {why}");
    false
}

/// Whether `test`, which needs /dev/kvm, can run: /dev/kvm opens read-write. See
/// [`skip_or_fail`] for what happens when it does not.
pub fn kvm_available(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    usable || skip_or_fail(test, "/dev/kvm is not usable")
}
