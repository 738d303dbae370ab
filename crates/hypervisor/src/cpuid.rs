use kvm_bindings::CpuId;

const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// How a VM's CPUID differs from what KVM supports.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuidOptions {
    /// Hide CMPXCHG16B. Under an instruction-emulating KVM (this project's development host)
    /// Linux gets much further without it; on real hardware there is no reason to.
    pub hide_cx16: bool,
}

impl CpuidOptions {
    /// The CPUID of vCPU `id` of `count`: KVM's supported set with the APIC IDs, topology
    /// and hypervisor bit a guest expects.
    pub fn build(&self, supported: &CpuId, id: u32, count: u32) -> CpuId {
        let mut cpuid = supported.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count.min(255) << 16);
                    e.ecx |= LEAF1_ECX_HYPERVISOR;
                    if self.hide_cx16 {
                        e.ecx &= !LEAF1_ECX_CX16;
                    }
                }
                0xb | 0x1f => e.edx = id,
                _ => {}
            }
        }
        cpuid
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cx16_is_hidden_and_apic_id_set() {
        let supported = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            ecx: LEAF1_ECX_CX16,
            ..Default::default()
        }])
        .unwrap();
        let c = CpuidOptions { hide_cx16: true }.build(&supported, 3, 4);
        let e = c.as_slice()[0];
        assert_eq!(e.ecx & LEAF1_ECX_CX16, 0);
        assert_eq!(e.ebx >> 24, 3);
    }
}
