//! Where the kernels run: a thread pool of a training's own, one training at a time, and the
//! allocator kept from returning tensor buffers to the OS.

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `work` on a thread pool of its own (as many threads as rayon's global pool), and
/// returns what it returns.
///
/// The kernels split each operation over the current pool. From a thread outside any pool,
/// each split is queued for the pool while the caller sleeps until the pool is done with it;
/// from a thread of the pool, the caller works on its own share of each split: 7% off a forward
/// pass at batch 16 × 17 tokens on two cores. The pool is `work`'s own rather than the global
/// one because a pool thread that waits for a split runs whatever else its pool has queued:
/// another stage's training queued there would start inside this one's wait and block on the
/// training slot ([`exclusive_device`]) that this one holds.
pub fn on_own_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("finetune-compute-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(|| with_partner_awake(work)),
        // Without threads to spare, the work still runs, as it did before pools: from here.
        Err(_) => work(),
    }
}

/// Runs `work` on this pool thread while another thread of the pool polls for work, so that
/// each split of an operation starts on two threads at once. Left alone, the other thread
/// sleeps whenever it finds nothing for a few dozen microseconds (the autodiff bookkeeping
/// between two kernels is often longer), and waking it (a futex wake, and on a virtual machine
/// the hypervisor's interrupt to a halted core) delayed its half of hundreds of splits a step.
/// The polling thread runs each split it finds, as a sleeping one would once woken.
///
/// A panic in `work` ends the poll too (the flag is raised on unwinding), so that `join`
/// returns and passes the panic on: without that the poll spun forever and the run hung.
fn with_partner_awake<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let owner = rayon::current_thread_index();
    let done = AtomicBool::new(false);
    let (result, ()) = rayon::join(
        || {
            let _raised_when_done = RaiseOnDrop(&done);
            work()
        },
        || {
            // Taken back by `work`'s own thread (while it waited on a split, or after), the
            // poll would wait on itself: it ends there at once.
            if rayon::current_thread_index() == owner {
                return;
            }
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Idle) {
                    std::hint::spin_loop();
                }
            }
        },
    );
    result
}

/// Raises its flag when dropped: at the end of the work, returned or unwinding.
struct RaiseOnDrop<'a>(&'a AtomicBool);

impl Drop for RaiseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Holds the process's one training slot. burn's CPU backend keeps one RNG for the process, so
/// two trainings at once would draw each other's dropout masks; `--jobs` parallelism still
/// applies to every other stage.
pub fn exclusive_device() -> std::sync::MutexGuard<'static, ()> {
    static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    DEVICE.lock().unwrap_or_else(|e| e.into_inner())
}

/// burn's CPU backend allocates a fresh buffer for every tensor, many of them megabytes. glibc
/// serves allocations above its mmap threshold (at most 32 MiB) with fresh pages and returns
/// freed heap tops to the OS, so every step paid page faults and zeroing for the same buffers
/// again (a tenth of a training step's CPU time). Keeping freed memory in the heap for reuse
/// costs some peak memory (fragmentation): the Amazon MiniLM run peaks at 650-750 MiB instead of
/// about 550 MiB, still under half of PyTorch's.
pub fn keep_freed_tensor_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes glibc's allocation thresholds, which is sound at any
            // time; later allocations follow the new ones.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{on_own_pool, with_partner_awake};
    use rayon::prelude::*;

    #[test]
    fn a_panic_in_the_work_reaches_the_caller_instead_of_hanging_the_pool() {
        // On its own thread, so that a regression (the poll spinning forever) fails the test
        // by the timeout instead of hanging the suite.
        let (sent, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(|| {
                on_own_pool(|| -> u64 {
                    let sum: u64 = (0..10_000u64).into_par_iter().sum();
                    panic!("the work failed after {sum}");
                })
            });
            let _ = sent.send(outcome.is_err());
        });
        let panicked = received
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("on_own_pool returned within a minute of the work's panic");
        assert!(panicked, "the panic reached on_own_pool's caller");
    }

    #[test]
    fn work_with_a_partner_awake_returns_its_result_on_any_pool() {
        // One thread (the poll never starts), two and four; nested splits that the partner
        // steals, and a result that needs every split.
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            for _ in 0..20 {
                let sum: u64 = pool.install(|| {
                    with_partner_awake(|| {
                        (0..100_000u64)
                            .into_par_iter()
                            .map(|x| (0..x % 7).into_par_iter().sum::<u64>())
                            .sum()
                    })
                });
                let expected: u64 = (0..100_000u64).map(|x| (0..x % 7).sum::<u64>()).sum();
                assert_eq!(sum, expected, "{threads} threads");
            }
        }
    }
}
