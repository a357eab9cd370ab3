//! The SQLite stores' writer-lock wait (`ingest/state/sqlite.py`, `_flock`) without polling:
//! a blocking `flock(LOCK_EX)` with the GIL released, woken at its deadline by a signal.
//!
//! Why: the Python wait asked for the lock again every 50 µs - 1 ms, and each ask took the GIL
//! back from the event loop and the decoder of the same worker (up to the switch interval of
//! theirs a time), so a lock released by the other worker was seen late and its next holder
//! waited for the GIL first. The kernel wakes a blocked `flock` at the release instead, and
//! nothing runs in between.
//!
//! flock itself has no timeout: a per-thread POSIX timer sends this thread a real-time signal
//! whose handler does nothing and is installed without SA_RESTART, so the blocked call returns
//! EINTR at the deadline (again every millisecond after it, should the first signal come just
//! before the call). Any other EINTR is asked again. The signal's handler is installed once,
//! only where the signal has no handler yet; where one is there already (or the timer cannot
//! be made), the wait asks again every 50 µs - 1 ms as before, still without the GIL.
use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

/// The signal that ends a wait: 0 until installed, -1 where it could not be.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static INSTALL: Once = Once::new();

extern "C" fn wake(_: libc::c_int) {}

fn install() -> libc::c_int {
    INSTALL.call_once(|| {
        let sig = libc::SIGRTMAX() - 3;
        let mut ours = -1;
        unsafe {
            let mut old = MaybeUninit::<libc::sigaction>::zeroed();
            if libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) == 0
                && old.assume_init().sa_sigaction == libc::SIG_DFL
            {
                let mut act: libc::sigaction = MaybeUninit::zeroed().assume_init();
                act.sa_sigaction = wake as extern "C" fn(libc::c_int) as libc::sighandler_t;
                act.sa_flags = 0; // no SA_RESTART: the blocked flock returns EINTR
                libc::sigemptyset(&mut act.sa_mask);
                if libc::sigaction(sig, &act, std::ptr::null_mut()) == 0 {
                    ours = sig;
                }
            }
        }
        SIGNAL.store(ours, Ordering::Relaxed);
    });
    SIGNAL.load(Ordering::Relaxed)
}

fn try_lock(fd: libc::c_int) -> io::Result<bool> {
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => Ok(false),
        _ => Err(err),
    }
}

/// The old way, without the GIL: ask again every 50 µs, doubling to 1 ms.
fn poll(fd: libc::c_int, deadline: Instant) -> io::Result<bool> {
    let mut pause = Duration::from_micros(50);
    loop {
        if try_lock(fd)? {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as _ }
}

/// A timer that sends `sig` to this thread after `first`, then every millisecond.
struct Timer(libc::timer_t);

impl Timer {
    fn start(sig: libc::c_int, first: Duration) -> Option<Timer> {
        unsafe {
            let mut sev: libc::sigevent = MaybeUninit::zeroed().assume_init();
            sev.sigev_notify = libc::SIGEV_THREAD_ID;
            sev.sigev_signo = sig;
            sev.sigev_notify_thread_id = libc::gettid();
            let mut id = MaybeUninit::<libc::timer_t>::zeroed();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, id.as_mut_ptr()) != 0 {
                return None;
            }
            let timer = Timer(id.assume_init());
            let spec = libc::itimerspec {
                it_interval: timespec(Duration::from_millis(1)),
                it_value: timespec(first.max(Duration::from_nanos(1))),
            };
            if libc::timer_settime(timer.0, 0, &spec, std::ptr::null_mut()) != 0 {
                return None; // dropped: deleted
            }
            Some(timer)
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        unsafe {
            libc::timer_delete(self.0);
        }
    }
}

/// The wait, without the GIL. The signal is unblocked in this thread while it waits; once the
/// timer is deleted, a signal of it still pending is taken here, not left to interrupt this
/// thread's next system call.
fn wait(fd: libc::c_int, timeout: f64) -> io::Result<bool> {
    if try_lock(fd)? {
        return Ok(true);
    }
    let timeout = Duration::from_secs_f64(timeout.max(0.0).min(1e9));
    let deadline = Instant::now() + timeout;
    if timeout.is_zero() {
        return Ok(false);
    }
    let sig = install();
    if sig < 0 {
        return poll(fd, deadline);
    }
    unsafe {
        let mut set = MaybeUninit::<libc::sigset_t>::zeroed().assume_init();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        let mut before = MaybeUninit::<libc::sigset_t>::zeroed().assume_init();
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, &mut before);
        let timer = match Timer::start(sig, timeout) {
            Some(t) => t,
            None => {
                libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
                return poll(fd, deadline);
            }
        };
        let result = loop {
            if libc::flock(fd, libc::LOCK_EX) == 0 {
                break Ok(true);
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                break Err(err);
            }
            if Instant::now() >= deadline {
                // the deadline's signal, or another one at its time: a last ask
                break try_lock(fd);
            }
        };
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        drop(timer);
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        while libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) == sig {}
        libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
        result
    }
}

/// `flock(fd, LOCK_EX)` within `timeout` seconds, the GIL released while it waits: True when
/// taken, False when the deadline passed first (see the module's text).
#[pyfunction]
pub fn flock_wait(py: Python<'_>, fd: i32, timeout: f64) -> PyResult<bool> {
    Ok(py.allow_threads(|| wait(fd, timeout))?)
}
