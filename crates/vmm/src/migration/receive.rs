//! The destination of a live migration: check, build, take pages, restore, and run only
//! on `Commit`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use warmvm_devices::Pausable;
use warmvm_hypervisor::Hypervisor;
use warmvm_memory::GuestRam;

use super::send::cpuid_digest;
use super::stream::{self, Hello, Msg, Outcome, MIN_STREAM_VERSION, STREAM_VERSION};
use super::{faults, pages};
use super::{MigrationError, STATE_KIND};
use crate::state::{envelope, StateError, VmRecord, VmSpec};
use crate::vm::{open_log, Lifecycle, VCPU_RESPONSE_TIMEOUT};
use crate::Vm;

/// Where and under which constraints a VM is received.
pub struct ReceiveOptions<'a> {
    /// The VM's console log goes to `STATE_DIR/NAME/console.log`.
    pub state_dir: PathBuf,
    /// Whether a VM of that name exists here already (it is refused before the source
    /// pauses anything).
    pub name_taken: &'a dyn Fn(&str) -> bool,
    /// What this side knows of a migration a source asks about (VM name, migration id).
    pub answer: &'a dyn Fn(&str, &str) -> Outcome,
}

/// What the destination measured.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReceiveReport {
    pub vm: String,
    pub sender: String,
    /// The migration's id, as the source's Hello gave it.
    pub migration_id: String,
    /// Building the VM (KVM VM, vCPUs, devices) before the pages came.
    pub build_us: u64,
    pub pages: u64,
    pub rounds: u32,
    /// Loading the state, from `State` read to `Ready` sent.
    pub restore_us: u64,
    /// `Commit` read to every vCPU running.
    pub resume_us: u64,
}

/// A VM that arrived and runs here.
pub struct Received {
    pub vm: Vm,
    pub report: ReceiveReport,
}

/// What a connection to the listener was for.
pub enum Served {
    /// A VM arrived and runs here.
    Received(Box<Received>),
    /// A source asked about a migration it holds in doubt, and was answered.
    Answered {
        vm: String,
        migration_id: String,
        outcome: Outcome,
    },
}

/// Serve one connection: a migration (first message `Hello`, see [`receive`]) or a
/// question about one (`Ask`, answered with `opts.answer`).
pub fn serve<S: Read + Write>(
    hv: &Hypervisor,
    mut stream: S,
    opts: &ReceiveOptions,
) -> Result<Served, MigrationError> {
    stream::read_magic(&mut stream)?;
    match stream::recv(&mut stream)? {
        Msg::Hello(hello) => {
            receive_from(hv, stream, *hello, opts).map(|r| Served::Received(Box::new(r)))
        }
        Msg::Ask { vm, migration_id } => {
            let outcome = (opts.answer)(&vm, &migration_id);
            stream::send(
                &mut stream,
                &Msg::Answer {
                    vm: vm.clone(),
                    migration_id: migration_id.clone(),
                    outcome,
                },
            )?;
            Ok(Served::Answered {
                vm,
                migration_id,
                outcome,
            })
        }
        other => Err(MigrationError::Unexpected {
            wanted: "Hello or Ask",
            got: other.name(),
        }),
    }
}

/// Receive one VM from `stream` (whose timeouts bound every wait for the source). It runs
/// only once `Commit` has been read; any failure before that discards it, and the source
/// runs it on. The peer is told why it was refused or where this side failed.
pub fn receive<S: Read + Write>(
    hv: &Hypervisor,
    mut stream: S,
    opts: &ReceiveOptions,
) -> Result<Received, MigrationError> {
    stream::read_magic(&mut stream)?;
    let hello = match stream::recv(&mut stream)? {
        Msg::Hello(h) => h,
        other => {
            return Err(MigrationError::Unexpected {
                wanted: "Hello",
                got: other.name(),
            })
        }
    };
    receive_from(hv, stream, *hello, opts)
}

