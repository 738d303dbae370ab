//! Network namespaces for tests that give guests TAP devices. The guard itself (a
//! namespace deleted when dropped, also on panic) is `warmvm_vmm::testing::Netns`, which
//! the VMM's own tests use too; the kit re-exports it with its helpers and adds the
//! namespace-with-a-TAP most daemon tests want. A daemon runs inside one with
//! [`crate::Start::netns`].

pub use warmvm_vmm::testing::{
    connect_http, enter_netns, http_get, in_netns, ip, Netns as Namespace,
};

/// A network namespace of a test's own, with one persistent TAP (`tap`) in it carrying
/// the host's end of the guest's link; deleted when dropped, also on panic. It derefs to
/// [`Namespace`] for `name`, `ip`, `add_tap`, `command` and `fetch`.
pub struct Netns {
    ns: Namespace,
    pub tap: String,
}

impl Netns {
    /// `tag` keeps names apart between tests; `host_cidr` is the host's address on the
    /// TAP, e.g. `10.77.0.1/24`.
    pub fn new(tag: &str, host_cidr: &str) -> Netns {
        let ns = Namespace::new(tag);
        let tap = "wvtap0".to_string();
        ns.add_tap(&tap, Some(host_cidr));
        Netns { ns, tap }
    }
}

impl std::ops::Deref for Netns {
    type Target = Namespace;
    fn deref(&self) -> &Self::Target {
        &self.ns
    }
}
