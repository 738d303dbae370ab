//! What vCPU 0 serves beside its share of the integrity workload: the disk check and the
//! HTTP server. The workload calls `poll` every few pages and `idle` instead of waiting, so
//! a single vCPU both verifies RAM and answers clients.

use crate::boot::Machine;
use crate::cache::Cache;
use crate::cmdline::Options;
use crate::disk::Disk;
use crate::http::Server;
use crate::net::NetDev;
use crate::{blk, http, io, net, tar, time};

/// Offsets in the I/O area.
const DISK_AT: u64 = 0;
const NET_AT: u64 = 0x18000;
const SERVER_AT: u64 = 0x60000;
const _: () = assert!(DISK_AT + blk::AREA_BYTES + tar::INDEX_BYTES <= NET_AT);
const _: () = assert!(NET_AT + net::AREA_BYTES <= SERVER_AT);
const _: () = assert!(SERVER_AT + http::AREA_BYTES <= crate::boot::IO_AREA_SIZE);

pub struct Services {
    disk: Option<Disk>,
    server: Option<&'static mut Server>,
}

impl Services {
    pub fn none() -> Self {
        Self {
            disk: None,
            server: None,
        }
    }

    /// vCPU 0: set up the disk, and the server if the command line gives an address.
    /// `cache` is the RAM carved for the page cache (address, bytes).
    pub fn start(m: &Machine, opts: &Options, cache: (u64, u64)) -> Self {
        let disk = Disk::open(m, opts.hostile);
        if let Some(how) = opts.hostile_net {
            misbehave_on_net(m, how);
        }
        let server = match (opts.ip, &disk) {
            (Some((ip, prefix)), Some(_)) => {
                let dev = crate::virtio::find(m, net::TYPE_NET)
                    .ok_or("no network device")
                    .and_then(|w| NetDev::new(w, m.io_area + NET_AT));
                match dev {
                    Ok(dev) => {
                        let cache = Cache::new(cache.0, cache.1);
                        say!(
                            "warmvm-guest: http: serving the disk's files on {}.{}.{}.{}:{} (MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}), page cache {} pages",
                            ip[0], ip[1], ip[2], ip[3], http::PORT,
                            dev.mac[0], dev.mac[1], dev.mac[2], dev.mac[3], dev.mac[4], dev.mac[5],
                            cache.capacity()
                        );
                        Some(Server::create(
                            m.io_area + SERVER_AT,
                            dev,
                            cache,
                            ip,
                            prefix,
                        ))
                    }
                    Err(e) => {
                        say!("warmvm-guest: http: not serving: {}", e);
                        None
                    }
                }
            }
            (Some(_), None) => {
                say!("warmvm-guest: http: not serving: no disk with a tar archive");
                None
            }
            _ => None,
        };
        Self { disk, server }
    }

    /// Serve what is there now; true if anything happened.
    pub fn poll(&mut self) -> bool {
        match (&mut self.server, &mut self.disk) {
            (Some(s), Some(d)) => s.poll(d),
            _ => false,
        }
    }

    /// Wait up to `us` µs, serving clients meanwhile.
    pub fn idle(&mut self, us: u64) {
        if self.server.is_none() || time::tsc_khz() == 0 {
            io::wait(us as u32);
            return;
        }
        let deadline = time::now_ns() + us * 1000;
        loop {
            while self.poll() {}
            let now = time::now_ns();
            if now >= deadline {
                return;
            }
            let mut wait = (deadline - now) / 1000;
            if let Some(d) = self.server.as_mut().and_then(|s| s.delay_us()) {
                wait = wait.min(d.max(1));
            }
            io::wait(wait.max(1) as u32);
        }
    }

    /// Periodic work between workload passes: the disk check.
    pub fn periodic(&mut self, opts: &Options) {
        if let Some(d) = self.disk.as_mut() {
            d.maybe_check(opts.disk_check_ms, opts.quiet);
        }
    }
}

/// `hostile_net=`: break the protocol on the network device once and report whether the
/// VMM marked it DEVICE_NEEDS_RESET; the server then resets the device and uses it as usual,
/// which shows that the device and its TAP survive a broken driver.
fn misbehave_on_net(m: &Machine, how: crate::cmdline::Hostile) {
    let dev = crate::virtio::find(m, net::TYPE_NET)
        .ok_or("no network device")
        .and_then(|w| NetDev::new(w, m.io_area + NET_AT));
    match dev {
        Ok(mut dev) => {
            let failed = dev.misbehave(how);
            say!(
                "warmvm-guest: hostile_net {:?}: the net device {} a reset",
                how,
                if failed { "needs" } else { "does NOT need" }
            );
        }
        Err(e) => say!("warmvm-guest: hostile_net: no device to break: {}", e),
    }
}
