//! Small safetensors files of f32 arrays plus one JSON metadata entry: how directions, probes
//! and cached activations are saved. The metadata says what made the arrays (model
//! fingerprint, prompt sets, settings), so a file can be checked before it is used.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{de::DeserializeOwned, Serialize};

use crate::{Error, Result};

/// The metadata key holding the JSON document.
const META_KEY: &str = "refusal_lens";

/// One named f32 array with its shape.
pub struct Array {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Array {
    pub fn new(name: &str, shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Array {
            name: name.to_string(),
            shape,
            data,
        }
    }
}

pub fn save(path: &Path, arrays: &[Array], meta: &impl Serialize) -> Result<()> {
    let bytes: Vec<Vec<u8>> = arrays
        .iter()
        .map(|a| a.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = arrays
        .iter()
        .zip(&bytes)
        .map(|(a, b)| {
            TensorView::new(Dtype::F32, a.shape.clone(), b)
                .map(|v| (a.name.clone(), v))
                .map_err(|e| Error::InvalidInput(format!("{}: {e}", a.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta_json = serde_json::to_string(meta)
        .map_err(|e| Error::InvalidInput(format!("cannot encode metadata: {e}")))?;
    let meta = HashMap::from([(META_KEY.to_string(), meta_json)]);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    // Write beside the target and rename, so an interrupted save never leaves half a file.
    // The temporary name is this process's and this call's own: two writers of one file
    // (two app instances sharing the cache) never write into the same temporary file.
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("safetensors.{}-{n}.partial", std::process::id()));
    if let Err(e) = safetensors::serialize_to_file(views, Some(meta), &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::InvalidInput(format!("{}: {e}", tmp.display())));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads every array and the metadata, failing with a one-line reason on a bad file.
pub fn load<M: DeserializeOwned>(path: &Path) -> Result<(HashMap<String, Array>, M)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |why: String| Error::InvalidInput(format!("{}: {why}", path.display()));
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let meta_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| bad("no Refusal Lens metadata (was it saved by refusal-lens?)".into()))?;
    let meta: M = serde_json::from_str(meta_json).map_err(|e| bad(format!("bad metadata: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut arrays = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!("{name} is {:?}, expected F32", view.dtype())));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let shape = view.shape().to_vec();
        arrays.insert(name.clone(), Array { name, shape, data });
    }
    Ok((arrays, meta))
}

/// Takes array `name` from a loaded file, checking its shape.
pub fn take(
    arrays: &mut HashMap<String, Array>,
    path: &Path,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let a = arrays
        .remove(name)
        .ok_or_else(|| Error::InvalidInput(format!("{}: no array `{name}`", path.display())))?;
    if a.shape != shape {
        return Err(Error::InvalidInput(format!(
            "{}: `{name}` has shape {:?}, expected {shape:?}",
            path.display(),
            a.shape
        )));
    }
    Ok(a.data)
}
