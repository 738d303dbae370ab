//! Helpers for tests that need a real KVM.

/// Whether tests that need /dev/kvm can run. Without KVM they are skipped with a message,
/// unless `WARMVM_REQUIRE_KVM=1` (as in CI), where a missing KVM fails the test.
pub fn kvm_available(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        if std::env::var("WARMVM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm is not usable and WARMVM_REQUIRE_KVM=1");
        }
        eprintln!("{test}: skipped, /dev/kvm is not usable");
    }
    usable
}