/// [`receive`] after the Hello.
fn receive_from<S: Read + Write>(
    hv: &Hypervisor,
    mut stream: S,
    hello: Hello,
    opts: &ReceiveOptions,
) -> Result<Received, MigrationError> {
    let t_build = Instant::now();
    let vm = match check(hv, &hello, opts).and_then(|spec| build(hv, spec)) {
        Ok(vm) => vm,
        Err(e) => {
            tracing::warn!(vm = %hello.spec.config.name, sender = %hello.sender, error = %e,
                "migration refused");
            let _ = stream::send(
                &mut stream,
                &Msg::Refused {
                    reason: e.to_string(),
                },
            );
            return Err(e);
        }
    };
    let mut report = ReceiveReport {
        vm: vm.name().to_string(),
        sender: hello.sender.clone(),
        migration_id: hello.migration_id.clone(),
        build_us: t_build.elapsed().as_micros() as u64,
        ..Default::default()
    };
    stream::send(
        &mut stream,
        &Msg::Accepted {
            receiver: crate::build(),
        },
    )?;
    match take(&vm, &mut stream, &mut report) {
        Ok(()) => Ok(Received { vm, report }),
        Err((step, e)) => {
            tracing::warn!(vm = %report.vm, step, error = %e, "migration in failed; VM discarded");
            // Tell the source, unless the failure is the source's own word or its stream.
            if !matches!(e, MigrationError::Aborted(_) | MigrationError::Stream(_)) {
                let _ = stream::send(
                    &mut stream,
                    &Msg::Failed {
                        step: step.to_string(),
                        reason: e.to_string(),
                    },
                );
            }
            Err(e)
        }
    }
}

/// The pages, the state, the commit.
fn take<S: Read + Write>(
    vm: &Vm,
    stream: &mut S,
    report: &mut ReceiveReport,
) -> Result<(), (&'static str, MigrationError)> {
    let ram = &vm.shared.ram;
    // Until the first round is complete, the RAM has never been written: zero runs
    // need no write.
    let mut fresh = true;
    let record = loop {
        match stream::recv(stream).map_err(|e| ("pages", e.into()))? {
            Msg::Pages(p) => {
                for run in &p.runs {
                    pages::apply(ram, run, fresh).map_err(|err| {
                        (
                            "pages",
                            MigrationError::BadRun {
                                round: p.round,
                                err,
                            },
                        )
                    })?;
                    report.pages += run.len / stream::PAGE;
                }
            }
            Msg::RoundEnd { round } => {
                fresh = false;
                report.rounds = round + 1;
                stream::send(stream, &Msg::RoundAck { round }).map_err(|e| ("pages", e.into()))?;
                if round == 0 {
                    faults::hit(faults::Point::DestPrecopy);
                }
            }
            Msg::State { envelope } => {
                break decode_state(&envelope, vm.name()).map_err(|e| ("state", e))?
            }
            Msg::Abort { reason } => return Err(("pages", MigrationError::Aborted(reason))),
            other => {
                return Err((
                    "pages",
                    MigrationError::Unexpected {
                        wanted: "Pages or State",
                        got: other.name(),
                    },
                ))
            }
        }
    };
    faults::hit(faults::Point::DestState);
    let t_restore = Instant::now();
    let Some(mut runtime) = record.runtime else {
        return Err((
            "state",
            MigrationError::state(StateError::NotLive {
                lifecycle: record.lifecycle,
                has_runtime: false,
            }),
        ));
    };
    // Another host's clock: guest time is not advanced by a difference of two clocks.
    let now = crate::monotonic_ns();
    runtime.first_stop_ns = now;
    vm.load(runtime, now, false)
        .and_then(|loading| loading.finish())
        .map_err(|e| ("restore", MigrationError::state(e)))?;
    report.restore_us = t_restore.elapsed().as_micros() as u64;
    // Restored; no guest instruction has run.
    stream::send(stream, &Msg::Ready).map_err(|e| ("restore", e.into()))?;
    faults::hit(faults::Point::DestReadySent);
    match stream::recv(stream).map_err(|e| ("commit", e.into()))? {
        Msg::Commit => {}
        Msg::Abort { reason } => return Err(("commit", MigrationError::Aborted(reason))),
        other => {
            return Err((
                "commit",
                MigrationError::Unexpected {
                    wanted: "Commit",
                    got: other.name(),
                },
            ))
        }
    }
    // The VM is this side's from here, whatever happens to the stream.
    faults::hit(faults::Point::DestCommitted);
    let t_resume = Instant::now();
    *vm.shared.lifecycle() = Lifecycle::Running;
    let _ = Pausable::resume(&vm.shared.devices); // an order: never fails
    for h in vm.handles() {
        h.request_run();
    }
    for h in vm.handles() {
        h.wait_running(VCPU_RESPONSE_TIMEOUT);
    }
    report.resume_us = t_resume.elapsed().as_micros() as u64;
    if let Err(e) = stream::send(
        stream,
        &Msg::Running {
            resume_us: report.resume_us,
        },
    ) {
        tracing::warn!(vm = %vm.name(), error = %e,
            "the VM runs here, but the source was not told: it holds its copy in doubt");
    }
    Ok(())
}

