//! The fuzz targets: every input an attacker controls, as a function of bytes. AFL++ runs
//! them through `fuzz/afl` (coverage-guided, `scripts/fuzz`); `tests/regression.rs` replays
//! the kept corpus and every crash found (`fuzz/corpus/<target>`, `fuzz/crashes/<target>`)
//! and mutates the corpus for a few seconds, so CI keeps them all passing.
//!
//! A target fails only by panicking, hanging or exhausting memory: a refused input is the
//! expected answer to garbage.

use std::io::{self, Read, Write};

use warmvm_vmm::handover::fuzzing;

mod virtio;
pub use virtio::{op as virtio_op, seeds as virtio_seeds, virtio_queues};

/// A fuzz target: takes any bytes, may refuse them, must not panic or hang.
pub type Target = fn(&[u8]);

/// The targets, by name (the directories under fuzz/corpus and the AFL binaries).
pub const TARGETS: &[(&str, Target)] = &[
    ("handover_message", handover_message),
    ("handover_envelope", handover_envelope),
    ("handover_payload", handover_payload),
    ("http_request", http_request),
    ("config", config),
    ("kernel_image", kernel_image),
    ("device_registers", device_registers),
    ("virtio_queues", virtio_queues),
    ("snapshot", snapshot),
    ("migration_stream", migration_stream),
];

/// A control-channel message from the old VMM.
pub fn handover_message(data: &[u8]) {
    fuzzing::decode_message(data);
}

/// A state envelope (magic, version, length, CRC, payload).
pub fn handover_envelope(data: &[u8]) {
    fuzzing::open_envelope(data);
}

/// A state payload past the checksum: what `envelope::decode_payload` reads.
pub fn handover_payload(data: &[u8]) {
    fuzzing::decode_state_payload(data);
}

/// A snapshot's `vm.state`: through the envelope (magic, version, length, CRC-32), and the
/// same bytes as the state behind the checksum, with the checks a restore makes.
pub fn snapshot(data: &[u8]) {
    warmvm_vmm::snapshot::fuzzing::open_state(data);
    warmvm_vmm::snapshot::fuzzing::decode_state_payload(data);
}

/// A live migration's stream as a destination reads it from its peer: the magic, frames,
/// each message strictly decoded, a state's envelope and record, a Hello's spec checked.
pub fn migration_stream(data: &[u8]) {
    warmvm_vmm::migration::fuzzing::decode(data);
}

/// Bytes read in pieces, as a socket delivers them; writes (100 Continue) go nowhere.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.data.len().min(buf.len()).min(self.piece);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

impl Write for Pieces<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An HTTP request on the API socket: parsing, routing, and the JSON bodies the routes take.
/// The first byte sets the size of the pieces the request arrives in.
pub fn http_request(data: &[u8]) {
    let Some((&piece, rest)) = data.split_first() else {
        return;
    };
    let mut stream = Pieces {
        data: rest,
        piece: usize::from(piece % 64) + 1,
    };
    let Ok(req) = warmvm_api::http::read_request(&mut stream) else {
        return;
    };
    let _ = warmvm_api::routes::route(warmvm_api::routes::ROUTES, &req.method, &req.path);
    if let Ok(vm) = serde_json::from_slice::<warmvm_vmm::VmConfig>(&req.body) {
        let _ = vm.validate_shape(LIMITS);
    }
    let _ = serde_json::from_slice::<warmvm_api::StopRequest>(&req.body);
    let _ = warmvm_api::ApiState::parse_reboot(&req.body);
}

const LIMITS: warmvm_vmm::HostLimits = warmvm_vmm::HostLimits {
    memory_mib: 16 << 10,
    max_vcpus: 8,
};

/// A config: the TOML file of `warmvm run` / `daemon --config`, and a VM in JSON (the API's
/// and `vm create`'s form). Validation runs without touching files for paths it names
/// only as far as `validate_shape` goes.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = toml::from_str::<warmvm_vmm::Config>(text) {
        for vm in &c.vms {
            let _ = vm.validate_shape(LIMITS);
        }
    }
    if let Ok(vm) = serde_json::from_str::<warmvm_vmm::VmConfig>(text) {
        let _ = vm.validate_shape(LIMITS);
    }
}

/// A kernel image (bzImage or ELF, headers and all) loaded into a small guest RAM.
pub fn kernel_image(data: &[u8]) {
    use vm_memory::GuestAddress;
    use warmvm_devices::GuestMemoryMmap;
    const RAM: u64 = 32 << 20;
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]) else {
        return;
    };
    let ram = [warmvm_boot::RamRange { start: 0, len: RAM }];
    let _ = warmvm_boot::linux::setup(
        &mem,
        &warmvm_boot::linux::LinuxParams {
            image: data,
            initrd: None,
            cmdline: "console=ttyS0",
            ram: &ram,
            vcpus: 1,
            protocol: None,
            i8042: false,
        },
    );
}

/// What a guest does to its devices: a sequence of port and MMIO reads and writes, 4 bytes
/// each (kind, address, value), on the devices of one VM.
pub fn device_registers(data: &[u8]) {
    use warmvm_devices::{ConsoleSink, Devices, IrqLine, SerialConsole, Wake};
    let devices = Devices::new(
        "fuzz",
        SerialConsole::new(ConsoleSink::new(None, false), IrqLine::none()),
        warmvm_devices::PlatformIrqs::none(),
    );
    for op in data.chunks_exact(4) {
        let (kind, lo, value) = (op[0], op[1], op[3]);
        // Mostly the ports devices decode (COM1, the wait and power ports, the ACPI PM1
        // blocks), sometimes any.
        let port = match kind >> 6 {
            0 | 1 => 0x3f8 + u16::from(lo % 16),
            2 if lo & 0x80 != 0 => 0x600 + u16::from(lo % 8),
            2 => 0x510 + u16::from(lo % 8),
            _ => u16::from_le_bytes([lo, op[2]]),
        };
        let len = [1usize, 2, 4, 8][usize::from((kind >> 4) & 3)];
        let mut buf = [value; 8];
        match kind & 3 {
            0 => devices.pio_read(port, &mut buf[..len.min(4)], Wake::Timeout),
            1 => {
                let _ = devices.pio_write(port, &buf[..len.min(4)]);
            }
            2 => devices.mmio_read(u64::from(port) << 12, &mut buf[..len]),
            _ => {
                let _ = devices.mmio_write(u64::from(port) << 12, &buf[..len]);
            }
        }
    }
    devices.flush();
}
