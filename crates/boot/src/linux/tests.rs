//! The Linux and PVH boot on images built here: a bzImage and ELFs with and without a PVH
//! note, in anonymous guest memory.

use super::*;
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr};
use linux_loader::loader::bootparam::{boot_params, setup_header, CAN_USE_HEAP, LOADED_HIGH};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::ByteValued;
use vm_memory::Bytes;

const MIB: u64 = 1 << 20;

fn guest(mib: u64) -> (GuestMemoryMmap, Vec<RamRange>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib * MIB) as usize)])
        .expect("anonymous test memory");
    (
        mem,
        vec![RamRange {
            start: 0,
            len: mib * MIB,
        }],
    )
}

fn params<'a>(image: &'a [u8], ram: &'a [RamRange]) -> LinuxParams<'a> {
    LinuxParams {
        image,
        initrd: None,
        cmdline: "console=ttyS0 panic=1",
        ram,
        vcpus: 1,
        protocol: None,
        i8042: false,
    }
}

/// A bzImage with 4 setup sectors and `payload` as its protected-mode kernel.
fn bzimage(payload: &[u8]) -> Vec<u8> {
    let h = setup_header {
        setup_sects: 4,
        boot_flag: BOOT_FLAG_MAGIC,
        header: BZIMAGE_MAGIC,
        version: 0x20f,
        loadflags: LOADED_HIGH,
        code32_start: 0x10_0000,
        initrd_addr_max: 0x7fff_ffff,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: 1,
        xloadflags: XLF_KERNEL_64,
        cmdline_size: 2047,
        pref_address: 0x100_0000,
        init_size: 0x10_0000,
        ..Default::default()
    };
    let mut image = vec![0u8; 5 * 512];
    image[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(h.as_slice());
    image.extend_from_slice(payload);
    image
}

/// A minimal x86-64 ELF with one loadable segment holding `code` at `vaddr`/`paddr`
/// (file offset 0x1000) and, if `pvh` is given, a PVH entry note.
fn elf(entry: u64, vaddr: u64, paddr: u64, code: &[u8], pvh: Option<u32>) -> Vec<u8> {
    let phnum = if pvh.is_some() { 2 } else { 1 };
    let mut ehdr = Elf64_Ehdr {
        e_type: 2,
        e_machine: linux_loader::elf::EM_X86_64,
        e_version: 1,
        e_entry: entry,
        e_phoff: 64,
        e_ehsize: 64,
        e_phentsize: 56,
        e_phnum: phnum,
        ..Default::default()
    };
    ehdr.e_ident[..4].copy_from_slice(b"\x7fELF");
    ehdr.e_ident[4] = linux_loader::elf::ELFCLASS64;
    ehdr.e_ident[5] = 1; // little endian
    ehdr.e_ident[6] = 1;
    let load = Elf64_Phdr {
        p_type: linux_loader::elf::PT_LOAD,
        p_flags: 5,
        p_offset: 0x1000,
        p_vaddr: vaddr,
        p_paddr: paddr,
        p_filesz: code.len() as u64,
        p_memsz: code.len() as u64 + 0x1000,
        p_align: 0x1000,
    };
    let mut image = vec![0u8; 0x1000];
    image[..64].copy_from_slice(ehdr.as_slice());
    image[64..120].copy_from_slice(load.as_slice());
    if let Some(entry) = pvh {
        let note_off = 0x200u64;
        // An unrelated note first, then XEN_ELFNOTE_PHYS32_ENTRY.
        let mut note = Vec::new();
        for (ty, desc) in [
            (6u32, b"linux\0\0\0".to_vec()),
            (18, entry.to_le_bytes().to_vec()),
        ] {
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            note.extend_from_slice(&ty.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&desc);
        }
        let phdr = Elf64_Phdr {
            p_type: linux_loader::elf::PT_NOTE,
            p_offset: note_off,
            p_filesz: note.len() as u64,
            p_memsz: note.len() as u64,
            p_align: 4,
            ..Default::default()
        };
        image[120..176].copy_from_slice(phdr.as_slice());
        image[note_off as usize..note_off as usize + note.len()].copy_from_slice(&note);
    }
    image.extend_from_slice(code);
    image
}

fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
    mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
}

/// An RSDP at `addr`, 16-byte aligned in the BIOS area a kernel scans (0xe0000-0xfffff),
/// with its checksum (the tables themselves are checked in `acpi::tests`).
fn assert_rsdp_at(mem: &GuestMemoryMmap, addr: u64) {
    assert!((0xe_0000..0x10_0000).contains(&addr) && addr.is_multiple_of(16));
    let mut rsdp = [0u8; 20];
    mem.read_slice(&mut rsdp, GuestAddress(addr)).unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
}

