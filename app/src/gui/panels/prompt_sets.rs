//! Left panel, below the model: loaded prompt sets. Clicking a prompt puts it in the editor.

use std::path::PathBuf;

use refusal_lens_engine::data::prompts::{Label, PromptSet};

use super::super::widgets::dialog::Pending;

#[derive(Default)]
pub struct PromptSetsPanel {
    pub sets: Vec<PromptSet>,
    pub error: Option<String>,
    /// A file dialog + parse running on its own thread.
    loading: Option<Pending<Option<Result<PromptSet, String>>>>,
}

impl PromptSetsPanel {
    /// Loads the project's own sets when the app runs from the repository.
    pub fn with_bundled_sets() -> Self {
        let dir = refusal_lens_engine::data::prompts::sample_prompts_dir();
        let sets = ["harmful", "harmless", "borderline"]
            .iter()
            .filter_map(|name| PromptSet::load(&dir.join(format!("{name}.jsonl")), None).ok())
            .collect();
        PromptSetsPanel {
            sets,
            ..Default::default()
        }
    }

    pub fn is_busy(&self) -> bool {
        self.loading.is_some()
    }

    fn open_dialog(&mut self) {
        self.loading = Some(Pending::spawn(move || {
            let picked: Option<PathBuf> = rfd::FileDialog::new()
                .set_title("Load prompt set")
                .add_filter("Prompt sets", &["jsonl", "json", "csv", "tsv", "txt"])
                .pick_file();
            picked.map(|p| PromptSet::load(&p, None).map_err(|e| e.to_string()))
        }));
    }

    fn poll(&mut self) {
        let Some(pending) = &self.loading else { return };
        let Some(result) = pending.poll() else { return };
        self.loading = None;
        match result {
            Some(Ok(set)) => {
                self.error = None;
                self.sets.retain(|s| s.path != set.path);
                self.sets.push(set);
            }
            Some(Err(e)) => self.error = Some(e),
            None => {}
        }
    }

    /// Draws the panel; returns a prompt the user clicked.
    pub fn ui(&mut self, ui: &mut egui::Ui) -> Option<String> {
        self.poll();
        let mut picked = None;
        ui.heading("Prompt sets");
        if ui
            .add_enabled(
                self.loading.is_none(),
                egui::Button::new("Load prompt set…"),
            )
            .on_hover_text("JSONL, CSV/TSV, JSON or TXT with a prompt / goal / instruction column")
            .clicked()
        {
            self.open_dialog();
        }
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        for set in &self.sets {
            let harmful = set
                .records
                .iter()
                .filter(|r| r.label == Some(Label::Harmful))
                .count();
            egui::CollapsingHeader::new(format!(
                "{} ({} prompts, {harmful} harmful)",
                set.name,
                set.len()
            ))
            .id_salt(&set.path)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .max_height(220.0)
                    .id_salt(&set.path)
                    .show(ui, |ui| {
                        for r in &set.records {
                            let tag = r.category.as_deref().unwrap_or("");
                            if ui
                                .add(
                                    egui::Label::new(egui::RichText::new(&r.prompt).small())
                                        .truncate()
                                        .sense(egui::Sense::click()),
                                )
                                .on_hover_text(format!("{} · {tag} · {:?}", r.id, r.split))
                                .clicked()
                            {
                                picked = Some(r.prompt.clone());
                            }
                        }
                    });
            });
        }
        picked
    }
}
