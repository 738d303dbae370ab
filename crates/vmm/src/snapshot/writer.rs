//! The snapshot writer: a short-lived process of its own that writes a snapshot's files, so
//! that killing the process that writes (or a disk that fills up under it) costs the
//! snapshot and never a VM. The VMM keeps its VMs paused, hands the writer the RAM memfds
//! (it maps them itself: no copy through a pipe) and the encoded state, and resumes the VMs
//! whatever becomes of the writer.
//!
//! ```text
//!  VMM (VM paused)                                        writer (warmvm snapshot-writer)
//!  spawn (from the helper outside the seccomp filters) ─▶ maps nothing yet
//!        ──── Ram (fds: job in a sealed memfd, RAM memfds) ───▶ map, write ramN.bin, fsync
//!        ◀─── RamWritten { crc32s } | Failed ─────────────────
//!        ──── State (fd: the vm.state envelope, sealed) ──────▶ vm.state.tmp, fsync, rename
//!        ◀─── StateWritten | Failed ───────────────────────────
//!  EOF, a timeout or a failure at any step: kill and reap the writer, remove the files,
//!  resume the VM, report why.
//! ```

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::writer_faults::fault_point;
use super::{ramfile, SnapshotError};
use crate::channel::{Channel, ChannelError};
use crate::state::envelope;

/// The subcommand of the `warmvm` binary that runs a writer.
pub const SUBCOMMAND: &str = "snapshot-writer";
/// The writer's end of the channel, in the writer.
pub const CHANNEL_FD: RawFd = 3;
/// The writer is given at least this long per step, plus the time the RAM takes at a
/// floor bandwidth: a stopped or hung writer is killed after it, and the VM resumes.
const BASE_TIMEOUT: Duration = Duration::from_secs(60);
const FLOOR_BYTES_PER_SEC: u64 = 20 << 20;

static BINARY: OnceLock<PathBuf> = OnceLock::new();

/// Write snapshots through writer processes started from `binary` (the daemon's running
/// image, `/proc/self/exe`, so that the writer speaks its protocol even after a new build
/// was installed over the daemon's path). Without this, snapshots are written by the calling process itself
/// (library users and tests: killing that process loses its VMs anyway).
pub fn use_writer_process(binary: PathBuf) {
    let _ = BINARY.set(binary);
}

pub(crate) fn writer_binary() -> Option<&'static Path> {
    BINARY.get().map(PathBuf::as_path)
}

