//! A vCPU thread and the orders the VMM gives it.
//!
//! Each vCPU runs on its own thread, which owns the KVM vCPU. The VMM steers it through
//! [`VcpuHandle`], a parkable thread of `warmvm-lifecycle` (as a virtio worker is): it
//! gives an order (run, pause, stop), recalls the vCPU from a wait-port sleep, and kicks it
//! out of KVM_RUN with a signal; the thread acknowledges by parking. A pending port or MMIO
//! access is completed before parking, so a parked vCPU's state is always between two
//! guest instructions. What is the vCPU's own (tasks run on it while parked, park times,
//! the real-time boost of a warm reboot) goes through the parking's hooks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use warmvm_devices::doorbell::{Doorbell, WaitEnd};
use warmvm_devices::{Devices, IoAction, Wake};
use warmvm_hypervisor::{Exit, ExitHandler, Vcpu, VcpuState};
use warmvm_lifecycle::{Guard, Next, Order, ParkHooks, Parking, ThreadState};

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off through the paravirtual power port, with this exit status.
    PoweredOff(u32),
    /// The guest shut itself down through the platform (ACPI S5).
    Clean,
    Crashed(String),
    /// Stopped by the VMM after the guest did not power off in time.
    Forced,
}

/// The VM a vCPU thread runs in, as the thread sees it: the devices its exits go to, and
/// where it reports its first run and the VM's end. The thread holds it until it has
/// ended, so that what the VM owns (its RAM above all) outlives every KVM_RUN.
pub(crate) trait VcpuVm: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn devices(&self) -> &Devices;
    /// The guest ran for the first time (the first KVM_RUN of any of its vCPUs).
    fn note_first_run(&self);
    /// A vCPU ended the VM: record how, and stop the other vCPUs.
    fn finish(&self, outcome: Outcome);
    /// Tests only: whether the next exit panics, as a bug of the VMM's would.
    #[cfg(feature = "fault-injection")]
    fn take_injected_panic(&self) -> bool;
}

/// Work a parked vCPU thread does on its own vCPU (KVM wants a vCPU's state read and
/// written on the thread that runs it).
pub(crate) type Task = Box<dyn FnOnce(&mut Vcpu) -> TaskResult + Send>;
pub(crate) type TaskResult = Result<Option<VcpuState>, warmvm_hypervisor::Error>;

/// What the VMM and a vCPU thread exchange beside the order and the thread's state.
#[derive(Default)]
struct VcpuPark {
    task: Option<Task>,
    task_result: Option<TaskResult>,
    /// After the task, spin briefly for the run order instead of sleeping (a handover's
    /// restore is followed within microseconds by the resume; sleeping would add a wake-up
    /// to the blackout).
    spin_after_task: bool,
    /// CLOCK_MONOTONIC ns when the thread last parked and last left a park to run.
    parked_at_ns: u64,
    resumed_at_ns: u64,
}

/// How long a vCPU thread spins for the run order after a handover's restore.
const SPIN_FOR_RUN: Duration = Duration::from_millis(5);

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes on one host, unlike
/// `Instant`, so the old and the new VMM can time a blackout together.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec into the pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Exit and wait counters of one vCPU; cheap to read at any time.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pub io_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    pub other_exits: AtomicU64,
    pub kicks: AtomicU64,
    pub waits: AtomicU64,
    pub wait_ns: AtomicU64,
}

/// A snapshot of [`VcpuCounters`].
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VcpuStats {
    pub id: u32,
    pub io_exits: u64,
    pub mmio_exits: u64,
    pub other_exits: u64,
    pub kicks: u64,
    pub waits: u64,
    pub wait_ms: u64,
}

