//! `edgegate-bench plot`: draws the benchmark results (the `key=value`
//! lines the modes print) as one SVG: uplink msgs/s and ack p99 against the
//! number of connections, beside the raw producer's rate, and the outbox
//! and RSS during a replay. A hundred lines of SVG instead of a plotting
//! crate keep the binary and the build small.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One result line: `mode=uplink connections=50 msgs_per_sec=...`.
pub type Fields = BTreeMap<String, String>;

pub fn parse_line(line: &str) -> Option<Fields> {
    let fields: Fields = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    fields.contains_key("mode").then_some(fields)
}

fn num(f: &Fields, key: &str) -> Option<f64> {
    f.get(key)?.parse().ok()
}

struct Series {
    name: String,
    color: &'static str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// The SVG for the result lines in `text`.
pub fn svg(text: &str) -> String {
    let lines: Vec<Fields> = text.lines().filter_map(parse_line).collect();
    let of = |mode: &'static str| lines.iter().filter(move |f| f["mode"] == mode);

    // Mean per connection count, for runs repeated in rounds.
    let mut sweep: BTreeMap<u64, (f64, f64, u32)> = BTreeMap::new();
    for f in of("uplink") {
        if let (Some(c), Some(rate), Some(p99)) = (
            num(f, "connections"),
            num(f, "msgs_per_sec"),
            num(f, "p99_ms"),
        ) {
            let e = sweep.entry(c as u64).or_default();
            e.0 += rate;
            e.1 += p99;
            e.2 += 1;
        }
    }
    let rates: Vec<f64> = of("raw").filter_map(|f| num(f, "msgs_per_sec")).collect();
    let raw_mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    let xs: Vec<f64> = sweep.keys().map(|c| *c as f64).collect();
    let throughput = vec![
        Series {
            name: "edgegate uplink (durable acks)".into(),
            color: "#1f77b4",
            dashed: false,
            points: sweep
                .iter()
                .map(|(c, (r, _, n))| (*c as f64, r / f64::from(*n)))
                .collect(),
        },
        Series {
            name: "raw librdkafka producer (mean)".into(),
            color: "#7f7f7f",
            dashed: true,
            points: xs.iter().map(|x| (*x, raw_mean)).collect(),
        },
    ];
    let latency = vec![Series {
        name: "ack latency p99".into(),
        color: "#d62728",
        dashed: false,
        points: sweep
            .iter()
            .map(|(c, (_, p, n))| (*c as f64, p / f64::from(*n)))
            .collect(),
    }];

    // Replay: "t:records:rss_kib,..." from the drain mode.
    // The first replay (the build under test; a later one may be the
    // static build's).
    let curve: Vec<(f64, f64, f64)> = of("drain")
        .next()
        .and_then(|f| f.get("curve"))
        .map(|c| {
            c.split(',')
                .filter_map(|s| {
                    let mut p = s.split(':').map(|v| v.parse::<f64>().ok());
                    Some((p.next()??, p.next()??, p.next()??))
                })
                .collect()
        })
        .unwrap_or_default();
    let backlog = vec![Series {
        name: "records in the outbox".into(),
        color: "#2ca02c",
        dashed: false,
        points: curve.iter().map(|(t, n, _)| (*t, *n)).collect(),
    }];
    let rss = vec![Series {
        name: "gateway RSS".into(),
        color: "#9467bd",
        dashed: false,
        points: curve.iter().map(|(t, _, r)| (*t, r / 1024.0)).collect(),
    }];

    let (w, h) = (1000.0, 720.0);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
"#
    );
    panel(
        &mut out,
        (60.0, 40.0),
        "Uplink throughput",
        "connections (log)",
        "msgs/s",
        &throughput,
        true,
    );
    panel(
        &mut out,
        (560.0, 40.0),
        "Ack latency, p99",
        "connections (log)",
        "ms",
        &latency,
        true,
    );
    panel(
        &mut out,
        (60.0, 400.0),
        "Replay: backlog",
        "seconds since the gateway came up",
        "records",
        &backlog,
        false,
    );
    panel(
        &mut out,
        (560.0, 400.0),
        "Replay: memory",
        "seconds since the gateway came up",
        "MiB",
        &rss,
        false,
    );
    out.push_str("</svg>\n");
    out
}

