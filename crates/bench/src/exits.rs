//! Figure 2: the cost of one port-I/O exit through warmvm, against the bare C probe.
//!
//! The probe (`ring3_exits.c`) starts a vCPU at CPL3 with its own page tables, GDT and a
//! TSS whose I/O bitmap allows every port, and times a loop of exits with nothing but a
//! `switch` in between. It is compiled with `gcc -O2` here and run as it is; its loop
//! alternates an MMIO and a port exit and it prints the mean per exit. A port-only variant
//! (the same source with the MMIO load removed) is run too, for a like-for-like figure.
//!
//! warmvm's side runs a tiny guest laid out the same way, but through warmvm's own layers
//! as a vCPU thread uses them: RAM from `warmvm_memory::GuestRam` (a sealed memfd), the VM,
//! irqchip and vCPU from `warmvm_hypervisor`, the entry state as a `warmvm_boot::CpuEntry`,
//! `Vcpu::run` with an `ExitHandler` that dispatches to `warmvm_devices::Devices`, and per
//! exit the same bookkeeping as warmvm's vCPU loop (recall generation, control lock, exit
//! counter). The guest reads the UART's line status register (`in al, dx`) N times, then
//! powers off through the power port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment};
use serde::Serialize;
use warmvm_boot::{CpuEntry, Segments, SystemRegisters, MSR_IA32_MISC_ENABLE};
use warmvm_devices::{ConsoleSink, Devices, IoAction, IrqLine, SerialConsole, Wake};
use warmvm_hypervisor::{CpuidOptions, Exit, ExitHandler, Hypervisor};
use warmvm_memory::vm_memory::{Bytes, GuestAddress};
use warmvm_memory::GuestRam;

use crate::util::{ctx, fail, write_file, Error, Result, Stats};

pub const GOAL_MAX_RATIO: f64 = 1.05;

/// The probe's loop body that makes its MMIO exit; removing it gives a port-only probe.
const PROBE_MMIO_LOAD: &str =
    "c[i++]=0x8b;c[i++]=0x04;c[i++]=0x25; *(uint32_t*)(c+i)=0x40000000; i+=4;";

#[derive(Debug, Serialize)]
pub struct ExitReport {
    pub rounds: usize,
    pub loops: u32,
    pub probe_source: PathBuf,
    /// The probe as it is: mean of its MMIO and port exits, µs per exit.
    pub probe_us: Stats,
    /// The probe with its MMIO load removed: port exits only, µs per exit (absent if the
    /// probe's source no longer has the expected MMIO line).
    pub probe_port_only_us: Option<Stats>,
    /// warmvm: port exits through its hypervisor, device and vCPU-loop layers, µs per exit.
    pub warmvm_us: Stats,
    /// warmvm median / probe median (the goal's figure).
    pub ratio: f64,
    /// warmvm median / port-only probe median.
    pub ratio_port_only: Option<f64>,
    pub goal_max_ratio: f64,
    pub meets_goal: bool,
}

/// Compile the probe (and its port-only variant) into `dir`.
fn build_probes(source: &Path, dir: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let text = std::fs::read_to_string(source)
        .map_err(ctx(format!("cannot read the probe {}", source.display())))?;
    let compile = |src: &Path, out: &Path| -> Result<()> {
        let o = Command::new("gcc")
            .arg("-O2")
            .arg("-o")
            .arg(out)
            .arg(src)
            .output()
            .map_err(ctx("cannot run gcc (install it to build the probe)"))?;
        if !o.status.success() {
            return fail(format!(
                "gcc failed on {}: {}",
                src.display(),
                crate::util::last_line(&o.stderr)
            ));
        }
        Ok(())
    };
    let probe = dir.join("ring3_exits");
    compile(source, &probe)?;
    let port_only = if text.contains(PROBE_MMIO_LOAD) {
        let src = dir.join("ring3_port_exits.c");
        write_file(&src, &text.replacen(PROBE_MMIO_LOAD, "", 1))?;
        let bin = dir.join("ring3_port_exits");
        compile(&src, &bin)?;
        Some(bin)
    } else {
        None
    };
    Ok((probe, port_only))
}

