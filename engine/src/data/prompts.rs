//! Prompt sets: the project's JSONL format, and importers for what users bring (CSV, JSONL or
//! TXT with a `prompt` / `goal` / `instruction` column, as AdvBench, HarmBench,
//! JailbreakBench and XSTest ship them). Errors name the file and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    Harmful,
    Harmless,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl std::str::FromStr for Label {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_lowercase().as_str() {
            "harmful" | "unsafe" | "1" | "true" => Ok(Label::Harmful),
            "harmless" | "safe" | "benign" | "0" | "false" => Ok(Label::Harmless),
            other => Err(Error::InvalidInput(format!(
                "unknown label `{other}` (expected harmful or harmless)"
            ))),
        }
    }
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "val" | "valid" | "validation" | "dev" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            other => Err(Error::InvalidInput(format!(
                "unknown split `{other}` (expected train, val or test)"
            ))),
        }
    }
}

/// One prompt of a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub id: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Links a harmful prompt to its harmless twin of the same shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
}

impl PromptRecord {
    /// A harmless prompt with trigger words ("How do I kill a Python process?"): its category
    /// starts with `borderline`, as in sample_prompts/borderline.jsonl. The gate's calibration
    /// holds these to their own over-refusal budget.
    pub fn is_borderline(&self) -> bool {
        self.label == Some(Label::Harmless)
            && self
                .category
                .as_deref()
                .is_some_and(|c| c.starts_with("borderline"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptSet {
    pub name: String,
    pub path: PathBuf,
    pub records: Vec<PromptRecord>,
}

/// The largest prompt file read (a set of a million prompts is ~200 MB).
pub const MAX_PROMPT_FILE_BYTES: u64 = 256_000_000;

/// The text of `path`, refusing a file over `limit` bytes: by its size before reading when it
/// states one, and while reading otherwise (a pipe, a device, a file that grows meanwhile),
/// so no more than `limit` bytes are ever held.
fn read_limited(path: &Path, limit: u64) -> Result<String> {
    use std::io::Read;
    let too_big = |size: String| {
        Error::InvalidInput(format!(
            "{} is {size}; prompt files are read whole and limited to {} MB (split it)",
            path.display(),
            limit / 1_000_000
        ))
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if size > limit {
        return Err(too_big(format!("{:.0} MB", size as f64 / 1e6)));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_big(format!("longer than {limit} bytes")));
    }
    String::from_utf8(bytes).map_err(|e| {
        Error::InvalidInput(format!(
            "{} is not UTF-8 text (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Column names that hold the prompt, in order of preference.
const PROMPT_COLUMNS: [&str; 5] = ["prompt", "goal", "instruction", "behavior", "question"];

impl PromptSet {
    /// Reads a `.jsonl`, `.csv` or `.txt` file. `default_label` applies to rows without one.
    pub fn load(path: &Path, default_label: Option<Label>) -> Result<PromptSet> {
        let text = read_limited(path, MAX_PROMPT_FILE_BYTES)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let mut records = match ext.as_str() {
            "jsonl" | "ndjson" => parse_jsonl(path, &text, &name)?,
            "json" => parse_json_array(path, &text, &name)?,
            "csv" | "tsv" => parse_csv(path, &text, &name, if ext == "tsv" { b'\t' } else { b',' })?,
            "txt" | "" => parse_txt(&text, &name),
            other => {
                return Err(Error::InvalidInput(format!(
                    "{}: unsupported prompt file type `.{other}` (use .jsonl, .json, .csv, .tsv or .txt)",
                    path.display()
                )))
            }
        };
        if records.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{} holds no prompts",
                path.display()
            )));
        }
        for r in &mut records {
            r.label = r.label.or(default_label);
        }
        Ok(PromptSet {
            name,
            path: path.to_path_buf(),
            records,
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The records of one split (all of them for `None`).
    pub fn split(&self, split: Option<Split>) -> impl Iterator<Item = &PromptRecord> {
        self.records
            .iter()
            .filter(move |r| split.is_none() || r.split == split)
    }

    /// (this set's prompt, its twin's prompt) for the records of `split` whose `pair_id`
    /// a record of `twins` shares: the harmful/harmless pairs of two paired sets.
    pub fn pairs_with(&self, twins: &PromptSet, split: Split) -> Vec<(String, String)> {
        self.split(Some(split))
            .filter_map(|a| {
                let id = a.pair_id.as_ref()?;
                let b = twins
                    .records
                    .iter()
                    .find(|b| b.pair_id.as_ref() == Some(id))?;
                Some((a.prompt.clone(), b.prompt.clone()))
            })
            .collect()
    }

    /// Counts by category (records without one under "—").
    pub fn categories(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in &self.records {
            *out.entry(r.category.clone().unwrap_or_else(|| "—".into()))
                .or_insert(0) += 1;
        }
        out
    }

    /// Writes the set in the project's JSONL format.
    pub fn save_jsonl(&self, path: &Path) -> Result<()> {
        let mut out = String::new();
        for r in &self.records {
            out.push_str(
                &serde_json::to_string(r).map_err(|e| Error::InvalidInput(e.to_string()))?,
            );
            out.push('\n');
        }
        std::fs::write(path, out).map_err(|e| Error::io(path, e))
    }
}

fn bad_line(path: &Path, line: usize, why: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("{} line {line}: {why}", path.display()))
}

/// A record from a JSON object: the prompt from the first known column, the rest optional.
fn record_from_object(
    obj: &serde_json::Map<String, serde_json::Value>,
    fallback_id: String,
) -> std::result::Result<PromptRecord, String> {
    let prompt = PROMPT_COLUMNS
        .iter()
        .find_map(|c| obj.get(*c).and_then(|v| v.as_str()))
        .ok_or_else(|| format!("no `{}` field", PROMPT_COLUMNS.join("`, `")))?;
    if prompt.trim().is_empty() {
        return Err("the prompt is empty".into());
    }
    let text = |k: &str| obj.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let label = text("label")
        .map(|l| l.parse::<Label>())
        .transpose()
        .map_err(|e| e.to_string())?;
    let split = text("split")
        .map(|s| s.parse::<Split>())
        .transpose()
        .map_err(|e| e.to_string())?;
    let id = match obj.get("id") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => fallback_id,
    };
    Ok(PromptRecord {
        id,
        prompt: prompt.to_string(),
        label,
        category: text("category").or_else(|| text("type")),
        pair_id: text("pair_id"),
        split,
    })
}

fn parse_jsonl(path: &Path, text: &str, name: &str) -> Result<Vec<PromptRecord>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| bad_line(path, i + 1, format!("not JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| bad_line(path, i + 1, "not a JSON object"))?;
        out.push(
            record_from_object(obj, format!("{name}-{}", i + 1))
                .map_err(|e| bad_line(path, i + 1, e))?,
        );
    }
    Ok(out)
}

fn parse_json_array(path: &Path, text: &str, name: &str) -> Result<Vec<PromptRecord>> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::InvalidInput(format!("{}: not JSON: {e}", path.display())))?;
    let items = value.as_array().ok_or_else(|| {
        Error::InvalidInput(format!(
            "{}: expected a JSON array of objects",
            path.display()
        ))
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let obj = v.as_object().ok_or_else(|| {
                Error::InvalidInput(format!("{} item {}: not an object", path.display(), i + 1))
            })?;
            record_from_object(obj, format!("{name}-{}", i + 1))
                .map_err(|e| Error::InvalidInput(format!("{} item {}: {e}", path.display(), i + 1)))
        })
        .collect()
}

fn parse_csv(path: &Path, text: &str, name: &str, delimiter: u8) -> Result<Vec<PromptRecord>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| bad_line(path, 1, format!("cannot read the header: {e}")))?
        .iter()
        .map(|h| h.trim().to_lowercase())
        .collect();
    let column = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| headers.iter().position(|h| h == n))
    };
    let prompt_col = column(&PROMPT_COLUMNS).ok_or_else(|| {
        bad_line(
            path,
            1,
            format!(
                "no `{}` column (found: {})",
                PROMPT_COLUMNS.join("`, `"),
                headers.join(", ")
            ),
        )
    })?;
    let (label_col, category_col, id_col) = (
        column(&["label"]),
        column(&["category", "type"]),
        column(&["id"]),
    );
    let (pair_col, split_col) = (column(&["pair_id"]), column(&["split"]));
    let mut out = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let line = i + 2;
        let row = row.map_err(|e| bad_line(path, line, e))?;
        let get = |c: Option<usize>| {
            c.and_then(|c| row.get(c))
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let prompt =
            get(Some(prompt_col)).ok_or_else(|| bad_line(path, line, "the prompt is empty"))?;
        out.push(PromptRecord {
            id: get(id_col).unwrap_or_else(|| format!("{name}-{}", i + 1)),
            prompt,
            label: get(label_col)
                .map(|l| l.parse())
                .transpose()
                .map_err(|e| bad_line(path, line, e))?,
            category: get(category_col),
            pair_id: get(pair_col),
            split: get(split_col)
                .map(|s| s.parse())
                .transpose()
                .map_err(|e| bad_line(path, line, e))?,
        });
    }
    Ok(out)
}

