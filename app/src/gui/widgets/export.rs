//! Exports of plots: the data as CSV, the picture as PNG (a screenshot of the window cropped
//! to the plot). File dialogs run on their own thread (see `dialog`).

use std::path::PathBuf;

use crossbeam_channel::Receiver;

use super::dialog::Pending;

enum Payload {
    Csv(String),
    Png(egui::Rect),
}

/// One pending export per panel: a dialog, then (for PNG) a screenshot.
#[derive(Default)]
pub struct Exporter {
    dialog: Option<(Pending<Option<PathBuf>>, Payload)>,
    /// The result of a PNG write, reported by the screenshot callback.
    png_result: Option<Receiver<String>>,
    pub message: Option<String>,
}

fn save_dialog(default_name: &str, ext: &'static str) -> Pending<Option<PathBuf>> {
    let name = default_name.to_string();
    Pending::spawn(move || {
        rfd::FileDialog::new()
            .set_file_name(name)
            .add_filter(ext.to_uppercase(), &[ext])
            .save_file()
    })
}

impl Exporter {
    pub fn csv(&mut self, default_name: &str, csv: String) {
        self.dialog = Some((save_dialog(default_name, "csv"), Payload::Csv(csv)));
    }

    pub fn png(&mut self, default_name: &str, rect: egui::Rect) {
        self.dialog = Some((save_dialog(default_name, "png"), Payload::Png(rect)));
    }

    /// Buttons for both exports of one plot.
    pub fn buttons(
        &mut self,
        ui: &mut egui::Ui,
        name: &str,
        rect: Option<egui::Rect>,
        csv: impl FnOnce() -> String,
    ) {
        if ui.button("Export CSV…").clicked() {
            self.csv(&format!("{name}.csv"), csv());
        }
        if let Some(rect) = rect {
            if ui.button("Export PNG…").clicked() {
                self.png(&format!("{name}.png"), rect);
            }
        }
    }

    /// Drives the pending export; call once per frame.
    pub fn poll(&mut self, ctx: &egui::Context) {
        if let Some((pending, _)) = &self.dialog {
            if let Some(picked) = pending.poll() {
                let (_, payload) = self.dialog.take().expect("checked above");
                if let Some(path) = picked {
                    match payload {
                        Payload::Csv(text) => {
                            self.message = Some(match std::fs::write(&path, text) {
                                Ok(()) => format!("wrote {}", path.display()),
                                Err(e) => format!("cannot write {}: {e}", path.display()),
                            })
                        }
                        Payload::Png(rect) => {
                            let (tx, rx) = crossbeam_channel::bounded(1);
                            let ppp = ctx.pixels_per_point();
                            let repaint = ctx.clone();
                            ctx.request_screenshot(move |image| {
                                let _ = tx.send(write_png(&image, rect, ppp, &path));
                                repaint.request_repaint();
                            });
                            self.png_result = Some(rx);
                        }
                    }
                }
            } else {
                ctx.request_repaint_after(std::time::Duration::from_millis(100));
            }
        }
        if let Some(rx) = &self.png_result {
            if let Ok(message) = rx.try_recv() {
                self.message = Some(message);
                self.png_result = None;
            }
        }
    }
}

/// Crops the window screenshot to `rect` (points) and writes it as PNG.
fn write_png(
    image: &egui::ColorImage,
    rect: egui::Rect,
    ppp: f32,
    path: &std::path::Path,
) -> String {
    let region = image.region(&rect, Some(ppp));
    let [w, h] = region.size;
    let bytes: Vec<u8> = region.pixels.iter().flat_map(|c| c.to_array()).collect();
    match image::save_buffer(path, &bytes, w as u32, h as u32, image::ColorType::Rgba8) {
        Ok(()) => format!("wrote {}", path.display()),
        Err(e) => format!("cannot write {}: {e}", path.display()),
    }
}