/// The state's envelope, checked (magic, a format this build reads, length, CRC-32) and
/// decoded strictly; it must be of the VM announced and live.
pub(crate) fn decode_state(bytes: &[u8], name: &str) -> Result<VmRecord, MigrationError> {
    let (_, payload) = envelope::open_as(&STATE_KIND, bytes).map_err(MigrationError::state)?;
    let record: VmRecord = envelope::decode_payload(payload).map_err(MigrationError::state)?;
    if record.spec.config.name != name {
        return Err(MigrationError::state(StateError::OtherVm {
            state: record.spec.config.name,
            prepared: name.to_string(),
        }));
    }
    if !record.lifecycle.is_live() || record.runtime.is_none() {
        return Err(MigrationError::state(StateError::NotLive {
            lifecycle: record.lifecycle,
            has_runtime: record.runtime.is_some(),
        }));
    }
    Ok(record)
}

/// Everything checked before the source pauses: the formats, the spec, the name, memory
/// and CPUID. Returns the spec as this host builds it (its own console log, a new uptime).
fn check(hv: &Hypervisor, hello: &Hello, opts: &ReceiveOptions) -> Result<VmSpec, MigrationError> {
    if !(MIN_STREAM_VERSION..=STREAM_VERSION).contains(&hello.stream_version) {
        return Err(MigrationError::StreamVersion {
            version: hello.stream_version,
            min: MIN_STREAM_VERSION,
            max: STREAM_VERSION,
        });
    }
    if !(STATE_KIND.min_version..=STATE_KIND.max_version).contains(&hello.state_format) {
        return Err(MigrationError::StateFormat {
            version: hello.state_format,
            min: STATE_KIND.min_version,
            max: STATE_KIND.max_version,
        });
    }
    let mut spec = hello.spec.clone();
    let name = spec.config.name.clone();
    spec.config.console_log = None;
    spec.console_log = opts.state_dir.join(&name).join("console.log");
    spec.created_monotonic_ns = crate::monotonic_ns();
    spec.check().map_err(MigrationError::state)?;
    if (opts.name_taken)(&name) {
        return Err(MigrationError::NameTaken(name));
    }
    let need = spec.config.memory_mib << 20;
    let free = warmvm_memory::available_memory_bytes();
    if free < need {
        return Err(MigrationError::NoMemory {
            need_mib: need >> 20,
            free_mib: free >> 20,
        });
    }
    if cpuid_digest(&spec.cpuids) != hello.cpuid_digest {
        return Err(MigrationError::CpuidDigest);
    }
    for (id, cpuid) in spec.cpuids.iter().enumerate() {
        if let Some(missing) = cpuid_missing(cpuid, hv.supported_cpuid()) {
            return Err(MigrationError::Cpuid(format!("vCPU {id}: {missing}")));
        }
    }
    Ok(spec)
}

