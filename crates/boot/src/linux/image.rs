//! Which boot protocol an image speaks, and loading it: ELF (vmlinux, or any ELF with a
//! PVH note) and bzImage, checked before linux-loader writes anything.

use std::io::Cursor;

use crate::GuestMemoryMmap;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{ByteValued, GuestAddress};

use super::{BOOT_FLAG_MAGIC, BZIMAGE_MAGIC, HIMEM_START, PAGE};
use crate::{BootError, ElfError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ImageKind {
    Elf,
    BzImage,
}

pub(super) fn detect(image: &[u8]) -> Result<ImageKind> {
    if image.starts_with(b"\x7fELF") {
        return Ok(ImageKind::Elf);
    }
    let magic = image
        .get(0x202..0x206)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let boot_flag = image
        .get(0x1fe..0x200)
        .map(|b| u16::from_le_bytes([b[0], b[1]]));
    if magic == Some(BZIMAGE_MAGIC) && boot_flag == Some(BOOT_FLAG_MAGIC) {
        return Ok(ImageKind::BzImage);
    }
    Err(BootError::UnknownImage)
}

pub(super) fn load_kernel(
    mem: &GuestMemoryMmap,
    image: &[u8],
    kind: ImageKind,
) -> Result<KernelLoaderResult> {
    let mut reader = Cursor::new(image);
    let highmem = Some(GuestAddress(HIMEM_START));
    match kind {
        ImageKind::Elf => {
            check_elf_header(image)?;
            Elf::load(mem, None, &mut reader, highmem)
        }
        ImageKind::BzImage => BzImage::load(mem, None, &mut reader, highmem),
    }
    .map_err(|e| BootError::Load(e.into()))
}

pub(super) fn elf_header(image: &[u8]) -> Result<linux_loader::elf::Elf64_Ehdr> {
    let mut ehdr = linux_loader::elf::Elf64_Ehdr::default();
    let bytes = image
        .get(..std::mem::size_of_val(&ehdr))
        .ok_or(BootError::BadElf(ElfError::TruncatedHeader))?;
    ehdr.as_mut_slice().copy_from_slice(bytes);
    Ok(ehdr)
}

/// Checks what linux-loader does not: a 64-bit x86 ELF whose segments all load at or above
/// 1 MiB, where they cannot collide with the boot structures written below it.
pub(super) fn check_elf_header(image: &[u8]) -> Result<()> {
    let ehdr = elf_header(image)?;
    if ehdr.e_ident[linux_loader::elf::EI_CLASS] != linux_loader::elf::ELFCLASS64 {
        return Err(BootError::BadElf(ElfError::Not64Bit));
    }
    if ehdr.e_machine != linux_loader::elf::EM_X86_64 {
        return Err(BootError::BadElf(ElfError::Machine(ehdr.e_machine)));
    }
    if let Some(low) = elf_loads(image)?
        .iter()
        .find(|ph| ph.p_filesz > 0 && ph.p_paddr < HIMEM_START)
    {
        return Err(BootError::ImageOverlap(low.p_paddr));
    }
    Ok(())
}

/// The PT_LOAD program headers of an ELF image.
pub(super) fn elf_loads(image: &[u8]) -> Result<Vec<linux_loader::elf::Elf64_Phdr>> {
    let ehdr = elf_header(image)?;
    let phdr_size = std::mem::size_of::<linux_loader::elf::Elf64_Phdr>() as u64;
    let mut loads = Vec::new();
    for i in 0..u64::from(ehdr.e_phnum) {
        let off = ehdr
            .e_phoff
            .checked_add(i * phdr_size)
            .ok_or(BootError::BadElf(ElfError::ProgramHeaderOffset))?;
        let bytes = usize::try_from(off)
            .ok()
            .and_then(|o| image.get(o..o.checked_add(phdr_size as usize)?))
            .ok_or(BootError::BadElf(ElfError::TruncatedProgramHeaders))?;
        let mut ph = linux_loader::elf::Elf64_Phdr::default();
        ph.as_mut_slice().copy_from_slice(bytes);
        if ph.p_type == linux_loader::elf::PT_LOAD && ph.p_memsz > 0 {
            loads.push(ph);
        }
    }
    Ok(loads)
}

/// The physical address of the ELF's entry point: `e_entry` if a loadable segment holds it
/// physically (x86-64 vmlinux does this), else `e_entry` translated through the segment
/// whose virtual range contains it.
pub(super) fn elf_physical_entry(image: &[u8]) -> Result<u64> {
    let entry = elf_header(image)?.e_entry;
    let loads = elf_loads(image)?;
    let within = |start: u64, len: u64| entry >= start && entry - start < len;
    if loads.iter().any(|ph| within(ph.p_paddr, ph.p_memsz)) {
        return Ok(entry);
    }
    loads
        .iter()
        .find(|ph| within(ph.p_vaddr, ph.p_memsz))
        .map(|ph| entry - ph.p_vaddr + ph.p_paddr)
        .ok_or(BootError::BadElf(ElfError::EntryOutsideSegments(entry)))
}

/// End of the memory a bzImage needs while it decompresses itself (Linux's
/// arch/x86/boot/compressed/head_64.S: the output goes to the load address aligned up to
/// `kernel_alignment`, or `pref_address` if that is higher, and takes `init_size` bytes).
pub(super) fn bzimage_footprint_end(h: &setup_header, load: u64) -> u64 {
    if h.version < 0x20a || h.init_size == 0 {
        return 0;
    }
    let pref = h.pref_address;
    let align = u64::from(h.kernel_alignment).max(PAGE);
    let out = if h.relocatable_kernel != 0 {
        load.next_multiple_of(align).max(pref)
    } else {
        pref
    };
    out.saturating_add(u64::from(h.init_size))
}
