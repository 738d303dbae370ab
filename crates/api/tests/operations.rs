//! The daemon's operations driven without HTTP: the typed layer the router, the aging
//! monitor and the rejuvenation thread call, taking typed requests and answering typed
//! reports or an error with the status the API gives it. Boots a reference VM on /dev/kvm
//! (skipped without it, unless `WARMVM_REQUIRE_KVM=1`).

use std::time::Duration;

use warmvm_api::types::{Mode, RebootRequest, StopRequest, MAX_STOP_GRACE_SECS};
use warmvm_api::ApiState;
use warmvm_vmm::{Host, Lifecycle, VmConfig};

#[test]
fn operations_run_on_typed_requests_without_http() {
    if !warmvm_vmm::testing::kvm_available("operations_run_on_typed_requests_without_http") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("warmvm-ops-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = ApiState::new(Host::open(&dir).unwrap());

    let created = state
        .create_config(&VmConfig::reference("o1", 64, 1))
        .unwrap();
    assert_eq!(created.name, "o1");
    assert_eq!(state.list().vms.len(), 1);
    assert_eq!(state.status().unwrap().vm_count, 1);
    assert_eq!(state.pause("o1").unwrap().lifecycle, Lifecycle::Paused);
    assert_eq!(state.resume("o1").unwrap().lifecycle, Lifecycle::Running);

    // Refusals are typed errors with the API's statuses, and change nothing.
    let too_long = StopRequest {
        grace_secs: Some(MAX_STOP_GRACE_SECS + 1),
    };
    assert_eq!(state.stop("o1", &too_long).unwrap_err().status, 400);
    assert_eq!(state.pause("nope").unwrap_err().status, 404);
    assert_eq!(state.delete("o1", false).unwrap_err().status, 409);
    // A reboot needs the daemon around the state (its server, its successor's arguments).
    let e = state.reboot(&RebootRequest::new(Mode::Warm)).unwrap_err();
    assert_eq!(e.status, 409, "{}", e.message);
    assert!(e.message.contains("without a server"), "{}", e.message);
    assert_eq!(state.list().vms[0].lifecycle, Lifecycle::Running);

    let stopped = state
        .stop(
            "o1",
            &StopRequest {
                grace_secs: Some(0),
            },
        )
        .unwrap();
    assert!(stopped.lifecycle.is_finished(), "{:?}", stopped.lifecycle);
    state.delete("o1", false).unwrap();
    assert!(state.list().vms.is_empty());
    state.shutdown(Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(&dir);
}
