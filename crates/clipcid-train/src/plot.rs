//! Loss curves of a run as a PNG (plotters).

use std::path::Path;

use plotters::prelude::*;

use crate::{StepMetrics, TrainError};

/// Draws the total loss and every loss term against the step, one colour each, into a PNG
/// (written to a temporary file, then renamed).
pub fn plot_loss_curves(path: &Path, history: &[StepMetrics]) -> Result<(), TrainError> {
    let fail = |m: String| {
        TrainError::Input(format!(
            "{}: cannot draw the loss curves: {m}",
            path.display()
        ))
    };
    if history.is_empty() {
        return Err(fail("no steps to plot".into()));
    }
    clipcid_plot::register_font().map_err(fail)?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![(
        "total".into(),
        history.iter().map(|m| (m.step as f64, m.loss)).collect(),
    )];
    let mut names: Vec<&String> = history.iter().flat_map(|m| m.terms.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        series.push((
            name.clone(),
            history
                .iter()
                .filter_map(|m| m.terms.get(name).map(|v| (m.step as f64, *v)))
                .collect(),
        ));
    }
    let values = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo.min(0.0), hi.max(lo + 1e-6) * 1.05)
    } else {
        (0.0, 1.0)
    };
    let x_max = history.iter().map(|m| m.step).max().unwrap_or(1).max(1) as f64;
    let x_min = history.iter().map(|m| m.step).min().unwrap_or(0) as f64;
    let draft = clipcid_plot::PngDraft::new(path);
    let tmp = draft.tmp();
    {
        let root = BitMapBackend::new(&tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("distillation loss", ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x_min..x_max.max(x_min + 1.0), lo..hi)
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        for (i, (name, points)) in series.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        root.present()
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
    }
    draft.commit().map_err(fail)
}
