//! Shared helpers for the cross-crate tests: fixture paths, the default model, error metrics.

use std::path::PathBuf;

use candle_core::Tensor;
use refusal_lens_engine::model::FastPrecision;
use refusal_lens_engine::{default_model_path, LoadedModel, FETCH_COMMAND};

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The real default model. Its tests are a marked group (`--test real_model`); they fail,
/// rather than skip, when the model is missing, so a CI that forgot to fetch it is red.
pub fn default_model() -> LoadedModel {
    let path = default_model_path();
    assert!(
        path.exists(),
        "the default model is missing at {}; run `{FETCH_COMMAND}`",
        path.display()
    );
    LoadedModel::load(&path, FastPrecision::Auto).expect("loading the default model")
}

/// For a test binary with a single test: nothing else in its process competes for the cores,
/// so its kernels may use all of them. `tests/run.sh` runs every binary with one kernel
/// thread (`RAYON_NUM_THREADS=1`, as tests of one binary run side by side) and names the
/// machine's core count in `REFUSAL_LENS_SOLO_THREADS`; call this first thing in the test.
/// candle reads `RAYON_NUM_THREADS` at each matmul, rayon when its pool starts.
pub fn use_all_cores_when_alone() {
    if let Ok(n) = std::env::var("REFUSAL_LENS_SOLO_THREADS") {
        std::env::set_var("RAYON_NUM_THREADS", n);
    }
}

/// max |a − b| / max |b|: the error relative to the reference tensor's scale.
pub fn relative_error(ours: &Tensor, reference: &Tensor) -> f32 {
    let max_abs = |t: &Tensor| -> f32 {
        t.abs()
            .and_then(|a| a.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap()
    };
    max_abs(&(ours - reference).unwrap()) / max_abs(reference).max(1e-12)
}
