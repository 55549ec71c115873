//! A team of threads in lockstep: every rayon worker runs the same closure once (`rayon::broadcast`),
//! and the phases of a computation are separated by a spinning [`Barrier`] instead of one parallel
//! dispatch per phase. Decoding runs about six phases per layer, each a few tens of microseconds of
//! work: a rayon dispatch per phase (waking a sleeping worker, stealing, joining) costs as much as the
//! phase, a barrier between running threads well under a microsecond.
//!
//! Safety rules for a team body: (1) every thread passes every barrier the same number of times, so a
//! body has no early return except after a barrier reported an abort; (2) within a phase, a [`Shared`]
//! buffer is either only read by all threads or written in disjoint parts and not read; (3) a thread
//! that fails or panics calls [`Team::abort`] and the others leave at their next barrier.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// How long a thread spins at a barrier before it starts yielding its core at every check: long
/// enough to cover a phase's imbalance between running threads, short enough that a peer preempted
/// by the OS (another process on the same cores) soon gets the core back.
const SPIN_FOR: std::time::Duration = std::time::Duration::from_micros(20);

/// The shared state of one team run.
pub struct Team {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    aborted: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Team {
    fn new(threads: usize) -> Self {
        Team {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Waits until every thread of the team has arrived; false when the run was aborted (the caller
    /// then returns).
    pub fn barrier(&self) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        } else {
            let start = std::time::Instant::now();
            let mut spinning = true;
            while self.generation.load(Ordering::Acquire) == generation {
                if self.aborted.load(Ordering::Relaxed) {
                    return false;
                }
                if spinning {
                    for _ in 0..32 {
                        std::hint::spin_loop();
                    }
                    spinning = start.elapsed() < SPIN_FOR;
                } else {
                    std::thread::yield_now();
                }
            }
        }
        !self.aborted.load(Ordering::Relaxed)
    }

    /// Stops the run: the other threads leave at their next barrier; `run` returns `Err(why)` (the
    /// first reason given).
    pub fn abort(&self, why: String) {
        if let Ok(mut e) = self.error.lock() {
            e.get_or_insert(why);
        }
        self.aborted.store(true, Ordering::Release);
    }
}

/// Whether a team holds rayon's workers (see [`run`]).
static BUSY: AtomicBool = AtomicBool::new(false);

/// Runs `body(team, thread index)` on every thread of rayon's pool at once (the calling worker
/// included) and waits for all of them. A panic in a body aborts the team and comes back as Err.
///
/// One team at a time: a thread spinning at a barrier runs no other rayon job, so two teams sharing
/// the workers (two Python threads generating at once) could each hold a worker the other waits for.
/// While one team runs, another `run` is a team of one: `body(team, 0)` on the calling thread.
pub fn run(body: impl Fn(&Team, usize) + Sync) -> Result<(), String> {
    let team = if BUSY.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
        let team = Team::new(rayon::current_num_threads().max(1));
        rayon::broadcast(|ctx| member(&team, ctx.index(), &body));
        BUSY.store(false, Ordering::Release);
        team
    } else {
        let team = Team::new(1);
        member(&team, 0, &body);
        team
    };
    match team.error.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(why),
        Err(_) => Err("team: error slot poisoned".into()),
    }
}

fn member(team: &Team, t: usize, body: &(impl Fn(&Team, usize) + Sync)) {
    if catch_unwind(AssertUnwindSafe(|| body(team, t))).is_err() {
        team.abort(format!("team thread {t} panicked"));
    }
}

/// The part of `0..n` that thread `t` of `threads` takes, cut at multiples of `align` (the last
/// part takes the rest).
pub fn part(n: usize, t: usize, threads: usize, align: usize) -> std::ops::Range<usize> {
    let cut = |i: usize| if i >= threads { n } else { (n * i / threads).next_multiple_of(align).min(n) };
    cut(t)..cut(t + 1)
}

/// An f32 buffer the team's threads share under the phase rule of the module doc.
pub struct Shared(UnsafeCell<Vec<f32>>);

