//! Checks of the embedded reference guest: its ELF shape, its PVH note, that a loader of the
//! kind Cloud Hypervisor uses accepts it, that no compiler-generated code touches the
//! register the guest keeps its CPU-state proof in, and its command-line parser.

use std::io::Cursor;

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use warmvm_abi::layout;
use warmvm_guest_image::REFERENCE_GUEST_ELF;

// The guest's command-line parser is plain `core` code: test it here, on the host.
#[allow(dead_code)]
#[path = "../../../guest/src/cmdline.rs"]
mod cmdline;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

#[derive(Debug, Clone, Copy)]
struct Phdr {
    kind: u32,
    flags: u32,
    offset: u64,
    paddr: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

fn program_headers(elf: &[u8]) -> Vec<Phdr> {
    let phoff = u64_at(elf, 0x20) as usize;
    let phentsize = u16_at(elf, 0x36) as usize;
    let phnum = u16_at(elf, 0x38) as usize;
    assert_eq!(phentsize, 56, "ELF64 program header size");
    (0..phnum)
        .map(|i| {
            let p = phoff + i * phentsize;
            Phdr {
                kind: u32_at(elf, p),
                flags: u32_at(elf, p + 4),
                offset: u64_at(elf, p + 8),
                vaddr: u64_at(elf, p + 16),
                paddr: u64_at(elf, p + 24),
                filesz: u64_at(elf, p + 32),
                memsz: u64_at(elf, p + 40),
                align: u64_at(elf, p + 48),
            }
        })
        .collect()
}

/// The PVH entry from the Xen note, parsed by hand.
fn pvh_entry(elf: &[u8]) -> Option<u64> {
    for ph in program_headers(elf).iter().filter(|p| p.kind == PT_NOTE) {
        let notes = &elf[ph.offset as usize..(ph.offset + ph.filesz) as usize];
        let mut off = 0;
        while off + 12 <= notes.len() {
            let namesz = u32_at(notes, off) as usize;
            let descsz = u32_at(notes, off + 4) as usize;
            let kind = u32_at(notes, off + 8);
            let name = &notes[off + 12..off + 12 + namesz];
            let desc_off = off + 12 + namesz.next_multiple_of(4);
            let desc = &notes[desc_off..desc_off + descsz];
            if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                assert!(
                    descsz == 4 || descsz == 8,
                    "PVH note descriptor size {descsz}"
                );
                return Some(u64::from(u32_at(desc, 0)));
            }
            off = desc_off + descsz.next_multiple_of(4);
        }
    }
    None
}

fn executable_segment_contains(elf: &[u8], addr: u64) -> bool {
    program_headers(elf).iter().any(|p| {
        p.kind == PT_LOAD && p.flags & PF_X != 0 && (p.paddr..p.paddr + p.filesz).contains(&addr)
    })
}

#[test]
fn is_a_static_x86_64_elf_linked_at_the_image_address() {
    let elf = REFERENCE_GUEST_ELF;
    assert!(elf.len() > 64, "embedded guest is empty");
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELFCLASS64");
    assert_eq!(elf[5], 1, "little endian");
    assert_eq!(u16_at(elf, 0x10), 2, "ET_EXEC (static, not PIE)");
    assert_eq!(u16_at(elf, 0x12), 62, "EM_X86_64");

    let phdrs = program_headers(elf);
    let loads: Vec<_> = phdrs.iter().filter(|p| p.kind == PT_LOAD).collect();
    assert!(!loads.is_empty());
    for p in &loads {
        assert!(p.paddr >= layout::IMAGE_ADDR, "segment below 1 MiB: {p:?}");
        assert_eq!(
            p.paddr, p.vaddr,
            "identity-mapped guest: p_paddr == p_vaddr"
        );
        assert!(p.memsz >= p.filesz);
    }
    assert!(!phdrs.iter().any(|p| p.kind == 3), "no PT_INTERP");
    assert!(!phdrs.iter().any(|p| p.kind == 2), "no PT_DYNAMIC");

    let entry = u64_at(elf, 0x18);
    assert_eq!(entry, layout::IMAGE_ADDR, "_start is first in the image");
    assert!(
        executable_segment_contains(elf, entry),
        "entry {entry:#x} outside the code"
    );

    let end = loads.iter().map(|p| p.paddr + p.memsz).max().unwrap();
    assert!(end < layout::MMIO_HOLE_START);
}

#[test]
fn has_a_pvh_note_pointing_into_the_code() {
    let elf = REFERENCE_GUEST_ELF;
    let entry = pvh_entry(elf).expect("no XEN_ELFNOTE_PHYS32_ENTRY note");
    assert!(entry < 1 << 32, "PVH entry must be a 32-bit address");
    assert!(
        executable_segment_contains(elf, entry),
        "PVH entry {entry:#x} outside the code"
    );
    // QEMU rounds the note name up to the PT_NOTE segment's alignment.
    for p in program_headers(elf).iter().filter(|p| p.kind == PT_NOTE) {
        assert_eq!(p.align, 4, "PT_NOTE alignment");
    }
}