/// The feature leaves whose bits a guest may rely on: (leaf, subleaf, registers).
const FEATURE_LEAVES: [(u32, u32, &[usize]); 3] = [
    // ecx, edx (ebx holds APIC ids, not features)
    (1, 0, &[2, 3]),
    (7, 0, &[1, 2, 3]),
    (0x8000_0001, 0, &[2, 3]),
];
/// Leaf 1 ECX bits the VMM sets or the CPU reflects, not KVM's offer: the hypervisor bit,
/// OSXSAVE (mirrors CR4).
const LEAF1_ECX_OWN: u32 = (1 << 31) | (1 << 27);

/// A feature the guest's CPUID has and this host's KVM does not offer, named; `None` if
/// every feature bit is offered.
pub fn cpuid_missing(guest: &[kvm_cpuid_entry2], supported: &CpuId) -> Option<String> {
    let regs = |e: &kvm_cpuid_entry2| [e.eax, e.ebx, e.ecx, e.edx];
    const NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];
    for (leaf, sub, which) in FEATURE_LEAVES {
        let Some(g) = guest.iter().find(|e| e.function == leaf && e.index == sub) else {
            continue;
        };
        let offered = supported
            .as_slice()
            .iter()
            .find(|e| e.function == leaf && e.index == sub)
            .map(regs)
            .unwrap_or_default();
        for &r in which {
            let mut want = regs(g)[r];
            if leaf == 1 && r == 2 {
                want &= !LEAF1_ECX_OWN;
            }
            let lacking = want & !offered[r];
            if lacking != 0 {
                return Some(format!(
                    "CPUID leaf {leaf:#x}.{sub} {} bits {lacking:#x} are not offered here",
                    NAMES[r]
                ));
            }
        }
    }
    None
}

/// Build the VM over fresh RAM, with its disks and TAPs opened here by the paths and
/// names its config gives (shared storage; the TAP of this host). Nothing runs.
fn build(hv: &Hypervisor, spec: VmSpec) -> Result<Vm, MigrationError> {
    let config: crate::VmConfig = spec.config.clone().into();
    let host_files = crate::virtio::HostFiles {
        disks: crate::virtio::open_disks(&config.disks)
            .map_err(|e| MigrationError::vm(e.into()))?,
        taps: crate::virtio::open_taps(&config, Default::default())
            .map_err(|e| MigrationError::vm(e.into()))?
            .0,
    };
    let ram = GuestRam::create(&config.name, config.memory_mib << 20, spec.hugepages)
        .map_err(|e| MigrationError::Memory(Box::new(e)))?;
    let log = open_log(&spec.console_log).map_err(MigrationError::vm)?;
    Vm::build(hv, &spec, ram, log, host_files).map_err(MigrationError::state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_feature_this_host_lacks_is_named() {
        let supported = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 7,
            index: 0,
            ebx: 0b0110,
            ..Default::default()
        }])
        .unwrap();
        let guest = |ebx| {
            vec![kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx,
                ..Default::default()
            }]
        };
        assert_eq!(cpuid_missing(&guest(0b0100), &supported), None);
        let missing = cpuid_missing(&guest(0b1100), &supported).unwrap();
        assert!(missing.contains("leaf 0x7.0 ebx bits 0x8"), "{missing}");
        // The hypervisor bit is the VMM's own.
        let hv_bit = [kvm_cpuid_entry2 {
            function: 1,
            ecx: 1 << 31,
            ..Default::default()
        }];
        assert_eq!(cpuid_missing(&hv_bit, &supported), None);
    }
}
