//! A saved session: one versioned JSON file holding what a user set up (model and adapter,
//! prompt, system message, sampling, loaded prompt sets, directions and probes, the
//! intervention stack, ablated heads and the view), so that it all comes back after a
//! restart. Files it refers to are recorded with their SHA-256 and checked on open: a
//! missing or changed file is a clear error, never a silent substitute. The GUI saves and
//! opens these; the CLI takes `--session FILE` for the model, adapter and lens.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use refusal_lens_engine::analysis::steering::Edit;
use refusal_lens_engine::run::generate::Sampling;

/// What the first line of every session file says it is.
pub const FORMAT: &str = "refusal-lens-session";
/// The version this build writes and the newest it reads.
pub const VERSION: u32 = 1;

/// A file a session refers to, as it was when the session was saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRef {
    pub path: PathBuf,
    /// SHA-256 of the file, or of every file of a folder in name order.
    pub sha256: String,
}

impl FileRef {
    pub fn of(path: &Path) -> Result<FileRef> {
        Ok(FileRef {
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            sha256: sha256(path)?,
        })
    }

    /// Fails with a one-line reason when the file is gone or differs from the saved one.
    pub fn check(&self, what: &str) -> Result<()> {
        if !self.path.exists() {
            bail!(
                "the session's {what} {} is missing (moved or deleted since the session was saved)",
                self.path.display()
            );
        }
        if sha256(&self.path)? != self.sha256 {
            bail!(
                "the session's {what} {} has changed since the session was saved",
                self.path.display()
            );
        }
        Ok(())
    }
}

/// SHA-256 of a file, or of every file of a folder in name order.
pub fn sha256(path: &Path) -> Result<String> {
    Ok(refusal_lens_engine::organism::model_sha256(path)?)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub file: FileRef,
    /// The refusal-token adapter folder loaded beside the model, if any.
    pub adapter: Option<FileRef>,
    /// The adapted model (the organism) is the one in use.
    pub adapter_active: bool,
}

/// Directions and the probes beside them (see `analysis::lens::probes_path`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LensRef {
    pub directions: FileRef,
    pub probes: Option<FileRef>,
    /// The layer the Cliff curves read, when not the directions' chosen one.
    pub curve_layer: Option<usize>,
}

/// The Prompt & reply tab's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplySettings {
    pub prompt: String,
    pub system: String,
    pub use_system: bool,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub tau: f32,
    pub opener_bias: f32,
}

/// The Steering tab's sliders and switches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SteeringSettings {
    pub alpha_refusal: f32,
    pub alpha_harmfulness: f32,
    pub layers: Option<(usize, usize)>,
    pub ablate: bool,
    pub post_instruction_only: bool,
    pub refusal_bias: f32,
    pub max_new_tokens: usize,
    /// Run the main reply under the intervention stack.
    pub steer_main_reply: bool,
    /// Compute the sliders' next values' prompt passes while idle (sessions saved before
    /// this setting existed get it on).
    #[serde(default = "on")]
    pub compute_ahead: bool,
}

fn on() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionFile {
    pub format: String,
    pub version: u32,
    pub model: ModelRef,
    /// Prompt sets loaded in the left panel, in order.
    pub sets: Vec<FileRef>,
    pub lens: Option<LensRef>,
    pub reply: ReplySettings,
    pub steering: SteeringSettings,
    /// Edits added beside the sliders: the heads ablated in the Head attribution tab.
    pub head_edits: Vec<Edit>,
    /// The tab shown (its name as the tab bar spells it).
    pub tab: String,
}

impl SessionFile {
    /// Writes the session atomically: to a temporary file beside it, then renamed over it,
    /// so a crash mid-write leaves the previous session intact.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        let tmp = path.with_extension("session-partial");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads a session and checks every file it refers to.
    pub fn open(path: &Path) -> Result<SessionFile> {
        let session = Self::read(path)?;
        session.check()?;
        Ok(session)
    }

    /// Reads a session without checking the files it refers to.
    pub fn read(path: &Path) -> Result<SessionFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read session {}", path.display()))?;
        let head: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a session file (not JSON)", path.display()))?;
        if head.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            bail!("{} is not a Refusal Lens session file", path.display());
        }
        let version = head.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version == 0 || version > VERSION as u64 {
            bail!(
                "{} is a session of version {version}; this build reads versions 1 to {VERSION}",
                path.display()
            );
        }
        serde_json::from_value(head).with_context(|| format!("{}: bad session", path.display()))
    }

    /// Every referenced file is where it was and unchanged.
    pub fn check(&self) -> Result<()> {
        self.model.file.check("model")?;
        if let Some(a) = &self.model.adapter {
            a.check("adapter")?;
        }
        for s in &self.sets {
            s.check("prompt set")?;
        }
        if let Some(lens) = &self.lens {
            lens.directions.check("directions file")?;
            if let Some(p) = &lens.probes {
                p.check("probes file")?;
            }
        }
        Ok(())
    }
}

