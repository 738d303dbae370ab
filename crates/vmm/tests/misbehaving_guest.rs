//! A guest that pokes at ports and addresses nobody emulates and then dies must be
//! counted, reported as crashed, and leave the VMM and every other VM running.

use std::time::{Duration, Instant};

use warmvm_vmm::{Config, Host, Lifecycle, VmConfig};

/// A minimal x86-64 ELF whose code, entered in 64-bit mode, reads port 0x99, writes port
/// 0x80, reads the unbacked address 0xd0000000, then executes UD2 (no IDT: triple fault).
fn rogue_kernel() -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    let mut code = vec![
        0x66, 0xba, 0x99, 0x00, // mov dx, 0x99
        0xec, // in al, dx
        0xe6, 0x80, // out 0x80, al
        0xa1, // mov eax, [moffs64]
    ];
    code.extend_from_slice(&0xd000_0000u64.to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x0b]); // ud2
    let mut elf = vec![0u8; 0x1000];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&LOAD.to_le_bytes()); // entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers at 64
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // header size
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // phdr size
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // one phdr
    let ph = 64;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    elf[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // file offset
    elf[ph + 16..ph + 24].copy_from_slice(&LOAD.to_le_bytes()); // vaddr
    elf[ph + 24..ph + 32].copy_from_slice(&LOAD.to_le_bytes()); // paddr
    elf[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(&code);
    elf
}

#[test]
fn a_crashing_guest_is_contained_and_its_stray_accesses_counted() {
    if !warmvm_vmm::testing::kvm_available("a_crashing_guest_is_contained") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("warmvm-rogue-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let kernel = dir.join("rogue.elf");
    std::fs::write(&kernel, rogue_kernel()).expect("kernel written");
    let mut rogue = VmConfig::reference("rogue", 64, 1);
    rogue.kernel = Some(kernel);
    rogue.boot = warmvm_vmm::config::BootKind::Linux;
    let mut good = VmConfig::reference("good", 64, 1);
    good.cmdline = Some("quiet interval_ms=10".into());
    let config = Config {
        state_dir: Some(dir.clone()),
        vms: vec![rogue, good],
        aging: None,
        privileges: None,
        fleet: None,
    };
    let mut host = Host::open(&dir).expect("KVM opens");
    host.create_all(&config).expect("VMs are created");
    host.start_all().expect("VMs start");
    let rogue = host.find("rogue").expect("rogue VM");
    let good = host.find("good").expect("good VM");
    assert!(
        rogue.wait_finished(Duration::from_secs(120)),
        "the rogue guest should die"
    );
    assert!(
        matches!(rogue.lifecycle(), Lifecycle::Crashed { .. }),
        "{:?}",
        rogue.lifecycle()
    );
    let unknown = rogue.report().unknown_accesses;
    assert!(
        unknown.pio_reads >= 1 && unknown.pio_writes >= 1,
        "{unknown:?}"
    );
    assert!(unknown.mmio_reads >= 1, "{unknown:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !good
        .guest_figures()
        .is_some_and(|g| g.all_verified_clean() && g.min_passes >= 2)
    {
        assert!(Instant::now() < deadline, "the good guest stalled");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(good.lifecycle(), Lifecycle::Running);
    host.stop_all(Duration::from_secs(10));
    assert_eq!(good.lifecycle(), Lifecycle::PoweredOff { exit_status: 0 });
    let _ = std::fs::remove_dir_all(dir);
}