fn read_cstr(mem: &GuestMemoryMmap, addr: u64) -> String {
    let mut buf = vec![0u8; 256];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    let end = buf.iter().position(|b| *b == 0).unwrap();
    String::from_utf8(buf[..end].to_vec()).unwrap()
}

#[test]
fn bzimage_is_detected_loaded_and_entered_in_long_mode() {
    let (mem, ram) = guest(64);
    let image = bzimage(b"\xf4payload");
    let plan = setup(&mem, &params(&image, &ram)).unwrap();
    assert_eq!(plan.protocol, Protocol::Linux);
    assert_eq!(plan.entries.len(), 1);
    assert!(plan.status_addr.is_none());
    let mut loaded = [0u8; 8];
    mem.read_slice(&mut loaded, GuestAddress(0x10_0000))
        .unwrap();
    assert_eq!(&loaded, b"\xf4payload");

    let zp = zero_page(&mem);
    assert_eq!({ zp.acpi_rsdp_addr }, crate::acpi::RSDP_ADDR);
    assert_rsdp_at(&mem, zp.acpi_rsdp_addr);

    let e = &plan.entries[0];
    assert_eq!(e.regs.rip, 0x10_0200);
    assert_eq!(e.regs.rsi, ZERO_PAGE_ADDR);
    assert_eq!(e.regs.rflags, 2);
    let s = &e.sregs;
    assert_eq!(
        (s.segments.cs.selector, s.segments.cs.l, s.segments.cs.db),
        (0x10, 1, 0)
    );
    assert_eq!(s.segments.ds.selector, 0x18);
    assert_eq!(s.segments.ss.selector, 0x18);
    assert_eq!((s.segments.tr.type_, s.segments.tr.present), (11, 1));
    assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
    assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
    assert_eq!(s.efer, EFER_LME | EFER_LMA);
    assert_eq!(s.cr3, PAGE_TABLES_ADDR);
    // The GDT entry behind CS is the 64-bit code descriptor.
    let cs: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 0x10)).unwrap();
    assert_eq!(cs, gdt_entry(0xa09b, 0, 0xfffff));
    // Identity map: the last 2 MiB page below 4 GiB.
    let pde: u64 = mem
        .read_obj(GuestAddress(
            PAGE_TABLES_ADDR + 0x2000 + 3 * 0x1000 + 511 * 8,
        ))
        .unwrap();
    assert_eq!(pde, ((4u64 << 30) - (2 << 20)) | 0x83);

    let zp = zero_page(&mem);
    let hdr = zp.hdr;
    assert_eq!(hdr.type_of_loader, 0xff);
    assert_eq!(
        hdr.loadflags & (LOADED_HIGH | CAN_USE_HEAP),
        LOADED_HIGH | CAN_USE_HEAP
    );
    assert_eq!({ hdr.heap_end_ptr }, HEAP_END_PTR);
    assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
    assert_eq!({ hdr.code32_start }, 0x10_0000);
    assert_eq!({ hdr.ramdisk_image }, 0);
    assert_eq!(read_cstr(&mem, CMDLINE_ADDR), "console=ttyS0 panic=1");
    // The MP table is there.
    let mut mp = [0u8; 4];
    mem.read_slice(&mut mp, GuestAddress(0xf_0000)).unwrap();
    assert_eq!(&mp, b"_MP_");
}

#[test]
fn e820_map_splits_off_the_legacy_hole() {
    let (mem, ram) = guest(64);
    setup(&mem, &params(&bzimage(b"k"), &ram)).unwrap();
    let zp = zero_page(&mem);
    assert_eq!(zp.e820_entries, 3);
    let t = zp.e820_table;
    let got: Vec<(u64, u64, u32)> = t[..3]
        .iter()
        .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 0x9fc00, E820_RAM),
            (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
            (0x100000, 63 * MIB, E820_RAM),
        ]
    );
}

#[test]
fn memory_map_follows_the_vmm_layout_around_the_mmio_hole() {
    let gib = 1u64 << 30;
    let ram = [
        RamRange {
            start: 0,
            len: 3 * gib,
        },
        RamRange {
            start: 4 * gib,
            len: 2 * gib,
        },
    ];
    let map = memory_map(&ram).unwrap();
    let want = [
        (0, 0x9fc00, E820_RAM),
        (0x9fc00, 0x60400, E820_RESERVED),
        (0x100000, 3 * gib - 0x100000, E820_RAM),
        (4 * gib, 2 * gib, E820_RAM),
    ];
    let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
    assert_eq!(got, want);

    let overlapping = [
        ram[0],
        RamRange {
            start: gib,
            len: gib,
        },
    ];
    assert!(matches!(
        memory_map(&overlapping),
        Err(BootError::RamLayout(_))
    ));
    let not_at_zero = [RamRange {
        start: MIB,
        len: gib,
    }];
    assert!(matches!(
        memory_map(&not_at_zero),
        Err(BootError::RamLayout(_))
    ));
}

