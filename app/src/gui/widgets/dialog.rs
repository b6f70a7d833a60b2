//! File dialogs off the UI thread: rfd's dialogs block until the user answers, so each runs
//! on its own thread and the panel polls for the answer every frame.

use crossbeam_channel::Receiver;

/// An open dialog (or anything else run off the UI thread) and its answer, once given.
pub struct Pending<T>(Receiver<T>);

impl<T: Send + 'static> Pending<T> {
    /// Runs `ask` (which shows a dialog and maybe reads what was picked) on its own thread.
    pub fn spawn(ask: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(ask());
        });
        Pending(rx)
    }

    /// The answer, the first time it is polled after the dialog closed.
    pub fn poll(&self) -> Option<T> {
        self.0.try_recv().ok()
    }
}
