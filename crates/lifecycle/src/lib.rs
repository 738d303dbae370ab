//! Threads the VMM parks and lets run again, and what can be paused.
//!
//! A vCPU thread and a virtio device's worker thread are driven the same way: the VMM gives
//! an [`Order`] (run, pause, stop), the thread acknowledges by changing its
//! [`ThreadState`] (running, parked, exited), and the VMM waits for the state it needs.
//! [`Parking`] is that one machine; each kind of thread adds only what is its own through
//! [`ParkHooks`] (a vCPU completes a pending port access before it parks and runs tasks on
//! its vCPU while parked; a worker needs nothing). [`Pausable`] is what the VMM pauses and
//! resumes as a whole: a VM, its devices, a device's worker.
//!
//! Owns: the order/state machine of parkable threads, and the pause/resume contract.
//! Must never: depend on another crate (the devices and the VMM both build on it), issue a
//! system call of its own, or sleep or spin where a caller did not ask it to: a warm reboot's
//! blackout goes through here.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the VMM wants a parkable thread to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Do its work (run the guest, serve the queues).
    Run,
    /// Finish what is in hand, park, and wait for the next order.
    Pause,
    /// End.
    Stop,
}

/// Where a parkable thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadState {
    /// Not parked: doing its work, sleeping for more, or not yet at its first park.
    Running,
    /// Parked after a pause order, between two units of work.
    Parked,
    /// Ended (stopped, or unwound): it takes no more orders.
    Exited,
}

/// What [`Parking::next`] tells the thread to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Run,
    Stop,
}

struct Control<X> {
    order: Order,
    state: ThreadState,
    extra: X,
}

/// The shared side of one parkable thread: the VMM's order, the thread's state, and `X`,
/// whatever else the two exchange under the same lock (a vCPU's tasks and park times).
pub struct Parking<X = ()> {
    control: Mutex<Control<X>>,
    cv: Condvar,
}

/// [`Parking`] locked. Every change of state through it wakes the waiters.
pub struct Guard<'a, X> {
    parking: &'a Parking<X>,
    guard: Option<MutexGuard<'a, Control<X>>>,
}

impl<X> Guard<'_, X> {
    fn control(&self) -> &Control<X> {
        self.guard.as_ref().expect("held outside `unlocked`")
    }

    fn control_mut(&mut self) -> &mut Control<X> {
        self.guard.as_mut().expect("held outside `unlocked`")
    }

    pub fn order(&self) -> Order {
        self.control().order
    }

    pub fn state(&self) -> ThreadState {
        self.control().state
    }

    pub fn extra(&mut self) -> &mut X {
        &mut self.control_mut().extra
    }

    fn set_state(&mut self, state: ThreadState) {
        self.control_mut().state = state;
        self.notify();
    }

    /// Wake every thread waiting on this parking (after `extra` changed, say).
    pub fn notify(&self) {
        self.parking.cv.notify_all();
    }

    /// Run `f` with the lock released, and take it again.
    pub fn unlocked<T>(&mut self, f: impl FnOnce() -> T) -> T {
        drop(self.guard.take());
        let result = f();
        self.guard = Some(self.parking.lock_control());
        result
    }

    fn wait(&mut self) {
        let guard = self.guard.take().expect("held outside `unlocked`");
        self.guard = Some(
            self.parking
                .cv
                .wait(guard)
                .unwrap_or_else(|p| p.into_inner()),
        );
    }
}

/// What a kind of thread adds to [`Parking::next`]. Every method has a default that does
/// nothing, so a thread with nothing of its own passes [`NoHooks`].
pub trait ParkHooks<X> {
    type Error;

    /// Before the thread parks, with the lock released (the order may change meanwhile):
    /// finish what must not be left half done.
    fn before_park(&mut self) {}

    /// The thread has just parked (lock held).
    fn parked(&mut self, _extra: &mut X) {}

    /// Parked, lock held: do work posted in `extra`, if any (release the lock for long work
    /// with [`Guard::unlocked`]). True if there was work: the orders are then read again.
    fn while_parked(&mut self, _guard: &mut Guard<'_, X>) -> Result<bool, Self::Error> {
        Ok(false)
    }

    /// On a run order, lock held, before the thread leaves its park (or goes on running).
    /// False to read the orders again (after releasing the lock, say).
    fn before_run(&mut self, _guard: &mut Guard<'_, X>) -> Result<bool, Self::Error> {
        Ok(true)
    }

    /// The thread leaves its park to run (lock held).
    fn resumed(&mut self, _extra: &mut X) {}

    /// On a stop order, lock held.
    fn stopping(&mut self) {}
}

/// The hooks of a thread with nothing of its own to do around its park.
pub struct NoHooks;

impl<X> ParkHooks<X> for NoHooks {
    type Error = std::convert::Infallible;
}