#[test]
fn vmlinux_elf_enters_at_its_physical_entry() {
    let (mem, ram) = guest(64);
    // Linked at the kernel's virtual address with e_entry virtual: translated.
    let image = elf(
        0xffff_ffff_8100_0010,
        0xffff_ffff_8100_0000,
        0x100_0000,
        b"\x90\xf4",
        None,
    );
    let plan = setup(&mem, &params(&image, &ram)).unwrap();
    assert_eq!(plan.protocol, Protocol::Linux);
    assert_eq!(plan.entries[0].regs.rip, 0x100_0010);
    let b: u8 = mem.read_obj(GuestAddress(0x100_0001)).unwrap();
    assert_eq!(b, 0xf4);
    let zp = zero_page(&mem);
    assert_eq!({ zp.hdr.header }, BZIMAGE_MAGIC);
    assert_eq!({ zp.hdr.boot_flag }, BOOT_FLAG_MAGIC);
    assert_eq!(zp.hdr.type_of_loader, 0xff);
    assert_eq!(zp.e820_entries, 3);

    // x86-64 vmlinux style: e_entry is already physical.
    let (mem, ram) = guest(64);
    let image = elf(0x100_0000, 0xffff_ffff_8100_0000, 0x100_0000, b"\xf4", None);
    let plan = setup(&mem, &params(&image, &ram)).unwrap();
    assert_eq!(plan.entries[0].regs.rip, 0x100_0000);
}

#[test]
fn elf_with_pvh_note_boots_through_pvh() {
    let (mem, ram) = guest(64);
    let image = elf(
        0x100_0000,
        0xffff_ffff_8100_0000,
        0x100_0000,
        b"\xf4",
        Some(0x100_0850),
    );
    let initrd = vec![0x5au8; 5000];
    let mut p = params(&image, &ram);
    p.initrd = Some(&initrd);
    let plan = setup(&mem, &p).unwrap();
    assert_eq!(plan.protocol, Protocol::Pvh);
    assert_eq!(plan.entries.len(), 1);
    let e = &plan.entries[0];
    assert_eq!(e.regs.rip, 0x100_0850);
    assert_eq!(e.regs.rbx, PVH_START_INFO_ADDR);
    let s = &e.sregs;
    let cs = s.segments.cs;
    assert_eq!(
        (cs.selector, cs.base, cs.limit, cs.db, cs.l, cs.type_),
        (0x10, 0, 0xffff_ffff, 1, 0, 0xb)
    );
    assert_eq!((s.segments.ds.db, s.segments.ds.limit), (1, 0xffff_ffff));
    assert_eq!(
        (s.segments.tr.type_, s.segments.tr.present, s.segments.tr.s),
        (11, 1, 0)
    );
    assert_eq!(s.cr0, CR0_PE | CR0_ET);
    assert_eq!((s.cr4, s.efer), (0, 0));

    let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDR)).unwrap();
    assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
    assert_eq!(info.version, 1);
    assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
    assert_eq!(
        (info.memmap_paddr, info.memmap_entries),
        (PVH_MEMMAP_ADDR, 3)
    );
    assert_eq!((info.nr_modules, info.modlist_paddr), (1, PVH_MODLIST_ADDR));
    assert_eq!(info.rsdp_paddr, crate::acpi::RSDP_ADDR);
    assert_rsdp_at(&mem, info.rsdp_paddr);
    let m: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_ADDR + 24)).unwrap();
    assert_eq!((m.addr, m.size, m.type_), (0x9fc00, 0x60400, E820_RESERVED));
    let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
    assert_eq!(module.size, 5000);
    assert_eq!(module.paddr, 64 * MIB - 0x2000);
    let b: u8 = mem.read_obj(GuestAddress(module.paddr + 4999)).unwrap();
    assert_eq!(b, 0x5a);

    // The same image booted explicitly through the Linux protocol.
    let (mem, ram) = guest(64);
    let mut p = params(&image, &ram);
    p.protocol = Some(Protocol::Linux);
    let plan = setup(&mem, &p).unwrap();
    assert_eq!(plan.protocol, Protocol::Linux);
    assert_eq!(plan.entries[0].regs.rip, 0x100_0000);
}

