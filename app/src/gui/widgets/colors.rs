//! The two colour scales and their legends: the refusal scale shared by the Cliff's token
//! chips and the heatmaps (blue, answers, through white to red, refuses), and the token
//! probability scale of the reply's chips.

use egui::{Color32, Rect, Sense, Stroke, Vec2};

/// Colour of a score in `[0, 1]` (clamped; NaN is grey).
pub fn score_color(p: f32) -> Color32 {
    if !p.is_finite() {
        return Color32::GRAY;
    }
    let p = p.clamp(0.0, 1.0);
    let (blue, red) = ([49.0, 104.0, 176.0], [200.0, 50.0, 45.0]);
    let white = [245.0, 245.0, 245.0];
    let (from, to, t) = if p < 0.5 {
        (blue, white, p / 0.5)
    } else {
        (white, red, (p - 0.5) / 0.5)
    };
    let mix = |i: usize| (from[i] + (to[i] - from[i]) * t) as u8;
    Color32::from_rgb(mix(0), mix(1), mix(2))
}

/// Text colour readable on [`score_color`].
pub fn text_on(p: f32) -> Color32 {
    if (0.2..=0.8).contains(&p) {
        Color32::BLACK
    } else {
        Color32::WHITE
    }
}

/// A horizontal gradient bar with ticks at 0, 0.5 and 1 and a caption.
pub fn legend(ui: &mut egui::Ui, caption: &str) {
    ui.horizontal(|ui| {
        ui.label(caption);
        let (rect, _) = ui.allocate_exact_size(Vec2::new(160.0, 14.0), Sense::hover());
        let painter = ui.painter_at(rect.expand(1.0));
        let steps = 40;
        for i in 0..steps {
            let x0 = rect.left() + rect.width() * i as f32 / steps as f32;
            let x1 = rect.left() + rect.width() * (i + 1) as f32 / steps as f32;
            let cell =
                Rect::from_min_max(egui::pos2(x0, rect.top()), egui::pos2(x1, rect.bottom()));
            painter.rect_filled(cell, 0.0, score_color((i as f32 + 0.5) / steps as f32));
        }
        painter.rect_stroke(
            rect,
            0.0,
            Stroke::new(1.0, Color32::GRAY),
            egui::StrokeKind::Inside,
        );
        ui.label("0 (answers) · 0.5 · 1 (refuses)");
    });
}

/// Low probability → warm red, high → cool blue (perceptually ordered, colour-blind safe ends).
pub fn probability_color(p: f32) -> egui::Color32 {
    let t = p.clamp(0.0, 1.0);
    let lerp = |a: f32, b: f32| (a + (b - a) * t) as u8;
    egui::Color32::from_rgb(lerp(200.0, 40.0), lerp(70.0, 110.0), lerp(50.0, 190.0))
}

/// The token-probability scale as 11 swatches from p = 0 to 1.
pub fn probability_legend(ui: &mut egui::Ui) {
    ui.label("p = 0");
    for i in 0..=10 {
        let (rect, _) = ui.allocate_exact_size(egui::vec2(10.0, 12.0), egui::Sense::hover());
        ui.painter()
            .rect_filled(rect, 0.0, probability_color(i as f32 / 10.0));
    }
    ui.label("1");
}