/// The VMM's side of a vCPU thread.
pub struct VcpuHandle {
    pub id: u32,
    parking: Parking<VcpuPark>,
    /// The VM's doorbell, to recall the vCPU from a wait-port sleep with each order.
    doorbell: Arc<Doorbell>,
    thread: OnceLock<libc::pthread_t>,
    /// The thread's kernel id, if it runs in SCHED_OTHER (the only policy
    /// [`VcpuHandle::boost`] raises from and drops back to).
    boostable_tid: OnceLock<libc::pid_t>,
    /// Set with every run order, for a thread spinning after a task (see `spin_after_task`).
    run_hint: std::sync::atomic::AtomicBool,
    /// Raised to real-time by [`VcpuHandle::boost`]: the thread drops back to SCHED_OTHER
    /// before it next runs its guest.
    boosted: std::sync::atomic::AtomicBool,
    pub counters: VcpuCounters,
    /// Test builds: the thread hits the `new:vcpu-resume` fault point when it next leaves
    /// its park (armed by the new VMM's resume after a handover).
    #[cfg(feature = "fault-injection")]
    resume_fault: std::sync::atomic::AtomicBool,
}

impl VcpuHandle {
    pub(crate) fn new(id: u32, doorbell: Arc<Doorbell>) -> Arc<Self> {
        Arc::new(Self {
            id,
            parking: Parking::new(Order::Pause, VcpuPark::default()),
            doorbell,
            thread: OnceLock::new(),
            boostable_tid: OnceLock::new(),
            run_hint: std::sync::atomic::AtomicBool::new(false),
            boosted: std::sync::atomic::AtomicBool::new(false),
            counters: VcpuCounters::default(),
            #[cfg(feature = "fault-injection")]
            resume_fault: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn order(&self, order: Order) {
        self.order_with(order, None);
    }

    fn order_with(&self, order: Order, task: Option<Task>) {
        let given = self.parking.order_with(order, |x| {
            if let Some(task) = task {
                x.task_result = None;
                x.task = Some(task);
            }
        });
        if !given {
            return;
        }
        self.run_hint.store(order == Order::Run, Ordering::Release);
        if order != Order::Run {
            self.doorbell.recall();
            if let Some(t) = self.thread.get() {
                self.counters.kicks.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = warmvm_hypervisor::kick_thread(*t) {
                    tracing::debug!(vcpu = self.id, error = %e, "kick failed (thread gone?)");
                }
            }
        }
    }

    /// Park the thread (the VM's lifecycle is the caller's business).
    pub(crate) fn request_pause(&self) {
        self.order(Order::Pause);
    }

    /// Park the thread and have it run `task` on its vCPU as soon as it has parked, with no
    /// further wake-up (the handover's capture).
    pub(crate) fn request_pause_then(&self, task: Task) {
        self.order_with(Order::Pause, Some(task));
    }

    /// Raise the thread, which must have been ordered to pause, to SCHED_FIFO until it
    /// next leaves its park to run the guest (it drops back itself, see `next_order`), so
    /// that on a loaded host its part of a warm reboot's blackout (parking and saving,
    /// restoring, resuming) does not queue behind other processes for a core. Only a thread
    /// in SCHED_OTHER is raised, and only where the VMM may (root or CAP_SYS_NICE);
    /// otherwise nothing changes.
    pub(crate) fn boost(&self) {
        self.parking
            .with(|order, state, _| self.boost_locked(order, state));
    }

    /// [`VcpuHandle::boost`], holding the parking's lock: the thread cannot mark itself
    /// exited meanwhile, so its id is still live.
    fn boost_locked(&self, order: Order, state: ThreadState) {
        let (Some(_), Some(&tid), false, Order::Pause) = (
            self.thread.get(),
            self.boostable_tid.get(),
            state == ThreadState::Exited,
            order,
        ) else {
            return;
        };
        // Set first: the thread checks it only when it leaves its park to run, which needs
        // a run order this thread has not given yet.
        self.boosted.store(true, Ordering::Release);
        let fifo = libc::sched_param { sched_priority: 1 };
        // SAFETY: `tid` is a live thread of this process (see above); the param points to
        // a local. SCHED_RESET_ON_FORK: a thread it starts is never real-time.
        let raised = unsafe {
            libc::sched_setscheduler(tid, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &fifo)
        } == 0;
        if !raised {
            self.boosted.store(false, Ordering::Release);
        }
    }

    pub(crate) fn request_run(&self) {
        self.order(Order::Run);
    }

    /// Test builds: have the thread hit the `new:vcpu-resume` fault point, on itself, when
    /// it next leaves its park.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn arm_resume_fault(&self) {
        self.resume_fault.store(true, Ordering::Release);
    }

    pub(crate) fn request_stop(&self) {
        self.order(Order::Stop);
    }

    /// Wait until the thread has parked (or exited). False on timeout.
    pub(crate) fn wait_parked(&self, timeout: Duration) -> bool {
        self.parking.wait_parked(timeout).is_some()
    }

    pub(crate) fn wait_exited(&self, timeout: Duration) -> bool {
        self.parking.wait_exited(timeout)
    }

    pub fn stats(&self) -> VcpuStats {
        let c = &self.counters;
        VcpuStats {
            id: self.id,
            io_exits: c.io_exits.load(Ordering::Relaxed),
            mmio_exits: c.mmio_exits.load(Ordering::Relaxed),
            other_exits: c.other_exits.load(Ordering::Relaxed),
            kicks: c.kicks.load(Ordering::Relaxed),
            waits: c.waits.load(Ordering::Relaxed),
            wait_ms: c.wait_ns.load(Ordering::Relaxed) / 1_000_000,
        }
    }

    /// Give the parked thread `task` to run on its vCPU. With `spin`, the thread then spins
    /// (at most a few ms) for the run order instead of sleeping: for a restore that a
    /// resume follows at once. False if the thread is not parked.
    pub(crate) fn post_task(&self, spin: bool, task: Task) -> bool {
        self.parking.update(|_, state, x| {
            if state != ThreadState::Parked {
                return false;
            }
            x.task_result = None;
            x.task = Some(task);
            x.spin_after_task = spin;
            true
        })
    }

    /// Wait for the result of the task given to the thread (see
    /// [`VcpuHandle::post_task`], [`VcpuHandle::request_pause_then`]). `None` if the
    /// thread exited or the timeout passed first.
    pub(crate) fn task_result(&self, timeout: Duration) -> Option<TaskResult> {
        self.parking
            .wait_until(timeout, |state, x| match x.task_result.take() {
                Some(r) => Some(Some(r)),
                None if state == ThreadState::Exited => Some(None),
                None => None,
            })
            .flatten()
    }

    /// When the thread last parked, and last left a park (CLOCK_MONOTONIC ns).
    pub(crate) fn park_times(&self) -> (u64, u64) {
        self.parking
            .with(|_, _, x| (x.parked_at_ns, x.resumed_at_ns))
    }

    /// Wait until the thread has left its park to run the guest (after `request_run`).
    pub(crate) fn wait_running(&self, timeout: Duration) -> bool {
        self.parking.wait_running(timeout).is_some()
    }

    /// Thread side: what to do next. Parks while paused (running any task it is given
    /// there); returns false to stop, an error if the thread cannot leave the real-time
    /// scheduling [`VcpuHandle::boost`] gave it.
    fn next_order(
        &self,
        vcpu: &mut Vcpu,
        before_park: &mut dyn FnMut(&mut Vcpu),
    ) -> std::io::Result<bool> {
        let mut hooks = VcpuHooks {
            handle: self,
            vcpu,
            before_park,
        };
        Ok(self.parking.next(&mut hooks)? == Next::Run)
    }
}

/// What a vCPU thread does around its park, beyond what every parkable thread does.
struct VcpuHooks<'a> {
    handle: &'a VcpuHandle,
    vcpu: &'a mut Vcpu,
    /// Completes a pending port access and flushes the console.
    before_park: &'a mut dyn FnMut(&mut Vcpu),
}

impl ParkHooks<VcpuPark> for VcpuHooks<'_> {
    type Error = std::io::Error;