/// The session fuzz target (`fuzz/`) and its corpus replay: `data` as a session file, read
/// and checked; it must end in a clean error or a session, never a panic.
pub fn fuzz_read(data: &[u8]) {
    let path = std::env::temp_dir().join(format!("refusal-lens-fuzz-{}.json", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        if let Ok(s) = SessionFile::read(&path) {
            let _ = s.check();
        }
    }
}

/// The sessions opened or saved most recently, newest first, kept in the cache folder.
pub struct RecentSessions {
    file: PathBuf,
}

impl RecentSessions {
    pub const MAX: usize = 8;

    pub fn new(cache_dir: &Path) -> RecentSessions {
        RecentSessions {
            file: cache_dir.join("recent-sessions.json"),
        }
    }

    pub fn list(&self) -> Vec<PathBuf> {
        std::fs::read_to_string(&self.file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Puts `path` first. A list that cannot be written is not worth an error.
    pub fn add(&self, path: &Path) {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut list = self.list();
        list.retain(|p| p != &path);
        list.insert(0, path);
        list.truncate(Self::MAX);
        if let Some(dir) = self.file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(text) = serde_json::to_string_pretty(&list) {
            let tmp = self.file.with_extension("json-partial");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &self.file);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(dir: &Path) -> SessionFile {
        let model = dir.join("m.gguf");
        std::fs::write(&model, b"weights").unwrap();
        SessionFile {
            format: FORMAT.into(),
            version: VERSION,
            model: ModelRef {
                file: FileRef::of(&model).unwrap(),
                adapter: None,
                adapter_active: false,
            },
            sets: Vec::new(),
            lens: None,
            reply: ReplySettings {
                prompt: "p".into(),
                system: String::new(),
                use_system: false,
                max_new_tokens: 8,
                sampling: Sampling::default(),
                tau: 0.5,
                opener_bias: 0.0,
            },
            steering: SteeringSettings {
                alpha_refusal: 0.0,
                alpha_harmfulness: 0.0,
                layers: None,
                ablate: false,
                post_instruction_only: false,
                refusal_bias: 0.0,
                max_new_tokens: 8,
                steer_main_reply: false,
                compute_ahead: true,
            },
            head_edits: Vec::new(),
            tab: "Cliff".into(),
        }
    }

    #[test]
    fn a_session_round_trips_and_its_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = session(dir.path());
        let path = dir.path().join("s.json");
        s.save(&path).unwrap();
        assert_eq!(SessionFile::open(&path).unwrap(), s);
        assert!(!path.with_extension("session-partial").exists());
        std::fs::write(dir.path().join("m.gguf"), b"other weights").unwrap();
        let e = SessionFile::open(&path).unwrap_err().to_string();
        assert!(e.contains("model") && e.contains("has changed"), "{e}");
        std::fs::remove_file(dir.path().join("m.gguf")).unwrap();
        let e = SessionFile::open(&path).unwrap_err().to_string();
        assert!(e.contains("is missing"), "{e}");
        // Read without checks, it still parses.
        assert_eq!(SessionFile::read(&path).unwrap(), s);
    }

    #[test]
    fn other_files_and_newer_versions_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, "not json").unwrap();
        assert!(SessionFile::read(&path)
            .unwrap_err()
            .to_string()
            .contains("not JSON"));
        std::fs::write(&path, r#"{"format": "something-else"}"#).unwrap();
        assert!(SessionFile::read(&path)
            .unwrap_err()
            .to_string()
            .contains("not a Refusal Lens session"));
        let mut v = serde_json::to_value(session(dir.path())).unwrap();
        v["version"] = (VERSION + 1).into();
        std::fs::write(&path, v.to_string()).unwrap();
        let e = SessionFile::read(&path).unwrap_err().to_string();
        assert!(e.contains(&format!("version {}", VERSION + 1)), "{e}");
    }

    /// The session fuzz target's seeds, corpus and crash reproducers (`fuzz/`) replay without
    /// a panic; the seed parses.
    #[test]
    fn session_fuzz_inputs_replay() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let seed = root.join("seeds/session/session.json");
        assert!(SessionFile::read(&seed).is_ok(), "the seed is a session");
        let mut n = 0;
        for kind in ["seeds", "corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join("session")) else {
                continue;
            };
            for f in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
                let data = std::fs::read(&f).unwrap();
                assert!(
                    std::panic::catch_unwind(|| fuzz_read(&data)).is_ok(),
                    "{} panicked",
                    f.display()
                );
                n += 1;
            }
        }
        assert!(n > 0);
    }

    #[test]
    fn recent_sessions_are_newest_first_without_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let recent = RecentSessions::new(dir.path());
        for name in ["a", "b", "a"] {
            let p = dir.path().join(name);
            std::fs::write(&p, "").unwrap();
            recent.add(&p);
        }
        let names: Vec<_> = recent
            .list()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
