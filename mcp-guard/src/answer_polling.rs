//! Waiting for an answer that is due within microseconds by polling for it instead of
//! sleeping (`daemon.answer_poll_us`): a server's answer to a call ([`AnswerPolling`]), and an
//! agent's next request after it was answered ([`Linger`]).
//!
//! On a virtual machine whose idle CPUs halt at once (KVM's `guest_halt_poll_ns` 0), every
//! sleep of a thread costs a wake-up through the hypervisor, 21–29 µs measured on the
//! benchmark machine, and a guarded call sleeps at least once more than a direct one. While a
//! call waits for a fast server (or for the daemon's acknowledgement of an audit record), its
//! task yields in a loop instead: at each turn the runtime polls its I/O driver without
//! blocking, so the answer is read as it arrives, by a CPU that never halted.
//!
//! Polling is bounded by the budget, and skipped for a peer whose answers usually take longer
//! than the budget, so a slow server costs no CPU. It takes effect only on a runtime with a
//! single worker thread (the stdio front; the daemon with `daemon.worker_threads` 1): with
//! more, the I/O driver may be held by another worker asleep in `epoll_wait`, which the answer
//! then wakes anyway.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

/// How one peer's answers are waited for.
#[derive(Debug)]
pub struct AnswerPolling {
    /// Longest time to poll; zero: never.
    budget: Duration,
    /// Moving average of how long this peer's answers took, in nanoseconds.
    typical_ns: AtomicU64,
}

impl AnswerPolling {
    /// Polls for up to `budget` where the runtime running the caller has one worker thread;
    /// otherwise never.
    pub fn new(budget: Duration) -> AnswerPolling {
        AnswerPolling::with_budget(on_one_worker(budget))
    }

    /// Never polls: every wait sleeps until woken.
    pub fn off() -> AnswerPolling {
        AnswerPolling::with_budget(Duration::ZERO)
    }

    fn with_budget(budget: Duration) -> AnswerPolling {
        AnswerPolling {
            budget,
            typical_ns: AtomicU64::new(0),
        }
    }

    /// Waits for what `receiver` gets: by polling while the answer is likely to come within
    /// the budget, then asleep. `None`: the sender is gone.
    pub async fn receive<T>(&self, receiver: oneshot::Receiver<T>) -> Option<T> {
        self.wait(receiver).await.ok()
    }

    /// Runs `future` to its end, polling it while its end is likely to come within the
    /// budget, then asleep until it is woken.
    pub async fn wait<F: Future>(&self, future: F) -> F::Output {
        let started = Instant::now();
        let mut future = std::pin::pin!(future);
        if self.worth_polling() {
            loop {
                let polled = std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx)));
                if let Poll::Ready(output) = polled.await {
                    self.learn(started.elapsed());
                    return output;
                }
                if started.elapsed() >= self.budget {
                    break;
                }
                // Gives this CPU to any other thread that is ready to run on it (the server
                // or the peer this call waits for may be one): a poller must not stand in
                // the way of what it waits for.
                std::thread::yield_now();
                // Lets the runtime poll its I/O driver without blocking, and run what became
                // ready (the task that reads the answer) before coming back here.
                tokio::task::yield_now().await;
            }
        }
        let output = future.await;
        self.learn(started.elapsed());
        output
    }

    fn worth_polling(&self) -> bool {
        !self.budget.is_zero() && self.typical_ns.load(Ordering::Relaxed) < self.budget_ns()
    }

    fn budget_ns(&self) -> u64 {
        self.budget.as_nanos().min(u64::MAX as u128) as u64
    }

    /// Folds one answer's time into the average (weight 1/8), capped so that a peer that was
    /// slow once (a long tool call) is polled for again after a few fast answers.
    fn learn(&self, took: Duration) {
        let took_ns = (took.as_nanos().min(u64::MAX as u128) as u64).min(self.budget_ns() * 4);
        let typical = self.typical_ns.load(Ordering::Relaxed);
        let updated = typical - typical / 8 + took_ns / 8;
        self.typical_ns.store(updated, Ordering::Relaxed);
    }
}

/// `budget` where the runtime running the caller has one worker thread, else zero: with
/// more, the I/O driver may be held by another worker asleep in `epoll_wait`, and polling
/// spares no wake-up.
fn on_one_worker(budget: Duration) -> Duration {
    let one_worker = tokio::runtime::Handle::try_current()
        .map(|runtime| runtime.metrics().num_workers() == 1)
        .unwrap_or(false);
    if one_worker { budget } else { Duration::ZERO }
}

