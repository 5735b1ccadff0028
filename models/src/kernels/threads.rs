//! A small persistent thread pool for the products, built for many short jobs.
//!
//! A decode step runs about 200 products of tens of microseconds each, so handing one to
//! another thread must cost far less than that. Here the calling thread never waits for a
//! worker to wake up: it offers the job, starts on its chunks at once, and workers join in
//! whenever they notice the offer; a worker that comes late finds nothing left and goes
//! back to waiting. Idle workers poll for a short while, yielding their core to any other
//! thread that wants it (candle runs its own operations on rayon's threads), then sleep.
//! (Handing products to rayon gained little from a second thread: its caller sleeps until
//! the job is done, and those wake-ups cost about as much as a small product.)
//!
//! Jobs are `'static` and shared through `Arc`s, so the pool needs no `unsafe`: a worker
//! still holding a finished job keeps it alive rather than dangling.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle worker keeps polling for the next job before it sleeps: longer than
/// the gaps between the products of one decode step, shorter than a human notices.
const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(500);

/// 0 until first asked for: then the number of threads products use.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Threads for products: candle's count (`RAYON_NUM_THREADS`, else the physical cores),
/// read once, as reading it takes the environment's lock.
pub(crate) fn num_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            let threads = candle_core::utils::get_num_threads().max(1);
            THREADS.store(threads, Ordering::Relaxed);
            threads
        }
        threads => threads,
    }
}

/// A job split into numbered chunks that any thread may take.
pub(crate) trait Job: Send + Sync + 'static {
    fn chunks(&self) -> &Chunks;
    fn run_chunk(&self, chunk: usize);
}

/// Hands out a job's chunks and counts those finished.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    total: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

impl Chunks {
    pub(crate) fn new(total: usize) -> Self {
        Self { total, ..Self::default() }
    }

    fn finished(&self) -> bool {
        // Acquire: pairs with the Release of each chunk's count, so its results are seen.
        self.done.load(Ordering::Acquire) == self.total
    }
}

/// Runs chunks of `job` until none are left. A panic in one is recorded, for the thread
/// that started the job to raise, and still counts the chunk as done.
fn help(job: &dyn Job) {
    let chunks = job.chunks();
    loop {
        let chunk = chunks.next.fetch_add(1, Ordering::Relaxed);
        if chunk >= chunks.total {
            return;
        }
        if catch_unwind(AssertUnwindSafe(|| job.run_chunk(chunk))).is_err() {
            chunks.panicked.store(true, Ordering::Relaxed);
        }
        chunks.done.fetch_add(1, Ordering::Release);
    }
}

/// Runs every chunk of `job`, on this thread and on up to `threads - 1` workers.
pub(crate) fn run(job: &Arc<dyn Job>, threads: usize) {
    if threads <= 1 || job.chunks().total <= 1 {
        help(job.as_ref());
    } else {
        pool(threads - 1).run(job);
    }
    if job.chunks().panicked.load(Ordering::Relaxed) {
        panic!("a quantized product panicked on a worker thread");
    }
}

/// The process's pool, started on first use with `workers` threads.
fn pool(workers: usize) -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::start(workers))
}

struct Pool {
    shared: Arc<Shared>,
    /// One job at a time: a thread finding the pool busy runs its job alone.
    busy: Mutex<()>,
}

#[derive(Default)]
struct Shared {
    /// The job on offer, if any.
    offer: Mutex<Option<Arc<dyn Job>>>,
    /// Bumped for each job offered, so polling workers notice without taking the lock.
    offers: AtomicUsize,
    /// Workers asleep (or about to be) on `wake`.
    sleeping: Mutex<usize>,
    wake: Condvar,
}

impl Pool {
    fn start(workers: usize) -> Self {
        let shared = Arc::new(Shared::default());
        for i in 0..workers {
            let shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("hearth-kernels-{i}"))
                .spawn(move || shared.work());
            if spawned.is_err() {
                // Fewer workers only means fewer helpers: every job still completes.
                break;
            }
        }
        Self { shared, busy: Mutex::new(()) }
    }

    fn run(&self, job: &Arc<dyn Job>) {
        let _turn = match self.busy.try_lock() {
            Ok(turn) => turn,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return help(job.as_ref()),
        };
        self.shared.offer(job);
        help(job.as_ref());
        // Only chunks that workers have already taken remain: wait for those.
        while !job.chunks().finished() {
            std::hint::spin_loop();
        }
        self.shared.withdraw();
    }
}

impl Shared {
    fn offer(&self, job: &Arc<dyn Job>) {
        *lock(&self.offer) = Some(Arc::clone(job));
        self.offers.fetch_add(1, Ordering::Release);
        if *lock(&self.sleeping) > 0 {
            self.wake.notify_all();
        }
    }

    fn withdraw(&self) {
        *lock(&self.offer) = None;
    }

    /// A worker's life: wait for an offer, help with it, repeat.
    fn work(&self) {
        let mut seen = self.offers.load(Ordering::Acquire);
        loop {
            seen = self.next_offer(seen);
            let job = lock(&self.offer).clone();
            if let Some(job) = job {
                help(job.as_ref());
            }
        }
    }

    /// Waits until an offer newer than `seen` is made; returns its number.
    fn next_offer(&self, seen: usize) -> usize {
        let polling_since = Instant::now();
        loop {
            let current = self.offers.load(Ordering::Acquire);
            if current != seen {
                return current;
            }
            if polling_since.elapsed() > POLL_BEFORE_SLEEP {
                break;
            }
            // Polling, but leaving the core to any thread that has real work.
            std::thread::yield_now();
        }
        let mut sleeping = lock(&self.sleeping);
        *sleeping += 1;
        // `offer` bumps `offers` before taking this lock to notify, so checking under the
        // lock cannot miss a wake-up.
        loop {
            let current = self.offers.load(Ordering::Acquire);
            if current != seen {
                *sleeping -= 1;
                return current;
            }
            sleeping = self.wake.wait(sleeping).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// Locks `mutex`, ignoring poisoning: nothing guarded here can be left half-updated.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