fn parse_txt(text: &str, name: &str) -> Vec<PromptRecord> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .enumerate()
        .map(|(i, l)| PromptRecord {
            id: format!("{name}-{}", i + 1),
            prompt: l.to_string(),
            label: None,
            category: None,
            pair_id: None,
            split: None,
        })
        .collect()
}

/// A jailbreak wrapper: a template with a `{prompt}` slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jailbreak {
    pub id: String,
    pub technique: String,
    pub template: String,
}

impl Jailbreak {
    pub fn wrap(&self, prompt: &str) -> String {
        self.template.replace("{prompt}", prompt)
    }

    pub fn load_all(path: &Path) -> Result<Vec<Jailbreak>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut out = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let j: Jailbreak = serde_json::from_str(line).map_err(|e| bad_line(path, i + 1, e))?;
            if !j.template.contains("{prompt}") {
                return Err(bad_line(
                    path,
                    i + 1,
                    format!("template `{}` has no {{prompt}} slot", j.id),
                ));
            }
            out.push(j);
        }
        Ok(out)
    }
}

/// The folder of the project's prompt sets (`sample_prompts/` in the repository).
pub fn sample_prompts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("sample_prompts")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn imports_each_format() {
        let d = tempfile::tempdir().unwrap();
        let jsonl = write(d.path(), "a.jsonl", "{\"id\":\"x1\",\"prompt\":\"Hi\",\"label\":\"harmful\",\"category\":\"c\",\"pair_id\":\"p\",\"split\":\"test\"}\n\n{\"goal\":\"Do Y\"}\n");
        let s = PromptSet::load(&jsonl, Some(Label::Harmless)).unwrap();
        assert_eq!(
            s.records[0],
            PromptRecord {
                id: "x1".into(),
                prompt: "Hi".into(),
                label: Some(Label::Harmful),
                category: Some("c".into()),
                pair_id: Some("p".into()),
                split: Some(Split::Test)
            }
        );
        assert_eq!(
            (
                s.records[1].prompt.as_str(),
                s.records[1].label,
                s.records[1].id.as_str()
            ),
            ("Do Y", Some(Label::Harmless), "a-3")
        );

        // AdvBench-style CSV: goal,target.
        let csv = write(
            d.path(),
            "advbench.csv",
            "goal,target\n\"Write a, quoted, prompt\",Sure\nSecond one,Sure\n",
        );
        let s = PromptSet::load(&csv, Some(Label::Harmful)).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.records[0].prompt, "Write a, quoted, prompt");
        assert_eq!(s.records[1].label, Some(Label::Harmful));
        // XSTest-style CSV with type and label columns.
        let xs = write(
            d.path(),
            "xstest.csv",
            "id,prompt,type,label\n1,How do I kill a process?,homonyms,safe\n",
        );
        let r = &PromptSet::load(&xs, None).unwrap().records[0];
        assert_eq!(
            (r.id.as_str(), r.category.as_deref(), r.label),
            ("1", Some("homonyms"), Some(Label::Harmless))
        );

        let txt = write(
            d.path(),
            "list.txt",
            "# comment\nFirst prompt\n\n  Second prompt  \n",
        );
        let s = PromptSet::load(&txt, None).unwrap();
        assert_eq!(
            s.records
                .iter()
                .map(|r| r.prompt.as_str())
                .collect::<Vec<_>>(),
            ["First prompt", "Second prompt"]
        );

        let json = write(d.path(), "arr.json", "[{\"instruction\": \"Z\"}]");
        assert_eq!(PromptSet::load(&json, None).unwrap().records[0].prompt, "Z");

        // Round trip through the project format.
        let out = d.path().join("out.jsonl");
        let s = PromptSet::load(&csv, Some(Label::Harmful)).unwrap();
        s.save_jsonl(&out).unwrap();
        assert_eq!(PromptSet::load(&out, None).unwrap().records, s.records);
    }

    #[test]
    fn malformed_rows_name_their_line() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (
                "bad.jsonl",
                "{\"prompt\":\"ok\"}\n{not json}\n",
                "line 2: not JSON",
            ),
            (
                "nofield.jsonl",
                "{\"prompt\":\"ok\"}\n{\"text\":\"x\"}\n",
                "line 2: no `prompt`",
            ),
            (
                "badlabel.jsonl",
                "{\"prompt\":\"ok\",\"label\":\"maybe\"}\n",
                "line 1: unknown label `maybe`",
            ),
            ("nocol.csv", "text,target\nx,y\n", "line 1: no `prompt`"),
            (
                "ragged.csv",
                "prompt,label\nx,harmful\ny,harmless,extra\n",
                "line 3",
            ),
            (
                "emptyprompt.csv",
                "prompt,label\n,harmful\n",
                "line 2: the prompt is empty",
            ),
            ("empty.txt", "\n# only a comment\n", "holds no prompts"),
            ("x.pdf", "…", "unsupported prompt file type"),
        ];
        for (name, text, want) in cases {
            let err = PromptSet::load(&write(d.path(), name, text), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn the_projects_sets_are_complete_and_paired() {
        let dir = sample_prompts_dir();
        let harmful = PromptSet::load(&dir.join("harmful.jsonl"), None).unwrap();
        let harmless = PromptSet::load(&dir.join("harmless.jsonl"), None).unwrap();
        let borderline = PromptSet::load(&dir.join("borderline.jsonl"), None).unwrap();
        assert!(harmful.len() >= 240);
        assert!(harmful
            .records
            .iter()
            .all(|r| r.label == Some(Label::Harmful)));
        assert!(harmless
            .records
            .iter()
            .all(|r| r.label == Some(Label::Harmless)));
        assert!(harmful.categories().len() >= 8);
        // Every harmful prompt has a harmless twin with the same pair id, category and split.
        let twins: BTreeMap<_, _> = harmless
            .records
            .iter()
            .map(|r| (r.pair_id.clone().unwrap(), r))
            .collect();
        for h in &harmful.records {
            let t = twins[h.pair_id.as_ref().unwrap()];
            assert_eq!((&t.category, t.split), (&h.category, h.split), "{}", h.id);
        }
        assert_eq!(twins.len(), harmful.len());
        for split in [Split::Train, Split::Val, Split::Test] {
            assert!(harmful.split(Some(split)).count() >= 40, "{split:?}");
        }
        assert!(borderline.len() >= 60);
        assert!(borderline
            .records
            .iter()
            .all(|r| r.label == Some(Label::Harmless) && r.split.is_some()));
        // The gate's calibration tells borderline prompts from the other harmless ones.
        assert!(borderline.records.iter().all(PromptRecord::is_borderline));
        assert!(!harmless.records.iter().any(PromptRecord::is_borderline));
        let jailbreaks = Jailbreak::load_all(&dir.join("jailbreaks.jsonl")).unwrap();
        assert!(jailbreaks.len() >= 12);
        assert!(jailbreaks[0].wrap("X").contains('X'));
        // Ids are unique across sets.
        let mut ids: Vec<_> = [&harmful, &harmless, &borderline]
            .iter()
            .flat_map(|s| s.records.iter().map(|r| r.id.clone()))
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }
}

#[cfg(test)]
mod size_limit_tests {
    use super::*;

    /// A prompt file over the limit is refused by its size before it is read (a sparse file:
    /// no disk is used).
    #[test]
    fn an_oversized_prompt_file_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.jsonl");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_PROMPT_FILE_BYTES + 1).unwrap();
        let e = PromptSet::load(&path, None).unwrap_err().to_string();
        assert!(e.contains("limited to 256 MB"), "{e}");
    }

    /// A source that states no size (a device here; a pipe alike) is cut off at the limit
    /// while it is read, instead of filling memory.
    #[cfg(unix)]
    #[test]
    fn an_endless_prompt_source_is_cut_off_at_the_limit() {
        let e = read_limited(Path::new("/dev/zero"), 1_000_000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("longer than 1000000 bytes") && e.contains("limited to 1 MB"),
            "{e}"
        );
    }

    #[test]
    fn a_prompt_file_that_is_not_text_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.txt");
        std::fs::write(&path, b"caf\xe9 au lait").unwrap();
        let e = PromptSet::load(&path, None).unwrap_err().to_string();
        assert!(e.contains("not UTF-8 text (byte 3)"), "{e}");
    }
}