/// How long after an agent was last answered its next request is polled for, instead of its
/// reader sleeping until the request comes (`daemon.answer_poll_us`, again).
///
/// An agent that has just been answered often sends its next request within microseconds; if
/// the reading thread has gone to sleep by then, that request costs a wake-up of a halted CPU.
/// Like [`AnswerPolling`], it takes effect only on a runtime with one worker thread. Shared by
/// the two halves of one agent's connection (stdin and stdout on the stdio front).
#[derive(Debug)]
pub struct Linger {
    budget: Duration,
    started: Instant,
    /// When the agent was last answered, in nanoseconds after `started`; 0: never.
    answered_ns: AtomicU64,
}

impl Linger {
    /// Lingers for up to `budget` where the runtime running the caller has one worker thread.
    pub fn new(budget: Duration) -> Linger {
        Linger {
            budget: on_one_worker(budget),
            started: Instant::now(),
            answered_ns: AtomicU64::new(0),
        }
    }

    /// Notes that the agent was just sent something.
    fn answered(&self) {
        if !self.budget.is_zero() {
            let now_ns = self.started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
            self.answered_ns.store(now_ns.max(1), Ordering::Relaxed);
        }
    }

    fn lingering(&self) -> bool {
        let answered_ns = self.answered_ns.load(Ordering::Relaxed);
        answered_ns != 0
            && self.started.elapsed()
                < Duration::from_nanos(answered_ns).saturating_add(self.budget)
    }

    /// After a read of the agent found nothing: while lingering, asks the runtime to poll the
    /// reading task again once it has polled its I/O driver without blocking, so the request
    /// is read as it comes.
    fn poll_again_soon(&self, cx: &mut std::task::Context<'_>) {
        if self.lingering() {
            // As in `AnswerPolling::wait`: a poller must not keep a thread that is ready to
            // run on this CPU (the agent, the server) from it.
            std::thread::yield_now();
            // A fresh `yield_now`, polled once, defers this task until after the runtime's
            // next non-blocking poll of its I/O driver.
            let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
        }
    }
}

/// One agent's connection, or one half of it, lingering after each write as [`Linger`] says.
#[derive(Debug)]
pub struct Lingering<T> {
    io: T,
    linger: Arc<Linger>,
}

impl<T> Lingering<T> {
    pub fn new(io: T, linger: Arc<Linger>) -> Lingering<T> {
        Lingering { io, linger }
    }