/// Run a probe binary with `loops` iterations; its printed µs per exit.
fn run_probe(bin: &Path, loops: u32) -> Result<f64> {
    let o = Command::new(bin)
        .arg(loops.to_string())
        .output()
        .map_err(ctx(format!("cannot run {}", bin.display())))?;
    let out = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        return fail(format!(
            "{} failed ({}): {}",
            bin.display(),
            o.status,
            crate::util::last_line(&o.stderr)
        ));
    }
    // "20000 loops: mmio=20000 pio=20000 in 1.042 s: 26.05 us per exit, rax=..."
    let per_exit = out
        .split_once(" us per exit")
        .and_then(|(head, _)| head.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    match per_exit {
        Some(v) if out.contains("pio=") && !out.contains("pio=0 ") => Ok(v),
        _ => fail(format!(
            "unexpected output from {}: {}",
            bin.display(),
            out.trim()
        )),
    }
}

// Guest layout (guest-physical), as in the probe.
const RAM_BYTES: u64 = 4 << 20;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const TSS: u64 = 0x6000;
const TSS_LIMIT: u32 = 104 + 8192;
const CODE: u64 = 0x10000;
const STACK_TOP: u64 = 0x80000;

const SEL_USER_CODE: u16 = 0x18 | 3;
const SEL_USER_DATA: u16 = 0x20 | 3;
const SEL_TSS: u16 = 0x28;

/// `mov ecx, loops; mov dx, LSR; l: in al, dx; dec ecx; jnz l;
///  mov dx, POWER_PORT; xor eax, eax; out dx, eax; jmp $`
fn guest_code(loops: u32) -> Vec<u8> {
    let lsr = warmvm_abi::SERIAL_PORT + 5;
    let mut c = vec![0xb9];
    c.extend_from_slice(&loops.to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba]);
    c.extend_from_slice(&lsr.to_le_bytes());
    let top = c.len();
    c.push(0xec); // in al, dx
    c.extend_from_slice(&[0xff, 0xc9]); // dec ecx
    let rel = top as i64 - (c.len() as i64 + 2);
    c.extend_from_slice(&[0x75, rel as i8 as u8]); // jnz top
    c.extend_from_slice(&[0x66, 0xba]);
    c.extend_from_slice(&warmvm_abi::POWER_PORT.to_le_bytes());
    c.extend_from_slice(&[0x31, 0xc0, 0xef, 0xeb, 0xfe]);
    c
}

