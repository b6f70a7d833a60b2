//! Widgets shared by the panels: the colour scales, plot exports, file dialogs and the
//! progress bar with its Cancel button.

pub mod colors;
pub mod dialog;
pub mod export;

/// A job's progress bar (`done / total`, with `text`) and its Cancel button; true when
/// Cancel was clicked.
pub fn progress_with_cancel(ui: &mut egui::Ui, done: usize, total: usize, text: String) -> bool {
    ui.add(
        egui::ProgressBar::new(done as f32 / total.max(1) as f32)
            .desired_width(220.0)
            .text(text),
    );
    ui.button("Cancel").clicked()
}

/// `s` cut to `n` characters, with an ellipsis when it was longer.
pub fn short(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        out.push('…');
    }
    out
}
