//! Harness: the allocation cap, proptest's configuration, per-case checks and counts.

use super::*;

// ---------------------------------------------------------------------------------------------
// Harness: allocation cap, configuration, per-case checks
// ---------------------------------------------------------------------------------------------

/// Refuses single allocations over the cap, so that a giant allocation claimed by a file fails the
/// same way on every machine (whatever its memory and overcommit) instead of passing or swapping.
pub(crate) struct CappedAlloc;

pub(crate) static ALLOC_CAP: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TARGET: Cell<&'static str> = const { Cell::new("") };
}

pub(crate) fn alloc_cap() -> usize {
    match ALLOC_CAP.load(Ordering::Relaxed) {
        0 => usize::MAX,
        n => n,
    }
}

pub(crate) fn refuse(size: usize) {
    let mut buf = [0u8; 256];
    let mut w: &mut [u8] = &mut buf;
    let target = TARGET.try_with(Cell::get).ok().filter(|t| !t.is_empty()).unwrap_or("? (a worker thread)");
    let _ = write!(w, "\nfuzz_parsers: target '{target}' asked for {size} bytes at once (cap {}); rerun with FERROVLM_FUZZ_VERBOSE=1\n", alloc_cap());
    let n = 256 - w.len();
    let _ = std::io::stderr().write_all(&buf[..n]);
}

// SAFETY: forwards to the system allocator; only refuses (null) allocations over the cap.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > alloc_cap() {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > alloc_cap() {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > alloc_cap() {
            refuse(new_size);
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
pub(crate) static GLOBAL: CappedAlloc = CappedAlloc;

pub(crate) fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

pub(crate) fn cases() -> u32 {
    env_u64("FERROVLM_FUZZ_CASES", 256) as u32
}

pub(crate) fn verbose() -> bool {
    std::env::var("FERROVLM_FUZZ_VERBOSE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Deterministic proptest config: fixed seed per target, no persistence files.
pub(crate) fn config(salt: u64) -> Config {
    Config {
        cases: cases(),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(env_u64("FERROVLM_FUZZ_SEED", 0x5eed_f022).wrapping_mul(31).wrapping_add(salt)),
        max_shrink_time: 120_000,
        max_shrink_iters: 4096,
        ..Config::default()
    }
}

/// Runs `test` on `cases()` inputs from `strategy`; panics (the runner catches them and shrinks the
/// input), slow cases and failed checks fail the test with the minimal input.
pub(crate) fn fuzz<S>(
    target: &'static str,
    salt: u64,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    ALLOC_CAP.store((env_u64("FERROVLM_FUZZ_ALLOC_GIB", 8) as usize).saturating_mul(1 << 30), Ordering::Relaxed);
    let slow = Duration::from_secs(env_u64("FERROVLM_FUZZ_SLOW_SECS", 30));
    let mut runner = TestRunner::new(config(salt));
    let start = Instant::now();
    let result = runner.run(&strategy, |input| {
        TARGET.with(|t| t.set(target));
        if verbose() {
            eprintln!("[{target}] {input:?}");
        }
        let t0 = Instant::now();
        test(input)?;
        let took = t0.elapsed();
        prop_assert!(took < slow, "{target}: one case took {took:?} (limit {slow:?}): a hang or a quadratic path");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{target}: {e}");
    }
    eprintln!("[{target}] {} cases in {:.1?}: {}", cases(), start.elapsed(), stats_line(target));
}

/// (target, call) -> (ok, err) counts, printed after each target to show how deep the cases got.
pub(crate) type Counts = BTreeMap<(&'static str, &'static str), (u32, u32)>;
pub(crate) static STATS: Mutex<Counts> = Mutex::new(BTreeMap::new());

pub(crate) fn count(what: &'static str, ok: bool) {
    let target = TARGET.with(Cell::get);
    let mut stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
    let slot = stats.entry((target, what)).or_default();
    if ok {
        slot.0 += 1;
    } else {
        slot.1 += 1;
    }
}

pub(crate) fn stats_line(target: &str) -> String {
    let stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
    let parts: Vec<String> =
        stats.iter().filter(|((t, _), _)| *t == target).map(|((_, w), (o, e))| format!("{w} {o} ok/{e} err")).collect();
    parts.join(", ")
}

/// The call returned Ok or a typed, non-empty error that is not an internal (tensor) failure.
pub(crate) fn check<T, E: Into<Error>>(what: &'static str, r: Result<T, E>) -> Result<Option<T>, TestCaseError> {
    count(what, r.is_ok());
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let e: Error = e.into();
            let msg = e.to_string();
            if std::env::var("FERROVLM_FUZZ_VERBOSE").is_ok_and(|v| v == "2") {
                eprintln!("  {what}: {}", msg.chars().take(300).collect::<String>());
            }
            prop_assert!(!msg.trim().is_empty(), "{what}: empty error message: {e:?}");
            prop_assert!(
                !matches!(e, Error::Tensor(_)),
                "{what}: bad input surfaced as an internal tensor error: {msg}"
            );
            Ok(None)
        }
    }
}

pub(crate) fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub(crate) fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let p = path.as_ref();
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
