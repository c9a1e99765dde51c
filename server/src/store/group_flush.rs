//! Group commit for the store's durable writes.
//!
//! Every write is followed by a flush (fsync) before it is acknowledged.
//! Concurrent writers share flushes: a writer takes a ticket after its
//! write is applied; a flush that *starts* after a ticket was taken makes
//! that write durable. One flush runs at a time; writers that arrive while
//! it runs wait, and the next flush (run by one of them) covers all of
//! them. Durability per write is unchanged; the number of fsyncs under
//! load drops from one per write to one per batch.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct State {
    /// The last ticket handed out.
    issued: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// A flush is running.
    flushing: bool,
}

/// Serialises flushes and lets concurrent writers share them.
#[derive(Debug, Default)]
pub struct GroupFlush {
    state: Mutex<State>,
    done: Condvar,
}

impl GroupFlush {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once a flush that started after this call has succeeded,
    /// running `flush` itself when no other flush is running. A failed
    /// flush is returned to the caller that ran it; the callers it would
    /// have covered try again themselves. Blocking.
    pub fn durable<E>(&self, flush: impl Fn() -> Result<(), E>) -> Result<(), E> {
        let mut s = self.lock();
        s.issued += 1;
        let ticket = s.issued;
        loop {
            if s.durable >= ticket {
                return Ok(());
            }
            if s.flushing {
                s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            s.flushing = true;
            // Every write whose ticket is at most `covers` was applied
            // before this flush starts.
            let covers = s.issued;
            drop(s);
            let result = flush();
            s = self.lock();
            s.flushing = false;
            if result.is_ok() {
                s.durable = s.durable.max(covers);
            }
            self.done.notify_all();
            result?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn one_writer_flushes_every_time() {
        let g = GroupFlush::default();
        let n = AtomicUsize::new(0);
        for _ in 0..3 {
            g.durable(|| {
                n.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>(())
            })
            .unwrap();
        }
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn concurrent_writers_share_flushes_and_each_is_covered() {
        let g = Arc::new(GroupFlush::default());
        // `written` counts applied writes; each flush records how many it
        // covered; each writer checks that some flush that started after
        // its write completed before it returned.
        let written = Arc::new(AtomicU64::new(0));
        let flushed_upto = Arc::new(AtomicU64::new(0));
        let flushes = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (g, written, flushed_upto, flushes) = (
                    Arc::clone(&g),
                    Arc::clone(&written),
                    Arc::clone(&flushed_upto),
                    Arc::clone(&flushes),
                );
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                        g.durable(|| {
                            let upto = written.load(Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(2));
                            flushes.fetch_add(1, Ordering::SeqCst);
                            flushed_upto.fetch_max(upto, Ordering::SeqCst);
                            Ok::<_, ()>(())
                        })
                        .unwrap();
                        assert!(flushed_upto.load(Ordering::SeqCst) >= mine);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!(n < 320, "{n} flushes for 320 writes: nothing was shared");
    }

    #[test]
    fn a_failed_flush_is_reported_and_retried_by_the_next_writer() {
        let g = GroupFlush::default();
        let fail = std::sync::atomic::AtomicBool::new(true);
        let r = g.durable(|| {
            if fail.swap(false, Ordering::SeqCst) {
                Err("disk full")
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err("disk full"));
        // The next writer is not covered by the failed flush: it flushes.
        let ran = AtomicUsize::new(0);
        g.durable(|| {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, &str>(())
        })
        .unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
