//! Wall-clock phases of one call, printed to stderr when the environment variable `FERROVLM_TRACE` is
//! set (a developer's tool: where a training step or a prefill spends its time). Off, a mark costs one
//! branch on a cached flag.

use std::sync::OnceLock;
use std::time::Instant;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FERROVLM_TRACE").is_some_and(|v| !v.is_empty() && v != "0"))
}

/// Collects `(label, seconds since the previous mark)` and prints them in one line when dropped.
pub struct Phases {
    name: &'static str,
    last: Option<Instant>,
    parts: Vec<(&'static str, f64)>,
}

impl Phases {
    pub fn new(name: &'static str) -> Self {
        Self { name, last: enabled().then(Instant::now), parts: Vec::new() }
    }

    /// Ends the phase that ran since the previous mark (or since `new`) and names it; a label marked
    /// again (a phase of every layer) adds to its earlier total.
    pub fn mark(&mut self, label: &'static str) {
        if let Some(t) = self.last {
            let now = Instant::now();
            let secs = (now - t).as_secs_f64();
            match self.parts.iter_mut().find(|p| p.0 == label) {
                Some(p) => p.1 += secs,
                None => self.parts.push((label, secs)),
            }
            self.last = Some(now);
        }
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        if self.last.is_some() && !self.parts.is_empty() {
            let total: f64 = self.parts.iter().map(|p| p.1).sum();
            let parts: Vec<String> = self.parts.iter().map(|(l, s)| format!("{l} {:.3}", s)).collect();
            eprintln!("[ferrovlm trace] {}: {:.3} s = {}", self.name, total, parts.join(" + "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_marked_again_adds_to_its_total() {
        // As with FERROVLM_TRACE set: a running clock.
        let mut clock = Phases { name: "test", last: Some(Instant::now()), parts: Vec::new() };
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            clock.mark("a");
            clock.mark("b");
        }
        let labels: Vec<&str> = clock.parts.iter().map(|p| p.0).collect();
        assert_eq!(labels, ["a", "b"]);
        assert!(clock.parts[0].1 >= 0.006, "three sleeps of 2 ms summed: {}", clock.parts[0].1);
        clock.parts.clear(); // nothing printed on drop
    }
}