    fn before_park(&mut self) {
        (self.before_park)(self.vcpu);
    }

    fn parked(&mut self, x: &mut VcpuPark) {
        x.parked_at_ns = monotonic_ns();
    }

    fn while_parked(&mut self, g: &mut Guard<'_, VcpuPark>) -> std::io::Result<bool> {
        let Some(task) = g.extra().task.take() else {
            return Ok(false);
        };
        let vcpu = &mut *self.vcpu;
        let result = g.unlocked(|| task(vcpu));
        let spin = std::mem::take(&mut g.extra().spin_after_task) && result.is_ok();
        g.extra().task_result = Some(result);
        g.notify();
        if spin {
            let handle = self.handle;
            g.unlocked(|| {
                // Spin in SCHED_OTHER: a real-time spinner could hold the core the thread
                // driving the handover needs for the commit.
                if handle.boosted.swap(false, Ordering::AcqRel) {
                    drop_boost()?;
                }
                let until = Instant::now() + SPIN_FOR_RUN;
                while !handle.run_hint.load(Ordering::Acquire) && Instant::now() < until {
                    std::hint::spin_loop();
                }
                Ok::<(), std::io::Error>(())
            })?;
        }
        Ok(true)
    }

    // `g` serves only the test builds' fault point.
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
    fn before_run(&mut self, g: &mut Guard<'_, VcpuPark>) -> std::io::Result<bool> {
        // Test builds: a vCPU held in its park (after the run order).
        #[cfg(feature = "fault-injection")]
        if g.state() == ThreadState::Parked
            && self.handle.resume_fault.swap(false, Ordering::AcqRel)
        {
            g.unlocked(|| {
                crate::handover::faults::hit(crate::handover::faults::Point::NewVcpuResume)
            });
            return Ok(false);
        }
        // Parked or not (a run order may come before the thread parked): never run a guest
        // in real time; a vCPU that cannot drop back ends its VM.
        if self.handle.boosted.swap(false, Ordering::AcqRel) {
            drop_boost()?;
        }
        Ok(true)
    }

