//! Report plots (plotters, built-in DejaVu font): per-class recall bars for one or more
//! models, and a confusion-matrix heatmap. Written to a temporary file, then renamed.

use std::path::Path;

use plotters::prelude::*;

use crate::EvalError;

fn fail(path: &Path) -> impl Fn(String) -> EvalError + '_ {
    move |m| EvalError::file(path, format!("cannot draw the plot: {m}"))
}

/// plotters centres a rotated axis label on its tick, so half of it would run into the plot
/// area; leading spaces (about two per letter: a space is narrower) move the text's start to
/// the tick.
fn pad_rotated(label: &str) -> String {
    format!("{}{label}", " ".repeat(2 * label.chars().count()))
}

fn finish(draft: clipcid_plot::PngDraft, path: &Path) -> Result<(), EvalError> {
    draft.commit().map_err(|e| EvalError::file(path, e))
}

/// Grouped bars: recall of each class (x) for each `(model name, per-class recall)` series.
pub fn plot_per_class_recall(
    path: &Path,
    title: &str,
    class_names: &[String],
    series: &[(&str, &[f64])],
) -> Result<(), EvalError> {
    let fail = fail(path);
    if class_names.is_empty() || series.is_empty() {
        return Err(fail("no classes or no models".into()));
    }
    if let Some((name, _)) = series.iter().find(|(_, r)| r.len() != class_names.len()) {
        return Err(fail(format!(
            "{name} has a recall count that is not one per class"
        )));
    }
    clipcid_plot::register_font().map_err(&fail)?;
    let n = class_names.len();
    let width = (120 + 28 * n * series.len().max(1)).clamp(640, 2400) as u32;
    let draft = clipcid_plot::PngDraft::new(path);
    let tmp = draft.tmp();
    {
        let root = BitMapBackend::new(&tmp, (width, 600)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(170)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..n as f64, 0f64..1.05)
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        let names = class_names.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            // Ticks at every half unit; only the class centres (x.5) get a name.
            .x_labels(2 * n + 1)
            .x_label_formatter(&|x| {
                let i = x.floor();
                if i < 0.0 || (x - i - 0.5).abs() > 0.01 {
                    return String::new();
                }
                pad_rotated(names.get(i as usize).map_or("", String::as_str))
            })
            .x_label_style(
                ("sans-serif", 12)
                    .into_font()
                    .transform(FontTransform::Rotate90),
            )
            .y_desc("recall")
            .draw()
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        let k = series.len() as f64;
        for (s, (name, recall)) in series.iter().enumerate() {
            let colour = Palette99::pick(s).to_rgba();
            chart
                .draw_series(recall.iter().enumerate().map(|(c, &r)| {
                    let x0 = c as f64 + 0.1 + 0.8 * s as f64 / k;
                    let x1 = x0 + 0.8 / k;
                    let r = if r.is_nan() { 0.0 } else { r };
                    Rectangle::new([(x0, 0.0), (x1, r)], colour.filled())
                }))
                .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        root.present()
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
    }
    finish(draft, path)
}

/// Heatmap of a confusion matrix (`confusion[truth][predicted]`), each row scaled by its
/// total; labelled axes for up to 60 classes.
pub fn plot_confusion(
    path: &Path,
    title: &str,
    class_names: &[String],
    confusion: &[Vec<u32>],
) -> Result<(), EvalError> {
    let fail = fail(path);
    let n = class_names.len();
    if n == 0 || confusion.len() != n || confusion.iter().any(|r| r.len() != n) {
        return Err(fail(format!("the confusion matrix is not {n} x {n}")));
    }
    clipcid_plot::register_font().map_err(&fail)?;
    let side = (160 + 18 * n).clamp(480, 1600) as u32;
    let draft = clipcid_plot::PngDraft::new(path);
    let tmp = draft.tmp();
    {
        let root = BitMapBackend::new(&tmp, (side + 40, side)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(170)
            .y_label_area_size(110)
            .build_cartesian_2d(0f64..n as f64, 0f64..n as f64)
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        // Row 0 (the first true class) at the top: y = n - 1 - truth.
        let label = |v: f64, flip: bool| {
            let i = v.floor();
            if (v - i - 0.5).abs() > 0.01 || i < 0.0 {
                return String::new();
            }
            let i = if flip { n as f64 - 1.0 - i } else { i } as usize;
            class_names.get(i).cloned().unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(2 * n + 1)
            .y_labels(2 * n + 1)
            .x_desc("predicted")
            .y_desc("true")
            .x_label_formatter(&|&x| pad_rotated(&label(x, false)))
            .y_label_formatter(&|&y| label(y, true))
            .x_label_style(
                ("sans-serif", 11)
                    .into_font()
                    .transform(FontTransform::Rotate90),
            )
            .y_label_style(("sans-serif", 11))
            .draw()
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        chart
            .draw_series(confusion.iter().enumerate().flat_map(|(t, row)| {
                let total = row.iter().sum::<u32>().max(1) as f64;
                let y = (n - 1 - t) as f64;
                row.iter().enumerate().map(move |(p, &c)| {
                    let shade = (255.0 * (1.0 - c as f64 / total)) as u8;
                    Rectangle::new(
                        [(p as f64, y), (p as f64 + 1.0, y + 1.0)],
                        RGBColor(shade, shade, 255).filled(),
                    )
                })
            }))
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        root.present()
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
    }
    finish(draft, path)
}