fn write_guest(ram: &GuestRam, loops: u32) -> Result<()> {
    let mem = ram.memory();
    let w64 = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(ctx(format!("writing guest memory at {addr:#x}")))
    };
    // Identity map of the first 4 MiB with 2 MiB user pages.
    w64(PML4, PDPT | 7)?;
    w64(PDPT, PD | 7)?;
    w64(PD, 0x87)?;
    w64(PD + 8, 0x20_0000 | 0x87)?;
    let tss_desc = u64::from(TSS_LIMIT & 0xffff)
        | ((TSS & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (u64::from(TSS_LIMIT >> 16) << 48)
        | (((TSS >> 24) & 0xff) << 56);
    let gdt = [
        0,
        0x00af_9b00_0000_ffff, // 0x08 kernel code
        0x00cf_9300_0000_ffff, // 0x10 kernel data
        0x00af_fb00_0000_ffff, // 0x18 user code, 64-bit, DPL 3
        0x00cf_f300_0000_ffff, // 0x20 user data, DPL 3
        tss_desc,              // 0x28 busy 64-bit TSS
        TSS >> 32,
    ];
    for (i, e) in gdt.iter().enumerate() {
        w64(GDT + 8 * i as u64, *e)?;
    }
    // TSS with an all-zero I/O bitmap (every port allowed) and its closing 0xff byte.
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[102..104].copy_from_slice(&104u16.to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    mem.write_slice(&tss, GuestAddress(TSS))
        .map_err(ctx("writing the guest TSS"))?;
    mem.write_slice(&guest_code(loops), GuestAddress(CODE))
        .map_err(ctx("writing the guest code"))?;
    Ok(())
}

fn entry() -> CpuEntry {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: SEL_USER_CODE,
        type_: 11,
        present: 1,
        dpl: 3,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: SEL_USER_DATA,
        type_: 3,
        present: 1,
        dpl: 3,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    };
    let tr = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT,
        selector: SEL_TSS,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    CpuEntry {
        regs: kvm_regs {
            rip: CODE,
            rsp: STACK_TOP,
            rflags: 0x2,
            ..Default::default()
        },
        sregs: SystemRegisters {
            segments: Segments::flat(code, data, tr),
            gdt: kvm_dtable {
                base: GDT,
                limit: 7 * 8 - 1,
                ..Default::default()
            },
            idt: kvm_dtable::default(),
            cr0: 0x8005_0033, // PE MP ET NE WP AM PG
            cr3: PML4,
            cr4: (1 << 5) | (1 << 9) | (1 << 10), // PAE OSFXSR OSXMMEXCPT
            efer: (1 << 8) | (1 << 10),           // LME LMA
        },
        msrs: [(MSR_IA32_MISC_ENABLE, 1)],
    }
}

/// warmvm's exit handler, as in its vCPU loop: every access goes to the VM's devices.
struct Exits<'a> {
    devices: &'a Devices,
    action: IoAction,
    last_wake: Wake,
}

impl ExitHandler for Exits<'_> {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.devices.pio_read(port, data, self.last_wake);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.action = self.devices.pio_write(port, data);
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.devices.mmio_read(addr, data);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.devices.mmio_write(addr, data);
    }
}

/// One warmvm run of `loops` port exits; µs per exit.
fn run_warmvm(hv: &Hypervisor, loops: u32) -> Result<f64> {
    // Declared first so it is dropped last: KVM uses the mapping until the VM is gone.
    let ram = GuestRam::create("bench-exits", RAM_BYTES, false).map_err(ctx("guest RAM"))?;
    let mut vm = hv.create_vm().map_err(ctx("creating the bench VM"))?;
    for (slot, (guest_addr, size, host_addr)) in ram.slots().into_iter().enumerate() {
        // SAFETY: the mapping belongs to `ram`, which is declared before `vm` and so
        // outlives it and every vCPU made from it.
        unsafe { vm.map_memory(slot as u32, guest_addr, size, host_addr) }
            .map_err(ctx("mapping the bench VM's RAM"))?;
    }
    vm.create_irqchip().map_err(ctx("creating the irqchip"))?;
    let mut vcpu = vm
        .create_vcpu(0, 1, &CpuidOptions::default())
        .map_err(ctx("creating the vCPU"))?;
    write_guest(&ram, loops)?;
    vcpu.set_entry_state(&entry())
        .map_err(ctx("setting the vCPU's entry state"))?;
    let devices = Devices::new(
        "bench-exits",
        SerialConsole::new(ConsoleSink::new(None, false), IrqLine::none()),
        warmvm_devices::PlatformIrqs::none(),
    );
    let mut exits = Exits {
        devices: &devices,
        action: IoAction::None,
        last_wake: Wake::Timeout,
    };
    // Stand-ins for the vCPU thread's control block and counters, touched per exit as
    // warmvm's loop does.
    let control = Mutex::new(true);
    let io_exits = AtomicU64::new(0);
    vcpu.bind_to_current_thread();
    let t0 = Instant::now();
    let result = loop {
        let _recall = devices.doorbell.recall_generation();
        if !*control.lock().unwrap_or_else(|p| p.into_inner()) {
            break Err(Error("stopped".into()));
        }
        exits.action = IoAction::None;
        match vcpu.run(&mut exits) {
            Ok(Exit::Io) => {
                io_exits.fetch_add(1, Ordering::Relaxed);
                match exits.action {
                    IoAction::None => {}
                    IoAction::PowerOff { .. } | IoAction::Shutdown => break Ok(t0.elapsed()),
                    IoAction::Wait { .. } => {
                        break Err(Error("the bench guest waited unexpectedly".into()))
                    }
                }
            }
            Ok(Exit::Interrupted) => {}
            Ok(other) => break Err(Error(format!("the bench guest stopped with {other:?}"))),
            Err(e) => break Err(Error(format!("KVM_RUN of the bench guest: {e}"))),
        }
    };
    vcpu.unbind_thread();
    let elapsed = result?;
    let port_exits = io_exits.load(Ordering::Relaxed).saturating_sub(1);
    if port_exits != u64::from(loops) {
        return fail(format!(
            "the bench guest made {port_exits} port exits, expected {loops}"
        ));
    }
    Ok(elapsed.as_secs_f64() * 1e6 / port_exits as f64)
}

