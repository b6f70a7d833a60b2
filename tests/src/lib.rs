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

/// max |a − b| / max |b|: the error relative to the reference tensor's scale.
pub fn relative_error(ours: &Tensor, reference: &Tensor) -> f32 {
    let diff = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
}
