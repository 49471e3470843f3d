//! Cluster-size histogram (the paper's Figure 2d: sizes before and after balancing).

use std::path::Path;

use plotters::prelude::*;

use crate::ClusterError;

/// Bins of the size axis.
const BINS: u32 = 40;

/// Draws a PNG histogram of cluster sizes: x = points in a cluster (40 equal bins), y =
/// number of clusters. Each `(label, sizes)` series is one translucent colour, so a run
/// before balancing and one after can be compared in one picture. The font (DejaVu Sans) is
/// built in, so no system fonts are needed. Written to a temporary file, then renamed.
pub fn plot_size_histogram(
    path: &Path,
    title: &str,
    series: &[(&str, &[u32])],
) -> Result<(), ClusterError> {
    let fail = |message: String| ClusterError::Plot {
        path: path.display().to_string(),
        message,
    };
    if series.is_empty() || series.iter().all(|(_, s)| s.is_empty()) {
        return Err(fail("no cluster sizes to plot".into()));
    }
    clipcid_plot::register_font().map_err(fail)?;
    let max_size = series
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let width = max_size.div_ceil(BINS).max(1);
    let counts: Vec<Vec<u32>> = series
        .iter()
        .map(|(_, sizes)| {
            let mut c = vec![0u32; BINS as usize + 1];
            for &s in sizes.iter() {
                c[(s / width).min(BINS) as usize] += 1;
            }
            c
        })
        .collect();
    let y_max = counts.iter().flatten().copied().max().unwrap_or(1).max(1);
    let draft = clipcid_plot::PngDraft::new(path);
    let tmp = draft.tmp();
    {
        let root = BitMapBackend::new(&tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0u32..(BINS + 1) * width, 0u32..y_max + y_max / 10 + 1)
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        chart
            .configure_mesh()
            .x_desc("points in cluster")
            .y_desc("clusters")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?;
        let palette = [BLUE, RED, GREEN, MAGENTA];
        for (i, ((label, _), c)) in series.iter().zip(&counts).enumerate() {
            let colour = palette[i % palette.len()];
            chart
                .draw_series(c.iter().enumerate().filter(|(_, &v)| v > 0).map(|(b, &v)| {
                    let x0 = b as u32 * width;
                    Rectangle::new([(x0, 0), (x0 + width, v)], colour.mix(0.45).filled())
                }))
                .map_err(|e| fail(clipcid_plot::drawing_error(&e)))?
                .label(label.to_string())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 12, y + 6)], colour.mix(0.45).filled())
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