pub fn measure(
    probe_source: &Path,
    scratch: &Path,
    rounds: usize,
    loops: u32,
) -> Result<ExitReport> {
    let (probe, port_only) = build_probes(probe_source, scratch)?;
    let hv = Hypervisor::open().map_err(ctx("opening KVM"))?;
    let mut probe_us = Vec::new();
    let mut port_only_us = Vec::new();
    let mut warmvm_us = Vec::new();
    for round in 0..rounds {
        // Rotate the order so that neither side always runs first.
        for k in 0..3 {
            match (round + k) % 3 {
                0 => probe_us.push(run_probe(&probe, loops)?),
                1 => {
                    if let Some(bin) = &port_only {
                        port_only_us.push(run_probe(bin, loops)?);
                    }
                }
                _ => warmvm_us.push(run_warmvm(&hv, loops)?),
            }
        }
    }
    let probe_us = Stats::of(probe_us)?;
    let warmvm_us = Stats::of(warmvm_us)?;
    let probe_port_only_us = if port_only.is_some() {
        Some(Stats::of(port_only_us)?)
    } else {
        None
    };
    let ratio = warmvm_us.median / probe_us.median;
    let ratio_port_only = probe_port_only_us
        .as_ref()
        .map(|p| warmvm_us.median / p.median);
    Ok(ExitReport {
        rounds,
        loops,
        probe_source: probe_source.to_path_buf(),
        probe_us,
        probe_port_only_us,
        warmvm_us,
        ratio,
        ratio_port_only,
        goal_max_ratio: GOAL_MAX_RATIO,
        meets_goal: ratio <= GOAL_MAX_RATIO,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_loop_branches_back_to_its_in() {
        let c = guest_code(5);
        let jnz = c.iter().position(|&b| b == 0x75).unwrap();
        let target = (jnz as i64 + 2) + i64::from(c[jnz + 1] as i8);
        assert_eq!(c[target as usize], 0xec);
    }

    #[test]
    fn probe_source_still_has_its_mmio_load() {
        // The probe is part of the repository, so this holds in every clone: the
        // port-only variant is derived from it by removing exactly this line.
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/probes/ring3_exits.c"))
                .expect("the probe's source is in the repository");
        assert!(text.contains(PROBE_MMIO_LOAD));
    }

    #[test]
    fn the_probe_from_the_repository_and_warmvm_both_measure_port_exits() {
        if !warmvm_vmm::testing::kvm_available("exits_measure") {
            return;
        }
        let scratch = std::env::temp_dir().join(format!("warmvm-exits-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).expect("a scratch directory");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/ring3_exits.c");
        let report = measure(&source, &scratch, 1, 200);
        let _ = std::fs::remove_dir_all(&scratch);
        // measure() itself fails unless the probe built and ran, and warmvm's guest made
        // exactly the port exits it was asked for.
        let report = report.unwrap_or_else(|e| panic!("{e}"));
        assert!(report.probe_us.median > 0.0, "{report:?}");
        assert!(report.warmvm_us.median > 0.0, "{report:?}");
        let port_only = report
            .probe_port_only_us
            .expect("the port-only variant ran");
        assert!(port_only.median > 0.0);
    }
}