#[test]
fn loads_with_linux_loader_like_cloud_hypervisor() {
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let loaded = Elf::load(
        &mem,
        None,
        &mut Cursor::new(REFERENCE_GUEST_ELF),
        Some(GuestAddress(layout::IMAGE_ADDR)),
    )
    .expect("linux-loader rejects the guest");
    assert_eq!(loaded.kernel_load.0, layout::IMAGE_ADDR);
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => {
            assert_eq!(Some(addr.0), pvh_entry(REFERENCE_GUEST_ELF));
        }
        other => panic!("linux-loader found no PVH entry: {other:?}"),
    }
}

/// The guest keeps its page counter in XMM15 and counts any difference as a register check
/// failure. That is only sound while no compiler-generated code uses XMM15: check that the
/// only instructions naming it are in `warmvm_guest_xmm15_swap`. Needs objdump (binutils).
#[test]
fn only_the_swap_function_touches_xmm15() {
    let dir = std::env::temp_dir().join(format!("warmvm-guest-image-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("guest.elf");
    std::fs::write(&path, REFERENCE_GUEST_ELF).unwrap();
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "intel"])
        .arg(&path)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = match out {
        Ok(o) if o.status.success() => o,
        _ => {
            eprintln!("objdump not available: skipping the XMM15 check");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut function = String::new();
    let mut uses = 0;
    for line in text.lines() {
        if let Some(name) = line.strip_suffix(">:") {
            function = name.rsplit('<').next().unwrap_or_default().to_string();
            continue;
        }
        // Operands only: a call's `<symbol>` names the swap function itself.
        let operands = line.split('<').next().unwrap_or_default();
        if ["xmm15", "ymm15", "zmm15"]
            .iter()
            .any(|r| operands.contains(r))
        {
            assert_eq!(
                function, "warmvm_guest_xmm15_swap",
                "compiler-generated code uses XMM15: {line}"
            );
            uses += 1;
        }
    }
    assert_eq!(uses, 2, "the swap reads and writes XMM15 once each");
}

#[test]
fn cmdline_defaults_and_options() {
    let (o, ignored) = cmdline::parse(b"");
    assert_eq!(
        (
            o.fill_percent,
            o.interval_ms,
            o.refill_every,
            o.passes,
            o.quiet,
            o.tsc_khz
        ),
        (100, 50, 8, 0, false, None)
    );
    assert_eq!(ignored.count, 0);

    let (o, ignored) = cmdline::parse(
        b"  fill=25 interval_ms=0 refill_every=3\tpasses=7 quiet tsc_khz=2994000 console=ttyS0 fill=x",
    );
    assert_eq!(
        (
            o.fill_percent,
            o.interval_ms,
            o.refill_every,
            o.passes,
            o.quiet,
            o.tsc_khz
        ),
        (25, 0, 3, 7, true, Some(2_994_000))
    );
    let ignored: Vec<&[u8]> = ignored.iter().collect();
    assert_eq!(ignored, [&b"console=ttyS0"[..], &b"fill=x"[..]]);
}

#[test]
fn cmdline_hostile_modes() {
    use cmdline::spam::*;
    for (arg, bits) in [
        ("console", CONSOLE),
        ("ports", PORTS),
        ("both", CONSOLE | PORTS),
        ("mmio", MMIO),
        ("rings", RINGS),
    ] {
        let line = format!("hostile={arg}");
        let (o, ignored) = cmdline::parse(line.as_bytes());
        assert_eq!((o.spam, o.hostile, ignored.count), (bits, None, 0), "{arg}");
    }
    let (o, ignored) = cmdline::parse(b"hostile=loop");
    assert_eq!(
        (o.spam, o.hostile, ignored.count),
        (0, Some(cmdline::Hostile::Loop), 0)
    );
    let (o, ignored) = cmdline::parse(b"hostile=everything");
    assert_eq!((o.spam, o.hostile), (0, None));
    assert_eq!(ignored.count, 1, "hostile=everything is not a mode");
}

#[test]
fn cmdline_rejects_bad_values() {
    let (o, ignored) = cmdline::parse(
        b"fill=101 passes=-1 interval_ms= quiet=1 refill_every=99999999999999999999",
    );
    assert_eq!(
        (
            o.fill_percent,
            o.passes,
            o.interval_ms,
            o.quiet,
            o.refill_every
        ),
        (100, 0, 50, false, 8)
    );
    assert_eq!(ignored.count, 5);
    assert_eq!(cmdline::until_nul(b"passes=1\0garbage"), b"passes=1");
}