/// One RAM file to write.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RamJob {
    pub path: PathBuf,
    pub size: u64,
    pub extents: Vec<(u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    files: Vec<RamJob>,
    /// Tests only (`WARMVM_SNAPSHOT_FAULT=enospc-after:N`): RAM write requests left before
    /// the injected ENOSPC, counted across writers as across one process.
    enospc_after: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
enum ToWriter {
    /// Fds: the [`Job`] in a sealed memfd, then one RAM memfd per file.
    Ram,
    /// Fd: the `vm.state` envelope in a sealed memfd.
    State { dir: PathBuf },
}

#[derive(Debug, Serialize, Deserialize)]
enum FromWriter {
    RamWritten {
        crc32s: Vec<u32>,
        direct_io: bool,
        requests: u64,
    },
    StateWritten,
    Failed {
        path: PathBuf,
        message: String,
        errno: Option<i32>,
        requests: u64,
    },
}

/// A running writer, killed and reaped when dropped.
pub(crate) struct Writer {
    channel: Channel,
    child: Child,
    vm: String,
}

impl Writer {
    pub(crate) fn spawn(binary: &Path, vm: &str) -> Result<Writer, SnapshotError> {
        let io = |e: ChannelError| SnapshotError::Writer {
            vm: vm.to_string(),
            what: format!("cannot start it: {e}"),
        };
        let (channel, child_end) = Channel::pair().map_err(io)?;
        let child_fd = child_end.as_raw_fd();
        let mut cmd = Command::new(binary);
        // The writer runs the daemon's own image (/proc/self/exe), not the installed path:
        // it must speak exactly this build's writer protocol, which a newer build installed
        // meanwhile need not. It is still called warmvm (argv[0] here, and it renames
        // itself from `exe` at start), so that `pidof warmvm` and `ps -C warmvm` see it.
        cmd.arg0(crate::executable::PROCESS_NAME);
        // The daemon's --seccomp mode, explicitly: the writer must not depend on whether the
        // mode came as a flag or in the environment.
        cmd.arg(SUBCOMMAND)
            .arg("--fd")
            .arg(CHANNEL_FD.to_string())
            .arg("--seccomp")
            .arg(warmvm_sandbox::mode().as_str())
            .stdin(Stdio::null());
        // SAFETY: runs in the forked child before exec and only calls dup2 and prctl, which
        // are async-signal-safe. The death signal ends a writer whose VMM is gone (its VMs
        // with it): nobody would read what it writes.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(child_fd, CHANNEL_FD) < 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Seccomp filters forbid forks: the helper thread outside them starts it.
        let child = warmvm_sandbox::outside(move || cmd.spawn())
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map_err(|err| SnapshotError::Writer {
                vm: vm.to_string(),
                what: format!("cannot start {}: {err}", binary.display()),
            })?;
        drop(child_end);
        Ok(Writer {
            channel,
            child,
            vm: vm.to_string(),
        })
    }

    /// Have the writer write every RAM file; returns each file's CRC-32 and whether all
    /// went through direct I/O.
    pub(crate) fn write_ram(
        &mut self,
        files: Vec<RamJob>,
        memfds: &[RawFd],
    ) -> Result<(Vec<u32>, bool), SnapshotError> {
        let bytes: u64 = files
            .iter()
            .flat_map(|f| f.extents.iter().map(|e| e.1))
            .sum();
        let job = Job {
            files,
            enospc_after: ramfile::fault_budget(),
        };
        let encoded = rmp_serde::to_vec_named(&job)
            .map_err(|e| self.failed(format!("cannot encode its job: {e}")))?;
        let memfd = envelope::to_sealed_memfd(&encoded)
            .map_err(|e| self.failed(format!("cannot pass its job: {e}")))?;
        let mut fds = vec![memfd.as_raw_fd()];
        fds.extend_from_slice(memfds);
        self.send(&ToWriter::Ram, &fds, "while taking its job")?;
        let timeout = BASE_TIMEOUT + Duration::from_secs(bytes / FLOOR_BYTES_PER_SEC);
        match self.recv(timeout, "while writing RAM")? {
            FromWriter::RamWritten {
                crc32s,
                direct_io,
                requests,
            } => {
                ramfile::fault_spent(requests);
                Ok((crc32s, direct_io))
            }
            other => Err(self.refused(other)),
        }
    }

    /// Have the writer write `vm.state` (through a rename) and sync the directory.
    pub(crate) fn write_state(&mut self, dir: &Path, state: &[u8]) -> Result<(), SnapshotError> {
        let memfd = envelope::to_sealed_memfd(state)
            .map_err(|e| self.failed(format!("cannot pass the state: {e}")))?;
        self.send(
            &ToWriter::State {
                dir: dir.to_path_buf(),
            },
            &[memfd.as_raw_fd()],
            "while taking the state",
        )?;
        match self.recv(BASE_TIMEOUT, "while writing the state")? {
            FromWriter::StateWritten => Ok(()),
            other => Err(self.refused(other)),
        }
    }

    fn send(&mut self, msg: &ToWriter, fds: &[RawFd], when: &str) -> Result<(), SnapshotError> {
        self.channel
            .send(msg, fds)
            .map_err(|e| self.gone(when, Some(e)))
    }

    fn recv(&mut self, timeout: Duration, when: &str) -> Result<FromWriter, SnapshotError> {
        let _ = self.channel.set_timeout(Some(timeout));
        match self.channel.recv::<FromWriter>() {
            Ok((msg, _)) => Ok(msg),
            Err(ChannelError::Timeout) => Err(self.failed(format!(
                "did not answer within {} s {when} (stopped or hung); killed",
                timeout.as_secs()
            ))),
            Err(e) => Err(self.gone(when, Some(e))),
        }
    }

    /// The writer failed on its own: its error, as if this process had met it (ENOSPC
    /// stays ENOSPC).
    fn refused(&mut self, msg: FromWriter) -> SnapshotError {
        match msg {
            FromWriter::Failed {
                path,
                message,
                errno,
                requests,
            } => {
                ramfile::fault_spent(requests);
                let err = match errno {
                    Some(n) => std::io::Error::from_raw_os_error(n),
                    None => std::io::Error::other(message),
                };
                SnapshotError::Io { path, err }
            }
            other => self.failed(format!("answered out of turn: {other:?}")),
        }
    }

    fn failed(&mut self, what: String) -> SnapshotError {
        self.kill();
        SnapshotError::Writer {
            vm: self.vm.clone(),
            what: format!("(pid {}) {what}", self.child.id()),
        }
    }

    /// The channel broke: the writer is gone (killed, crashed); say how it ended.
    fn gone(&mut self, when: &str, err: Option<ChannelError>) -> SnapshotError {
        let pid = self.child.id();
        let how = match self.kill() {
            Some(status) => describe(status),
            None => format!(
                "broke off ({})",
                err.map_or("no reason".into(), |e| e.to_string())
            ),
        };
        SnapshotError::Writer {
            vm: self.vm.clone(),
            what: format!("(pid {pid}) {how} {when}"),
        }
    }

    fn kill(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Close the channel (the writer exits) and reap it.
    pub(crate) fn finish(mut self) {
        let _ = self.child.wait();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({status})"),
    }
}

/// `warmvm snapshot-writer --fd N --seccomp MODE`: serve one snapshot, then exit. The exit
/// status is 0 when the VMM closed the channel after the state was written.
///
/// The writer's seccomp filter ([`warmvm_sandbox::ThreadKind::SnapshotWriter`]) goes in
/// first, before anything arrives on the channel: it holds the channel already, and the
/// files it opens later are named by the VMM's messages.
pub fn serve(fd: RawFd, seccomp: warmvm_sandbox::Mode) -> Result<(), SnapshotError> {
    fn io(e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Writer {
            vm: String::new(),
            what: e.to_string(),
        }
    }
    super::writer_faults::mark_writer();
    // SAFETY: the VMM passed this fd for us alone; nothing else in this process owns it.
    let channel = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
    warmvm_sandbox::set_mode(seccomp);
    warmvm_sandbox::enter(warmvm_sandbox::ThreadKind::SnapshotWriter).map_err(|e| {
        SnapshotError::Writer {
            vm: String::new(),
            what: e.to_string(),
        }
    })?;
    fault_point("early");
    let (msg, mut files) = channel.recv::<ToWriter>().map_err(io)?;
    if !matches!(msg, ToWriter::Ram) || files.is_empty() {
        return Err(io(format!("expected Ram with fds, got {msg:?}")));
    }
    let job_bytes = envelope::from_sealed_memfd(files.remove(0)).map_err(io)?;
    let job: Job = rmp_serde::from_slice(&job_bytes).map_err(|e| io(format!("job: {e}")))?;
    if job.files.len() != files.len() {
        return Err(io(format!(
            "{} RAM files, {} memfds",
            job.files.len(),
            files.len()
        )));
    }
    ramfile::set_fault_budget(job.enospc_after);
    let reply = match write_ram(&job.files, &files) {
        Ok((crc32s, direct_io)) => FromWriter::RamWritten {
            crc32s,
            direct_io,
            requests: ramfile::fault_used(),
        },
        Err((path, err)) => FromWriter::Failed {
            path,
            message: err.to_string(),
            errno: err.raw_os_error(),
            requests: ramfile::fault_used(),
        },
    };
    drop(files);
    let failed = matches!(reply, FromWriter::Failed { .. });
    channel.send(&reply, &[]).map_err(io)?;
    if failed {
        return Ok(());
    }
    let (msg, mut files) = channel.recv::<ToWriter>().map_err(io)?;
    let (ToWriter::State { dir }, 1) = (msg, files.len()) else {
        return Err(io("expected State with one fd"));
    };
    let state = envelope::from_sealed_memfd(files.remove(0)).map_err(io)?;
    let reply = match write_state(&dir, &state) {
        Ok(()) => FromWriter::StateWritten,
        Err(err) => FromWriter::Failed {
            path: dir.join(super::STATE_FILE),
            message: err.to_string(),
            errno: err.raw_os_error(),
            requests: 0,
        },
    };
    channel.send(&reply, &[]).map_err(io)
}

/// Map each memfd (read-only, shared: the guest's very pages) and write its file.
fn write_ram(
    jobs: &[RamJob],
    memfds: &[File],
) -> Result<(Vec<u32>, bool), (PathBuf, std::io::Error)> {
    let mut crcs = Vec::new();
    let mut direct = true;
    for (job, memfd) in jobs.iter().zip(memfds) {
        let at = |err| (job.path.clone(), err);
        let len = memfd.metadata().map_err(at)?.len();
        if len != job.size {
            return Err(at(std::io::Error::other(format!(
                "the RAM memfd is {len} bytes, the job says {}",
                job.size
            ))));
        }
        ramfile::check_extents(&job.extents, job.size).map_err(|m| at(std::io::Error::other(m)))?;
        let map = Mapping::new(memfd, job.size).map_err(at)?;
        map.populate(&job.extents);
        // SAFETY: `map` is a mapping of `job.size` bytes that lives until the end of this
        // iteration; the VM is paused, so nobody writes it meanwhile.
        let (crc, d) =
            unsafe { ramfile::write(&job.path, map.addr, job.size, &job.extents) }.map_err(at)?;
        crcs.push(crc);
        direct &= d;
    }
    Ok((crcs, direct))
}

fn write_state(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{}.tmp", super::STATE_FILE));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fault_point("before-rename");
    std::fs::rename(&tmp, dir.join(super::STATE_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// A read-only shared mapping of a RAM memfd.
struct Mapping {
    addr: u64,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: u64) -> std::io::Result<Mapping> {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        // SAFETY: a new shared read-only mapping of an fd we hold; the kernel picks the
        // address; nothing in this process aliases it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: addr as u64,
            len,
        })
    }

    /// Fault the data extents in ahead, in bulk: one call instead of a page fault per 4 KiB
    /// page in the writing threads (holes are not touched: reading them would allocate).
    fn populate(&self, extents: &[(u64, u64)]) {
        for &(off, len) in extents {
            // SAFETY: the range lies inside this mapping (extents are checked against its
            // size); MADV_POPULATE_READ only faults pages in. Older kernels refuse it
            // (EINVAL): the pages then fault in as they are read.
            unsafe {
                libc::madvise(
                    (self.addr + off) as *mut libc::c_void,
                    len as usize,
                    libc::MADV_POPULATE_READ,
                )
            };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Mapping::new` with this address and length and
        // no reference into it outlives `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}
