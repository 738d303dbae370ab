//! A vCPU's register state at its first instruction, as plain data: what a boot protocol
//! (crate `warmvm-boot`) decides and [`crate::Vcpu::set_entry_state`] applies.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

/// Segment registers at entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct Segments {
    pub cs: kvm_segment,
    pub ds: kvm_segment,
    pub es: kvm_segment,
    pub fs: kvm_segment,
    pub gs: kvm_segment,
    pub ss: kvm_segment,
    pub tr: kvm_segment,
    pub ldt: kvm_segment,
}

impl Segments {
    /// Flat segments: `code` in CS, `data` in every data segment register, `tr` as the task
    /// register and no LDT.
    pub fn flat(code: kvm_segment, data: kvm_segment, tr: kvm_segment) -> Self {
        Self {
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr,
            ldt: kvm_segment {
                type_: 2,
                present: 1,
                unusable: 1,
                ..Default::default()
            },
        }
    }
}

/// The part of `kvm_sregs` that a boot protocol decides. Everything else (APIC base,
/// interrupt bitmap, CR2, CR8) keeps KVM's reset value.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemRegisters {
    pub segments: Segments,
    pub gdt: kvm_dtable,
    pub idt: kvm_dtable,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl SystemRegisters {
    /// Overlay these values on a vCPU's reset `kvm_sregs`.
    pub fn apply(&self, sregs: &mut kvm_sregs) {
        let s = &self.segments;
        sregs.cs = s.cs;
        sregs.ds = s.ds;
        sregs.es = s.es;
        sregs.fs = s.fs;
        sregs.gs = s.gs;
        sregs.ss = s.ss;
        sregs.tr = s.tr;
        sregs.ldt = s.ldt;
        sregs.gdt = self.gdt;
        sregs.idt = self.idt;
        sregs.cr0 = self.cr0;
        sregs.cr3 = self.cr3;
        sregs.cr4 = self.cr4;
        sregs.efer = self.efer;
    }
}

/// Register state of one vCPU at its first instruction.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuEntry {
    pub regs: kvm_regs,
    pub sregs: SystemRegisters,
    /// MSRs to set at entry (index, value).
    pub msrs: [(u32, u64); 1],
}
