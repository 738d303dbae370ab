//! The files of a ustar archive on a virtio-blk disk: an index of names, places and sizes,
//! read straight from the disk, and FNV-1a checksums of their contents.

use crate::blk::{Blk, BlkError, MAX_READ, SECTOR};

pub const MAX_FILES: usize = 64;
pub const NAME_MAX: usize = 100;

#[derive(Clone, Copy)]
pub struct Entry {
    pub name: [u8; NAME_MAX],
    pub name_len: usize,
    /// First sector of the file's data.
    pub sector: u64,
    pub size: u64,
    /// FNV-1a 64 of the contents, as first read.
    pub fnv: u64,
}

pub struct Index {
    pub count: usize,
    pub entries: [Entry; MAX_FILES],
    /// Bytes of file data in the archive.
    pub bytes: u64,
}

/// Bytes of RAM an [`Index`] takes.
pub const INDEX_BYTES: u64 = core::mem::size_of::<Index>() as u64;

// The fields are read through Debug, in the console line that reports the error.
#[allow(dead_code)]
#[derive(Clone, Copy, Debug)]
pub enum TarError {
    Disk(BlkError),
    /// A header that is not ustar, or a size that is not octal.
    BadHeader(u64),
    TooManyFiles,
}

impl From<BlkError> for TarError {
    fn from(e: BlkError) -> Self {
        TarError::Disk(e)
    }
}

impl Entry {
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }
}

fn octal(field: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut digits = 0;
    for &b in field {
        match b {
            b'0'..=b'7' => {
                v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
                digits += 1;
            }
            b' ' | 0 if digits > 0 => break,
            b' ' | 0 => {}
            _ => return None,
        }
    }
    Some(v)
}

pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The checksum of one file, read from the disk.
pub fn checksum(blk: &mut Blk, e: &Entry) -> Result<u64, TarError> {
    let mut h = FNV_OFFSET;
    let mut left = e.size;
    let mut sector = e.sector;
    while left > 0 {
        let want = left.min(MAX_READ as u64);
        let len = want.next_multiple_of(SECTOR) as usize;
        let data = blk.read(sector, len)?;
        h = fnv1a(h, &data[..want as usize]);
        left -= want;
        sector += len as u64 / SECTOR;
    }
    Ok(h)
}

/// Read the archive's headers into `index` and checksum every regular file.
pub fn scan(blk: &mut Blk, index: &mut Index) -> Result<(), TarError> {
    index.count = 0;
    index.bytes = 0;
    let mut sector = 0u64;
    while sector < blk.sectors {
        let h = blk.read(sector, SECTOR as usize)?;
        if h.iter().all(|&b| b == 0) {
            break; // end of archive
        }
        if &h[257..262] != b"ustar" {
            return Err(TarError::BadHeader(sector));
        }
        let size = octal(&h[124..136]).ok_or(TarError::BadHeader(sector))?;
        let kind = h[156];
        let name_len = h[..NAME_MAX]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(NAME_MAX);
        let mut name = [0u8; NAME_MAX];
        name[..name_len].copy_from_slice(&h[..name_len]);
        let data_sector = sector + 1;
        if kind == b'0' || kind == 0 {
            if index.count == MAX_FILES {
                return Err(TarError::TooManyFiles);
            }
            index.entries[index.count] = Entry {
                name,
                name_len,
                sector: data_sector,
                size,
                fnv: 0,
            };
            index.count += 1;
            index.bytes += size;
        }
        sector = data_sector + size.div_ceil(SECTOR);
    }
    for i in 0..index.count {
        let e = index.entries[i];
        index.entries[i].fnv = checksum(blk, &e)?;
    }
    Ok(())
}