#[test]
fn explicit_protocol_that_does_not_fit_is_refused() {
    let (mem, ram) = guest(64);
    let bz = bzimage(b"k");
    let mut p = params(&bz, &ram);
    p.protocol = Some(Protocol::Pvh);
    assert!(matches!(setup(&mem, &p), Err(BootError::NoPvhEntry)));

    let plain = elf(0x100_0000, 0x100_0000, 0x100_0000, b"\xf4", None);
    let mut p = params(&plain, &ram);
    p.protocol = Some(Protocol::Pvh);
    assert!(matches!(setup(&mem, &p), Err(BootError::NoPvhEntry)));

    p.protocol = Some(Protocol::Ring3);
    assert!(matches!(
        setup(&mem, &p),
        Err(BootError::ProtocolMismatch { .. })
    ));
}

#[test]
fn garbage_is_an_unknown_image() {
    let (mem, ram) = guest(64);
    for image in [&b""[..], b"MZ definitely not a kernel", &vec![0u8; 4096]] {
        assert!(matches!(
            setup(&mem, &params(image, &ram)),
            Err(BootError::UnknownImage)
        ));
    }
    // An ELF for another machine is a bad ELF, not a PVH/Linux guess.
    let mut arm = elf(0x100_0000, 0x100_0000, 0x100_0000, b"\xf4", None);
    arm[18] = 183; // EM_AARCH64
    assert!(matches!(
        setup(&mem, &params(&arm, &ram)),
        Err(BootError::BadElf(_))
    ));
    // An ELF that would load over the boot structures below 1 MiB.
    let low = elf(0x10_0000, 0x8000, 0x8000, &[0xf4; 0x100], None);
    assert!(matches!(
        setup(&mem, &params(&low, &ram)),
        Err(BootError::ImageOverlap(0x8000))
    ));
}

#[test]
fn too_long_a_command_line_is_refused() {
    let (mem, ram) = guest(64);
    let image = bzimage(b"k");
    let long = "x".repeat(2048);
    let mut p = params(&image, &ram);
    p.cmdline = &long;
    match setup(&mem, &p) {
        Err(BootError::Cmdline(msg)) => assert!(msg.to_string().contains("at most 2047"), "{msg}"),
        other => panic!("expected a command line error, got {other:?}"),
    }
    let exact = "x".repeat(2047);
    p.cmdline = &exact;
    setup(&mem, &p).unwrap();
    assert_eq!(read_cstr(&mem, CMDLINE_ADDR + 2047 - 10).len(), 10);
}

#[test]
fn initrd_goes_high_and_must_fit() {
    let (mem, ram) = guest(64);
    let image = bzimage(b"k");
    let initrd = vec![1u8; (3 * MIB) as usize + 123];
    let mut p = params(&image, &ram);
    p.initrd = Some(&initrd);
    setup(&mem, &p).unwrap();
    let zp = zero_page(&mem);
    let (addr, size) = ({ zp.hdr.ramdisk_image }, { zp.hdr.ramdisk_size });
    assert_eq!(size as usize, initrd.len());
    assert_eq!(addr % 4096, 0);
    assert!(u64::from(addr) + u64::from(size) <= 64 * MIB);
    assert!(u64::from(addr) + u64::from(size) > 64 * MIB - 4096);

    // The kernel decompresses to [16 MiB, 17 MiB): a 48 MiB initrd does not fit.
    let huge = vec![0u8; (48 * MIB) as usize];
    p.initrd = Some(&huge);
    match setup(&mem, &p) {
        Err(BootError::Initrd(msg)) => assert!(msg.to_string().contains("does not fit"), "{msg}"),
        other => panic!("expected an initrd error, got {other:?}"),
    }
}

#[test]
fn vcpu_count_is_checked_and_only_the_bsp_gets_an_entry() {
    let (mem, ram) = guest(64);
    let image = bzimage(b"k");
    let mut p = params(&image, &ram);
    p.vcpus = 4;
    let plan = setup(&mem, &p).unwrap();
    assert_eq!(plan.entries.len(), 1);
    for vcpus in [0, MAX_VCPUS + 1] {
        p.vcpus = vcpus;
        assert!(matches!(
            setup(&mem, &p),
            Err(BootError::TooManyVcpus { .. })
        ));
    }
}

#[test]
fn kernel_larger_than_ram_is_refused() {
    let (mem, ram) = guest(16);
    // Decompresses to 16 MiB + 1 MiB: beyond 16 MiB of RAM.
    assert!(matches!(
        setup(&mem, &params(&bzimage(b"k"), &ram)),
        Err(BootError::RamTooSmall { .. })
    ));
}
