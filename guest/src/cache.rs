//! The guest's page cache: 4 KiB pages of the disk in a direct-mapped array of configurable
//! size (`cache_mib=`), filled 16 pages at a time from the disk. It lives in guest RAM, so
//! a warm reboot keeps it warm; a cold-started guest begins with it empty.

use crate::blk::{Blk, BlkError, MAX_READ, SECTOR};

pub const PAGE: u64 = 4096;
const FILL_PAGES: u64 = MAX_READ as u64 / PAGE;

pub struct Cache {
    pages: u64,
    /// `pages` pages of data, then `pages` tags (disk page + 1; 0 = empty).
    base: u64,
    pub hits: u64,
    pub misses: u64,
    pub filled: u64,
}

impl Cache {
    /// An empty cache over `bytes` of RAM at `base`.
    pub fn new(base: u64, bytes: u64) -> Self {
        let pages = bytes / (PAGE + 8);
        let c = Self {
            pages,
            base,
            hits: 0,
            misses: 0,
            filled: 0,
        };
        for i in 0..pages {
            c.set_tag(i, 0);
        }
        c
    }

    pub fn capacity(&self) -> u64 {
        self.pages
    }

    fn tag_addr(&self, slot: u64) -> *mut u64 {
        (self.base + self.pages * PAGE + slot * 8) as *mut u64
    }

    fn tag(&self, slot: u64) -> u64 {
        // SAFETY: slot < pages: the tag array lies inside the cache's RAM.
        unsafe { self.tag_addr(slot).read() }
    }

    fn set_tag(&self, slot: u64, v: u64) {
        // SAFETY: as in `tag`.
        unsafe { self.tag_addr(slot).write(v) }
    }

    fn page(&self, slot: u64) -> &'static mut [u8] {
        // SAFETY: slot < pages: a page of the cache's RAM, used only through this cache
        // (one vCPU serves), and the returned slice is not kept across a fill.
        unsafe {
            core::slice::from_raw_parts_mut((self.base + slot * PAGE) as *mut u8, PAGE as usize)
        }
    }

    /// Disk page `n` (4 KiB), from the cache or the disk.
    pub fn get(&mut self, blk: &mut Blk, n: u64) -> Result<&[u8], BlkError> {
        if self.pages == 0 {
            return Err(BlkError::Range);
        }
        let slot = n % self.pages;
        if self.tag(slot) == n + 1 {
            self.hits += 1;
            return Ok(self.page(slot));
        }
        self.misses += 1;
        let per_page = PAGE / SECTOR;
        let first = n.checked_mul(per_page).ok_or(BlkError::Range)?;
        let left = blk
            .sectors
            .checked_sub(first)
            .filter(|&l| l > 0)
            .ok_or(BlkError::Range)?;
        let sectors = (FILL_PAGES.min(self.pages) * per_page).min(left);
        let data = blk.read(first, (sectors * SECTOR) as usize)?;
        for i in 0..sectors.div_ceil(per_page) {
            let s = (n + i) % self.pages;
            let from = (i * PAGE) as usize;
            let to = data.len().min(from + PAGE as usize);
            let page = self.page(s);
            page[..to - from].copy_from_slice(&data[from..to]);
            page[to - from..].fill(0); // past the end of the disk
            self.set_tag(s, n + i + 1);
            self.filled += 1;
        }
        Ok(self.page(slot))
    }
}
