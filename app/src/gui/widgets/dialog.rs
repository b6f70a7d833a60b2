//! File dialogs off the UI thread: rfd's dialogs block until the user answers, so each runs
//! on its own thread and the panel polls for the answer every frame.

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::Receiver;

/// Answers spawned and not yet taken: while there are any, the shell keeps polling (the
/// threads cannot wake the UI themselves).
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// True while some [`Pending`] answer has not been taken.
pub fn any_waiting() -> bool {
    WAITING.load(Ordering::Relaxed) > 0
}

/// An open dialog (or anything else run off the UI thread) and its answer, once given.
pub struct Pending<T> {
    answer: Receiver<T>,
    taken: std::cell::Cell<bool>,
}

impl<T: Send + 'static> Pending<T> {
    /// Runs `ask` (which shows a dialog and maybe reads what was picked) on its own thread.
    pub fn spawn(ask: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        WAITING.fetch_add(1, Ordering::Relaxed);
        std::thread::spawn(move || {
            let _ = tx.send(ask());
        });
        Pending {
            answer: rx,
            taken: std::cell::Cell::new(false),
        }
    }

    /// The answer, the first time it is polled after the dialog closed.
    pub fn poll(&self) -> Option<T> {
        let answer = self.answer.try_recv().ok();
        if answer.is_some() && !self.taken.replace(true) {
            WAITING.fetch_sub(1, Ordering::Relaxed);
        }
        answer
    }
}

impl<T> Drop for Pending<T> {
    fn drop(&mut self) {
        if !self.taken.get() {
            WAITING.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