const PW: f64 = 380.0;
const PH: f64 = 240.0;

fn panel(
    out: &mut String,
    (x0, y0): (f64, f64),
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    xlog: bool,
) {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut xmin, mut xmax, mut ymax) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in points {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymax = ymax.max(y);
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="14" font-weight="bold">{title}</text>"#,
        x0,
        y0 - 12.0
    );
    let _ = writeln!(
        out,
        r##"<rect x="{x0}" y="{y0}" width="{PW}" height="{PH}" fill="none" stroke="#333"/>"##
    );
    if xmin > xmax {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}">no data</text>"#,
            x0 + 10.0,
            y0 + 20.0
        );
        return;
    }
    let tx = |x: f64| -> f64 {
        let (a, b, v) = if xlog {
            (xmin.max(1e-9).ln(), xmax.max(1e-9).ln(), x.max(1e-9).ln())
        } else {
            (xmin.min(0.0), xmax, x)
        };
        x0 + if b > a {
            (v - a) / (b - a) * PW
        } else {
            PW / 2.0
        }
    };
    let ymax = nice(ymax * 1.1);
    let ty = |y: f64| y0 + PH - y / ymax * PH;
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            x0 + PW,
            x0 - 4.0,
            ty(v) + 4.0,
            short(v),
            y = ty(v)
        );
    }
    let mut ticks: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    if !xlog {
        ticks = (0..=5)
            .map(|i| xmin.min(0.0) + (xmax - xmin.min(0.0)) * f64::from(i) / 5.0)
            .collect();
    }
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for x in ticks {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            tx(x),
            y0 + PH + 16.0,
            short(x)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{xlabel}</text>"#,
        x0 + PW / 2.0,
        y0 + PH + 34.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle" transform="rotate(-90 {} {})">{ylabel}</text>"#,
        x0 - 46.0,
        y0 + PH / 2.0,
        x0 - 46.0,
        y0 + PH / 2.0
    );
    for (i, s) in series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", tx(x), ty(y)))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
            path.join(" "),
            s.color
        );
        if s.points.len() < 40 {
            for p in &path {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    out,
                    r#"<circle cx="{x}" cy="{y}" r="3" fill="{}"/>"#,
                    s.color
                );
            }
        }
        let ly = y0 + 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            x0 + 10.0,
            x0 + 30.0,
            s.color,
            x0 + 36.0,
            ly + 4.0,
            s.name
        );
    }
}

/// A round axis maximum: 1, 2 or 5 times a power of ten.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 1e6 => format!("{:.1}M", v / 1e6),
        a if a >= 1e3 => format!("{:.0}k", v / 1e3),
        a if a >= 10.0 || a == 0.0 => format!("{v:.0}"),
        _ => format!("{v:.1}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_from_result_lines() {
        let text = "\
mode=raw messages=1 size=200 seconds=1 msgs_per_sec=500000
mode=uplink connections=10 window=64 size=200 acked=1 errors=0 seconds=1 msgs_per_sec=200000 p50_ms=5 p99_ms=10 p999_ms=12 verified=1
mode=uplink connections=50 window=64 size=200 acked=1 errors=0 seconds=1 msgs_per_sec=250000 p50_ms=9 p99_ms=20 p999_ms=25 verified=1
mode=drain records=10 seconds=1 msgs_per_sec=10 peak_rss_kib=2048 curve=0.00:10:1024,0.50:5:2048,1.00:0:2048
noise line
";
        let svg = svg(text);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 5, "{svg}");
        assert!(svg.contains("raw librdkafka producer"));
        assert!(!svg.contains("no data"));
        assert!(!svg.contains("NaN"), "{svg}");
        // Without results, every panel says so.
        assert_eq!(super::svg("").matches("no data").count(), 4);
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(3.2), 5.0);
        assert_eq!(nice(270_000.0), 500_000.0);
        assert_eq!(nice(1000.0), 1000.0);
        assert_eq!(short(250_000.0), "250k");
        assert_eq!(short(1_500_000.0), "1.5M");
    }
}