    fn note_written(&self, polled: &Poll<std::io::Result<usize>>) {
        if matches!(polled, Poll::Ready(Ok(written)) if *written > 0) {
            self.linger.answered();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lingering<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if polled.is_pending() {
            this.linger.poll_again_soon(cx);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Lingering<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note_written(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note_written(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Voluntary context switches of the calling thread so far: each is a sleep.
    fn sleeps_so_far() -> i64 {
        use nix::sys::resource::{UsageWho, getrusage};
        getrusage(UsageWho::RUSAGE_THREAD)
            .unwrap()
            .voluntary_context_switches()
    }

    /// How many times the thread slept while waiting for an answer that a socket brings.
    fn sleeps_waiting_for_a_socket(budget: Duration) -> i64 {
        current_thread().block_on(async {
            let polling = AnswerPolling::new(budget);
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let address = socket.local_addr().unwrap();
            let (answer, receiver) = oneshot::channel();
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                socket.recv(&mut byte).await.unwrap();
                answer.send(byte[0])
            });
            let peer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                socket.send_to(&[9], address).unwrap();
            });
            let before = sleeps_so_far();
            assert_eq!(polling.receive(receiver).await, Some(9));
            let slept = sleeps_so_far() - before;
            peer.join().unwrap();
            slept
        })
    }

    /// The fewest and the most sleeps of five waits. Either way one wait can mislead: a thread
    /// can block for reasons of its own process (a page fault waiting on the memory map's lock
    /// while other tests allocate), so a wait that polls may show a sleep polling did not
    /// cause; and a thread descheduled for longer than the peer's delay finds its answer
    /// already there, so a wait that does not poll may show none. A wait that polls shows no
    /// sleep at its fewest; one that does not poll shows some at its most.
    fn sleeps_of_five(mut sleeps: impl FnMut() -> i64) -> (i64, i64) {
        let counts: Vec<i64> = (0..5).map(|_| sleeps()).collect();
        let fewest = *counts.iter().min().unwrap();
        let most = *counts.iter().max().unwrap();
        (fewest, most)
    }

    fn sleeps_of_five_waits_for_a_socket(budget: Duration) -> (i64, i64) {
        sleeps_of_five(|| sleeps_waiting_for_a_socket(budget))
    }

    #[test]
    fn a_wait_that_polls_reads_the_answer_without_sleeping() {
        let (fewest, _) = sleeps_of_five_waits_for_a_socket(Duration::from_secs(30));
        assert_eq!(fewest, 0);
        let (_, most) = sleeps_of_five_waits_for_a_socket(Duration::ZERO);
        assert!(most > 0);
    }

    #[test]
    fn an_answer_that_comes_after_the_budget_is_still_received() {
        current_thread().block_on(async {
            let polling = AnswerPolling::new(Duration::from_micros(50));
            let (answer, receiver) = oneshot::channel();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                answer.send("late")
            });
            assert_eq!(polling.receive(receiver).await, Some("late"));
        });
    }

    #[test]
    fn a_dropped_sender_ends_the_wait() {
        current_thread().block_on(async {
            let polling = AnswerPolling::new(Duration::from_secs(5));
            let (answer, receiver) = oneshot::channel::<u8>();
            tokio::spawn(async move { drop(answer) });
            assert_eq!(polling.receive(receiver).await, None);
        });
    }

    #[test]
    fn a_peer_slower_than_the_budget_is_not_polled_for_until_it_is_fast_again() {
        let polling = AnswerPolling::with_budget(Duration::from_micros(100));
        assert!(polling.worth_polling());
        for _ in 0..8 {
            polling.learn(Duration::from_millis(50));
        }
        assert!(!polling.worth_polling());
        let mut fast_answers = 0;
        while !polling.worth_polling() {
            polling.learn(Duration::from_micros(10));
            fast_answers += 1;
            assert!(fast_answers < 64, "a fast peer must be polled for again");
        }
    }

    #[test]
    fn polling_is_off_on_a_runtime_with_several_workers() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let polling = runtime.block_on(async { AnswerPolling::new(Duration::from_secs(1)) });
        assert!(!polling.worth_polling());
        let one = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let polling = one.block_on(async { AnswerPolling::new(Duration::from_secs(1)) });
        assert!(polling.worth_polling());
    }

    #[test]
    fn off_never_polls() {
        assert!(!AnswerPolling::off().worth_polling());
    }

    /// How many times the thread slept reading a request that a peer sends 5 ms after the
    /// connection last wrote: `write_first` false leaves that write out.
    fn sleeps_reading_the_next_request(budget: Duration, write_first: bool) -> i64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        current_thread().block_on(async {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let ours = tokio::net::UnixStream::from_std(ours).unwrap();
            let mut ours = Lingering::new(ours, Arc::new(Linger::new(budget)));
            if write_first {
                ours.write_all(b"answer").await.unwrap();
            }
            let peer = std::thread::spawn(move || {
                use std::io::Write;
                std::thread::sleep(Duration::from_millis(5));
                (&theirs).write_all(b"next").unwrap();
                theirs
            });
            let before = sleeps_so_far();
            let mut request = [0u8; 4];
            ours.read_exact(&mut request).await.unwrap();
            let slept = sleeps_so_far() - before;
            assert_eq!(&request, b"next");
            drop(peer.join().unwrap());
            slept
        })
    }

    fn sleeps_of_five_reads_of_the_next_request(budget: Duration, write_first: bool) -> (i64, i64) {
        sleeps_of_five(|| sleeps_reading_the_next_request(budget, write_first))
    }

    #[test]
    fn a_connection_that_just_answered_reads_the_next_request_without_sleeping() {
        let long = Duration::from_secs(30);
        let (fewest, _) = sleeps_of_five_reads_of_the_next_request(long, true);
        assert_eq!(fewest, 0);
        // Nothing written yet: nobody was answered, so nothing is due.
        let (_, most) = sleeps_of_five_reads_of_the_next_request(long, false);
        assert!(most > 0);
        let (_, most) = sleeps_of_five_reads_of_the_next_request(Duration::ZERO, true);
        assert!(most > 0);
    }

    #[test]
    fn lingering_ends_with_its_budget_and_starts_again_with_the_next_answer() {
        current_thread().block_on(async {
            // Long enough that no descheduling between two statements outlasts it.
            let linger = Linger::new(Duration::from_secs(2));
            assert!(!linger.lingering());
            linger.answered();
            assert!(linger.lingering());
            tokio::time::sleep(Duration::from_millis(2100)).await;
            assert!(!linger.lingering());
            linger.answered();
            assert!(linger.lingering());
        });
    }

    #[test]
    fn lingering_is_off_on_a_runtime_with_several_workers() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let linger = runtime.block_on(async { Linger::new(Duration::from_secs(1)) });
        linger.answered();
        assert!(!linger.lingering());
    }
}