    fn resumed(&mut self, x: &mut VcpuPark) {
        x.resumed_at_ns = monotonic_ns();
    }

    fn stopping(&mut self) {
        // Its teardown is no part of any blackout. Failing to drop back here costs nothing
        // that matters: the thread ends.
        if self.handle.boosted.swap(false, Ordering::AcqRel) {
            let _ = drop_boost();
        }
    }
}

/// Back to SCHED_OTHER after [`VcpuHandle::boost`], on the boosted thread itself (its
/// seccomp filter allows just this change of scheduling policy).
fn drop_boost() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; the param points to a local.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Routes a vCPU's exits to its VM's devices and remembers what the vCPU must do next.
struct Exits<'a> {
    devices: &'a Devices,
    action: IoAction,
    last_wake: Wake,
}

impl ExitHandler for Exits<'_> {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.devices.pio_read(port, data, self.last_wake);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.action = self.devices.pio_write(port, data);
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.devices.mmio_read(addr, data);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.action = self.devices.mmio_write(addr, data);
    }
}

/// The body of a vCPU thread.
pub(crate) fn run_vcpu<V: VcpuVm>(mut vcpu: Vcpu, handle: Arc<VcpuHandle>, vm: Arc<V>) {
    crate::panic::mark_vcpu_thread();
    // Before the filter, which lets a vCPU thread open no file for writing: the console
    // thread rotates the guest's log when it is full.
    warmvm_devices::console::never_rotate_on_this_thread();
    // Before the filter too, which allows no scheduling call but dropping back to
    // SCHED_OTHER. SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
    if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_OTHER {
        // SAFETY: gettid has no preconditions.
        let _ = handle.boostable_tid.set(unsafe { libc::gettid() });
    }
    warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Vcpu);
    // SAFETY: pthread_self has no preconditions.
    let _ = handle.thread.set(unsafe { libc::pthread_self() });
    // Marks the thread exited however it ends, unwinding included: a reboot or a stop
    // waits for that mark, and must never wait for a thread that is gone.
    let exit_mark = handle.parking.exit_mark();
    vcpu.bind_to_current_thread();
    let span = tracing::info_span!("vcpu", vm = %vm.name(), id = handle.id);
    let _enter = span.enter();
    // A bug of the VMM's on this thread ends this VM, with the reason, and nothing else.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_loop(&mut vcpu, &handle, &*vm)
    }))
    .unwrap_or_else(|payload| {
        Some(Outcome::Crashed(format!(
            "vCPU {}: the VMM's vCPU thread panicked: {}",
            handle.id,
            crate::panic::message(payload.as_ref())
        )))
    });
    vm.devices().flush();
    vcpu.unbind_thread();
    drop(vcpu);
    drop(exit_mark);
    if let Some(outcome) = outcome {
        vm.finish(outcome);
    }
}

