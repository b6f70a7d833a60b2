//! Refusal Lens application: the egui GUI (`gui`), which sends jobs to the worker thread
//! (`worker`) that owns the model, and the headless CLI (`cli`), which calls the engine
//! directly. Both reach every number through the same engine functions.

pub mod cli;
pub mod gui;
pub mod session_file;
pub mod worker;

/// Pins candle's thread count once, before any thread starts (a no-op when
/// `RAYON_NUM_THREADS` is set). Without it candle parses /proc/cpuinfo on every matmul
/// (measured: 9 of 32 s when collecting 480 prompts). `leave_one_for_ui` keeps a core for the
/// GUI thread: with every core busy-waiting in rayon, a 2-core machine rendering in software
/// generated 4 tok/s instead of 82.
pub fn pin_thread_count(leave_one_for_ui: bool) {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let cores = candle_core::utils::get_num_threads();
    let n = if leave_one_for_ui {
        cores.saturating_sub(1).max(1)
    } else {
        cores
    };
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}
