use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;

const LONG: Duration = Duration::from_secs(10);

/// A worker-like thread: counts its passes until stopped.
fn spawn(parking: Arc<Parking>, passes: Arc<AtomicU32>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _exit = parking.exit_mark();
        while parking.next(&mut NoHooks) == Ok(Next::Run) {
            passes.fetch_add(1, Ordering::Relaxed);
            std::thread::yield_now();
        }
    })
}

#[test]
fn a_thread_parks_on_pause_runs_on_run_and_exits_on_stop() {
    let parking = Arc::new(Parking::new(Order::Pause, ()));
    let passes = Arc::new(AtomicU32::new(0));
    let t = spawn(parking.clone(), passes.clone());
    assert_eq!(parking.wait_parked(LONG), Some(ThreadState::Parked));
    assert_eq!(
        passes.load(Ordering::Relaxed),
        0,
        "a parked thread does no work"
    );

    assert!(parking.order(Order::Run));
    assert_eq!(parking.wait_running(LONG), Some(ThreadState::Running));
    assert!(parking.order(Order::Pause));
    assert_eq!(parking.wait_parked(LONG), Some(ThreadState::Parked));
    let at_park = passes.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        passes.load(Ordering::Relaxed),
        at_park,
        "parked means no work"
    );

    assert!(parking.order(Order::Stop));
    assert!(parking.wait_exited(LONG));
    t.join().unwrap();
    assert!(
        !parking.order(Order::Run),
        "an exited thread takes no orders"
    );
    assert_eq!(
        parking.with(|o, s, _| (o, s)),
        (Order::Stop, ThreadState::Exited)
    );
}

#[test]
fn a_thread_that_unwinds_is_marked_exited() {
    let parking = Arc::new(Parking::new(Order::Run, ()));
    let p = parking.clone();
    let t = std::thread::spawn(move || {
        let _exit = p.exit_mark();
        panic!("a bug on the thread");
    });
    assert!(t.join().is_err());
    assert_eq!(parking.wait_parked(LONG), Some(ThreadState::Exited));
}

/// Hooks that record what happened, as a vCPU's do.
struct Recording {
    before_park: u32,
    tasks_run: u32,
}

#[derive(Default)]
struct Posted {
    task: Option<u32>,
    result: Option<u32>,
    parked_times: u32,
    resumed_times: u32,
}

impl ParkHooks<Posted> for Recording {
    type Error = ();
    fn before_park(&mut self) {
        self.before_park += 1;
    }
    fn parked(&mut self, extra: &mut Posted) {
        extra.parked_times += 1;
    }
    fn while_parked(&mut self, g: &mut Guard<'_, Posted>) -> Result<bool, ()> {
        let Some(task) = g.extra().task.take() else {
            return Ok(false);
        };
        let result = g.unlocked(|| task * 2);
        self.tasks_run += 1;
        g.extra().result = Some(result);
        g.notify();
        Ok(true)
    }
    fn resumed(&mut self, extra: &mut Posted) {
        extra.resumed_times += 1;
    }
}

#[test]
fn work_posted_to_a_parked_thread_runs_there_and_its_result_comes_back() {
    let parking = Arc::new(Parking::new(Order::Pause, Posted::default()));
    let p = parking.clone();
    let t = std::thread::spawn(move || {
        let _exit = p.exit_mark();
        let mut hooks = Recording {
            before_park: 0,
            tasks_run: 0,
        };
        while p.next(&mut hooks) == Ok(Next::Run) {
            std::thread::yield_now();
        }
        (hooks.before_park, hooks.tasks_run)
    });
    assert_eq!(parking.wait_parked(LONG), Some(ThreadState::Parked));
    // A task given with the pause order itself, as a handover's capture is.
    assert!(parking.order_with(Order::Pause, |x| x.task = Some(21)));
    let result = parking.wait_until(LONG, |_, x| x.result.take());
    assert_eq!(result, Some(42));
    assert!(parking.order(Order::Run));
    assert_eq!(parking.wait_running(LONG), Some(ThreadState::Running));
    assert!(parking.order(Order::Stop));
    let (before_park, tasks_run) = t.join().unwrap();
    assert_eq!((before_park, tasks_run), (1, 1));
    assert_eq!(
        parking.with(|_, _, x| (x.parked_times, x.resumed_times)),
        (1, 1)
    );
}

/// Hooks whose `before_park` gives a run order, as the VMM might while the thread
/// finishes its work in hand.
struct RunDuringPark(Arc<Parking>);

impl ParkHooks<()> for RunDuringPark {
    type Error = ();
    fn before_park(&mut self) {
        self.0.order(Order::Run);
    }
}

#[test]
fn a_run_order_given_while_the_thread_prepares_to_park_keeps_it_running() {
    let parking = Arc::new(Parking::new(Order::Pause, ()));
    let next = parking.next(&mut RunDuringPark(parking.clone()));
    assert_eq!(next, Ok(Next::Run));
    assert_eq!(parking.with(|_, s, _| s), ThreadState::Running);
}

#[test]
fn waiting_for_a_state_the_thread_never_reaches_times_out() {
    let parking = Parking::new(Order::Pause, ());
    assert_eq!(parking.wait_parked(Duration::from_millis(10)), None);
}