// SAFETY: access follows the phase rule (module doc): concurrent accesses within a phase are reads
// only, or writes to disjoint parts; barriers order the phases (acquire/release on the generation).
unsafe impl Sync for Shared {}

impl Shared {
    pub fn new(len: usize) -> Self {
        Shared(UnsafeCell::new(vec![0f32; len]))
    }

    pub fn from_vec(v: Vec<f32>) -> Self {
        Shared(UnsafeCell::new(v))
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.0.into_inner()
    }

    /// The whole buffer, for reading.
    ///
    /// # Safety
    /// No thread writes the buffer in this phase.
    pub unsafe fn get(&self) -> &[f32] {
        // SAFETY: the caller's contract.
        unsafe { &*self.0.get() }
    }

    /// `range` of the buffer, for writing.
    ///
    /// # Safety
    /// No other thread reads or writes `range` in this phase.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, range: std::ops::Range<usize>) -> &mut [f32] {
        // SAFETY: the caller's contract; the pointer stays within the vector (checked by the slice
        // bounds below before any access).
        unsafe {
            let v = &mut *self.0.get();
            assert!(range.end <= v.len(), "team buffer: {range:?} out of {}", v.len());
            std::slice::from_raw_parts_mut(v.as_mut_ptr().add(range.start), range.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_range_in_order() {
        for (n, threads, align) in [(960, 2, 4), (10, 3, 4), (3, 4, 1), (0, 2, 4), (1536, 7, 16)] {
            let parts: Vec<_> = (0..threads).map(|t| part(n, t, threads, align)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[threads - 1].end, n);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
        }
    }

    #[test]
    fn phases_see_each_others_writes() {
        let n = 64;
        let (a, b) = (Shared::new(n), Shared::new(n));
        run(|team, t| {
            for round in 0..50 {
                let r = part(n, t, team.threads(), 1);
                // SAFETY: disjoint parts of `a`; `b` is not read in this phase.
                unsafe { a.part(r.clone()).iter_mut().for_each(|v| *v = round as f32) };
                if !team.barrier() {
                    return;
                }
                // SAFETY: `a` is only read in this phase.
                let sum: f32 = unsafe { a.get() }.iter().sum();
                // SAFETY: disjoint parts of `b`, not read in this phase.
                unsafe { b.part(r).iter_mut().for_each(|v| *v = sum) };
                if !team.barrier() {
                    return;
                }
            }
        })
        .unwrap();
        assert!(b.into_vec().iter().all(|&v| v == 49.0 * n as f32));
    }

    /// Teams started from several threads at once (each a team of one while another runs) all finish.
    #[test]
    fn concurrent_teams_finish() {
        let sums: Vec<f32> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    let n = 256;
                    let a = Shared::new(n);
                    for _ in 0..200 {
                        run(|team, t| {
                            let r = part(n, t, team.threads(), 1);
                            // SAFETY: disjoint parts of `a`.
                            unsafe { a.part(r).iter_mut().for_each(|v| *v += 1.0) };
                            team.barrier();
                        })
                        .unwrap();
                    }
                    a.into_vec().iter().sum()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert!(sums.iter().all(|&s| s == 200.0 * 256.0), "{sums:?}");
        // The same from inside rayon's workers (teams started by parallel jobs).
        use rayon::prelude::*;
        let total: f32 = (0..8)
            .into_par_iter()
            .map(|_| {
                let a = Shared::new(64);
                run(|team, t| {
                    // SAFETY: disjoint parts of `a`.
                    unsafe { a.part(part(64, t, team.threads(), 1)).iter_mut().for_each(|v| *v += 1.0) };
                    team.barrier();
                })
                .unwrap();
                a.into_vec().iter().sum::<f32>()
            })
            .sum();
        assert_eq!(total, 8.0 * 64.0);
    }

    #[test]
    fn a_panic_aborts_every_thread() {
        let got = run(|team, t| {
            if t == 0 {
                panic!("boom");
            }
            for _ in 0..3 {
                if !team.barrier() {
                    return;
                }
            }
        });
        assert_eq!(got, Err("team thread 0 panicked".to_string()));
    }
}
