//! Refusal Lens application: the egui GUI (`gui`), which sends jobs to the worker thread
//! (`worker`) that owns the model, and the headless CLI (`cli`), which calls the engine
//! directly. Both reach every number through the same engine functions.

pub mod cli;
pub mod gui;
pub mod session_file;
pub mod worker;

/// Pins candle's thread count once, before any thread starts (a no-op when
/// `RAYON_NUM_THREADS` is set). Without it candle parses /proc/cpuinfo on every matmul
/// (measured: 9 of 32 s when collecting 480 prompts). The global rayon pool gets every core;
/// with `gui`, the matrix products then use one fewer until the worker says otherwise (see
/// [`set_kernel_threads`]).
pub fn pin_thread_count(gui: bool) {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let cores = candle_core::utils::get_num_threads();
    std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    candle_core::utils::init_global_threadpool();
    CORES.store(cores, std::sync::atomic::Ordering::Relaxed);
    if gui {
        set_kernel_threads(false);
    }
}

/// The cores [`pin_thread_count`] found (0: it left the count to `RAYON_NUM_THREADS`).
static CORES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many threads the worker's matrix products use from now on: every core for analyses,
/// during which the UI draws only progress frames (≤ 4 per second), and for a reply's prompt
/// pass, during which it waits idle; one fewer (`streaming`) once tokens stream to a UI
/// repainting up to 30 times a second,
/// which would otherwise fight rayon's spinning threads for a core (measured on 2 cores with
/// software rendering: 4 tok/s instead of 82). candle reads the count from
/// `RAYON_NUM_THREADS` on every product. The variable exists from start-up, so changing it
/// only swaps a value (glibc never frees the strings it replaced, so a concurrent `getenv`
/// from another thread stays valid). A no-op when the user set `RAYON_NUM_THREADS`.
pub fn set_kernel_threads(streaming: bool) {
    let cores = CORES.load(std::sync::atomic::Ordering::Relaxed);
    if cores == 0 {
        return;
    }
    let n = if streaming {
        cores.saturating_sub(1).max(1)
    } else {
        cores
    };
    if std::env::var("RAYON_NUM_THREADS").ok() != Some(n.to_string()) {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