fn run_loop<V: VcpuVm>(vcpu: &mut Vcpu, handle: &VcpuHandle, vm: &V) -> Option<Outcome> {
    let devices = vm.devices();
    let mut exits = Exits {
        devices,
        action: IoAction::None,
        last_wake: Wake::Timeout,
    };
    let mut io_pending = false;
    let outcome = loop {
        let recall = devices.doorbell.recall_generation();
        let mut park_error = None;
        let keep_going = handle.next_order(vcpu, &mut |vcpu| {
            if io_pending {
                if let Err(e) = vcpu.complete_pending_io() {
                    park_error = Some(e);
                }
                io_pending = false;
            }
            devices.flush();
        });
        if let Some(e) = park_error {
            break Some(Outcome::Crashed(format!("vCPU {}: {e}", handle.id)));
        }
        match keep_going {
            Ok(true) => {}
            Ok(false) => break None,
            Err(e) => {
                break Some(Outcome::Crashed(format!(
                    "vCPU {}: cannot leave real-time scheduling: {e}",
                    handle.id
                )))
            }
        }
        vm.note_first_run();
        exits.action = IoAction::None;
        let exit = match vcpu.run(&mut exits) {
            Ok(exit) => exit,
            Err(e) => break Some(Outcome::Crashed(format!("vCPU {}: {e}", handle.id))),
        };
        io_pending = matches!(exit, Exit::Io | Exit::Mmio);
        #[cfg(feature = "fault-injection")]
        if vm.take_injected_panic() {
            panic!("fault injected: a panic on a vCPU thread");
        }
        let c = &handle.counters;
        match exit {
            Exit::Io | Exit::Mmio => {
                let counter = if exit == Exit::Io { &c.io_exits } else { &c.mmio_exits };
                counter.fetch_add(1, Ordering::Relaxed);
                match exits.action {
                    IoAction::None => {}
                    IoAction::Wait { timeout_us } => {
                        exits.last_wake = sleep(devices, handle, timeout_us, recall);
                    }
                    IoAction::PowerOff { status } => break Some(Outcome::PoweredOff(status)),
                    IoAction::Shutdown => break Some(Outcome::Clean),
                }
            }
            Exit::Interrupted => {}
            Exit::Hlt => {
                c.other_exits.fetch_add(1, Ordering::Relaxed);
                exits.last_wake = sleep(devices, handle, warmvm_abi::WAIT_FOREVER, recall);
            }
            Exit::SystemEvent { kind } => {
                c.other_exits.fetch_add(1, Ordering::Relaxed);
                break Some(Outcome::PoweredOff(kind));
            }
            Exit::Shutdown => {
                break Some(Outcome::Crashed(format!(
                    "vCPU {} shut down (triple fault)",
                    handle.id
                )))
            }
            Exit::InternalError { suberror } => {
                break Some(Outcome::Crashed(format!(
                    "vCPU {}: KVM internal error (suberror {suberror}), e.g. an instruction KVM cannot emulate",
                    handle.id
                )))
            }
            Exit::FailEntry { reason } => {
                break Some(Outcome::Crashed(format!(
                    "vCPU {}: VM entry failed (reason {reason:#x})",
                    handle.id
                )))
            }
            Exit::Unhandled { reason } => {
                break Some(Outcome::Crashed(format!(
                    "vCPU {}: unhandled KVM exit {reason}",
                    handle.id
                )))
            }
        }
    };
    outcome
}

fn sleep(devices: &Devices, handle: &VcpuHandle, timeout_us: u32, recall: u64) -> Wake {
    // A guest that waits may have printed a prompt without a newline: show it now.
    devices.flush();
    let start = Instant::now();
    let deadline = (timeout_us != warmvm_abi::WAIT_FOREVER)
        .then(|| start + Duration::from_micros(u64::from(timeout_us)));
    let end = devices.doorbell.wait(deadline, recall);
    let c = &handle.counters;
    c.waits.fetch_add(1, Ordering::Relaxed);
    c.wait_ns
        .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    match end {
        WaitEnd::Timeout => Wake::Timeout,
        WaitEnd::DeviceWork | WaitEnd::Recalled => Wake::Event,
    }
}