impl<X> Parking<X> {
    /// A thread not started yet (state running), with its first order.
    pub fn new(order: Order, extra: X) -> Self {
        Self {
            control: Mutex::new(Control {
                order,
                state: ThreadState::Running,
                extra,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock_control(&self) -> MutexGuard<'_, Control<X>> {
        // The state is a few plain fields, consistent between statements: a thread that
        // panicked holding the lock leaves nothing half changed.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lock(&self) -> Guard<'_, X> {
        Guard {
            parking: self,
            guard: Some(self.lock_control()),
        }
    }

    /// The VMM's side: give `order` (and change `extra` under the same lock). False, and
    /// nothing changes, if the thread has exited. Waking the thread where it sleeps outside
    /// this parking (an eventfd, KVM_RUN) is the caller's business.
    pub fn order_with(&self, order: Order, f: impl FnOnce(&mut X)) -> bool {
        {
            let mut c = self.lock_control();
            if c.state == ThreadState::Exited {
                return false;
            }
            c.order = order;
            f(&mut c.extra);
        }
        self.cv.notify_all();
        true
    }

    pub fn order(&self, order: Order) -> bool {
        self.order_with(order, |_| {})
    }

    /// Read the order, the state and `extra` together.
    pub fn with<T>(&self, f: impl FnOnce(Order, ThreadState, &mut X) -> T) -> T {
        let mut c = self.lock_control();
        let c = &mut *c;
        f(c.order, c.state, &mut c.extra)
    }

    /// Change `extra` (post work to a parked thread, say) and wake the thread and the
    /// waiters; `f` sees the order and the state too.
    pub fn update<T>(&self, f: impl FnOnce(Order, ThreadState, &mut X) -> T) -> T {
        let result = self.with(f);
        self.cv.notify_all();
        result
    }

    /// Wait, at most `timeout`, until `done` returns something for the thread's state and
    /// `extra`, and return that (`None`: not in time).
    pub fn wait_until<T>(
        &self,
        timeout: Duration,
        mut done: impl FnMut(ThreadState, &mut X) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut c = self.lock_control();
        loop {
            let cm = &mut *c;
            if let Some(v) = done(cm.state, &mut cm.extra) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            c = self
                .cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Wait until the thread is in one of `states`; which one, or `None` on timeout.
    pub fn wait_for(&self, timeout: Duration, states: &[ThreadState]) -> Option<ThreadState> {
        self.wait_until(timeout, |s, _| states.contains(&s).then_some(s))
    }

    /// Wait until the thread has parked or exited (it then touches nothing either way).
    pub fn wait_parked(&self, timeout: Duration) -> Option<ThreadState> {
        self.wait_for(timeout, &[ThreadState::Parked, ThreadState::Exited])
    }

    /// Wait until the thread has left its park (or exited).
    pub fn wait_running(&self, timeout: Duration) -> Option<ThreadState> {
        self.wait_for(timeout, &[ThreadState::Running, ThreadState::Exited])
    }

    pub fn wait_exited(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, &[ThreadState::Exited]).is_some()
    }

    /// The thread's side: what to do next. Parks while the order is to pause (doing what
    /// `hooks` has for it there) and returns on a run or stop order. Costs one lock when
    /// the order is to run and the thread is running: it is called before every guest entry.
    pub fn next<H: ParkHooks<X>>(&self, hooks: &mut H) -> Result<Next, H::Error> {
        let mut g = self.lock();
        loop {
            match g.order() {
                Order::Run => {
                    if !hooks.before_run(&mut g)? {
                        continue;
                    }
                    if g.state() == ThreadState::Parked {
                        hooks.resumed(g.extra());
                        g.set_state(ThreadState::Running);
                    }
                    return Ok(Next::Run);
                }
                Order::Stop => {
                    hooks.stopping();
                    return Ok(Next::Stop);
                }
                Order::Pause => {
                    if g.state() != ThreadState::Parked {
                        g.unlocked(|| hooks.before_park());
                        if g.order() != Order::Pause {
                            continue;
                        }
                        hooks.parked(g.extra());
                        g.set_state(ThreadState::Parked);
                    }
                    if hooks.while_parked(&mut g)? {
                        continue;
                    }
                    g.wait();
                }
            }
        }
    }

    /// The thread's side: it has ended (no more orders are taken).
    pub fn mark_exited(&self) {
        self.lock().set_state(ThreadState::Exited);
    }

    /// Marks the thread exited when dropped, unwinding included: the VMM waits for that
    /// mark and must never wait for a thread that is gone.
    pub fn exit_mark(&self) -> ExitMark<'_, X> {
        ExitMark(self)
    }
}

/// See [`Parking::exit_mark`].
pub struct ExitMark<'a, X>(&'a Parking<X>);

impl<X> Drop for ExitMark<'_, X> {
    fn drop(&mut self) {
        self.0.mark_exited();
    }
}

/// Something the VMM stops as a whole and lets go on: a VM, its devices, a device's worker.
pub trait Pausable {
    type Error;

    /// Stop between two units of work (guest instructions, device requests) and return
    /// once stopped: nothing it does is left half done, so its state can be read.
    fn pause(&self) -> Result<(), Self::Error>;

    /// Go on after [`Pausable::pause`] (or for the first time after a restore).
    fn resume(&self) -> Result<(), Self::Error>;
}

#[cfg(test)]
mod tests;
