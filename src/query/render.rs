//! Printing query answers for people (`tally stats`, `tally keys`): an aligned
//! table, or CSV with every measure. Works on the JSON answer, so an answer
//! from a remote server and one computed locally print the same.

use serde_json::Value;

/// Output format of the query commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns with the main measures.
    Table,
    /// The API's JSON answer, pretty-printed.
    Json,
    /// One line per row, every measure.
    Csv,
}

/// Measure columns: (header, JSON pointer, shown in the table).
const MEASURES: [(&str, &str, bool); 25] = [
    ("requests", "/requests", true),
    ("successes", "/successes", false),
    ("errors", "/errors", true),
    ("rate_limit", "/errors_by_type/rate_limit", false),
    ("timeout", "/errors_by_type/timeout", false),
    ("server_error", "/errors_by_type/server_error", false),
    ("client_error", "/errors_by_type/client_error", false),
    ("other", "/errors_by_type/other", false),
    ("cached", "/cached", false),
    ("success_rate", "/success_rate", true),
    ("avg_ms", "/latency_ms/avg", false),
    ("min_ms", "/latency_ms/min", false),
    ("max_ms", "/latency_ms/max", false),
    ("p50_ms", "/latency_ms/p50", true),
    ("p95_ms", "/latency_ms/p95", true),
    ("p99_ms", "/latency_ms/p99", true),
    ("request_bytes", "/request_bytes", false),
    ("response_bytes", "/response_bytes", false),
    ("tokens_in", "/tokens_in", true),
    ("tokens_out", "/tokens_out", true),
    ("cost", "/cost", true),
    ("cost_nanos", "/cost_nanos", false),
    ("cost_from_catalog", "/cost_from_catalog", false),
    ("cost_from_catalog_nanos", "/cost_from_catalog_nanos", false),
    ("unpriced", "/unpriced", false),
];

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        Some(other) => other.to_string(),
    }
}

/// A table: label columns (taken from each row by pointer) then measures.
fn rows_table(rows: &[&Value], labels: &[(&str, String)], format: OutputFormat) -> String {
    let measures: Vec<_> = MEASURES
        .iter()
        .filter(|(_, _, shown)| format == OutputFormat::Csv || *shown)
        .collect();
    let mut header: Vec<String> = labels.iter().map(|(h, _)| h.to_string()).collect();
    header.extend(measures.iter().map(|(h, _, _)| h.to_string()));
    let mut lines: Vec<Vec<String>> = vec![header];
    for r in rows {
        let mut line: Vec<String> = labels.iter().map(|(_, p)| cell(r.pointer(p))).collect();
        line.extend(measures.iter().map(|(_, p, _)| cell(r.pointer(p))));
        lines.push(line);
    }
    if format == OutputFormat::Csv {
        return lines
            .iter()
            .map(|l| l.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(","))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < labels.len() {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn csv_field(c: &str) -> String {
    if c.contains([',', '"', '\n']) {
        format!("\"{}\"", c.replace('"', "\"\""))
    } else {
        c.to_string()
    }
}

fn group_labels(answer: &Value) -> Vec<(&'static str, String)> {
    answer["group_by"]
        .as_array()
        .map(|dims| {
            dims.iter()
                .filter_map(|d| d.as_str())
                .filter_map(crate::aggregate::spec::Dimension::parse)
                .map(|d| (d.as_str(), format!("/group/{}", d.as_str())))
                .collect()
        })
        .unwrap_or_default()
}

/// Renders a `/v1/stats` answer.
pub fn stats(answer: &Value, format: OutputFormat) -> String {
    if format == OutputFormat::Json {
        return serde_json::to_string_pretty(answer).unwrap_or_default() + "\n";
    }
    let mut labels = vec![("bucket", "/bucket".to_string())];
    labels.extend(group_labels(answer));
    let series: Vec<&Value> = answer["series"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut out = rows_table(&series, &labels, format);
    if format == OutputFormat::Table {
        let totals: Vec<&Value> = answer["totals"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let mut tl = vec![("total", "/none".to_string())];
        tl.extend(group_labels(answer));
        out.push('\n');
        out.push_str(&rows_table(&totals, &tl, format));
        out.push_str(&format!(
            "\nprojection {}  covered [{}, {})  as_of {}\n",
            cell(answer.get("projection")),
            cell(answer.pointer("/covered/from")),
            cell(answer.pointer("/covered/to")),
            cell(answer.get("as_of"))
        ));
    }
    out
}

/// Renders a `/v1/keys` answer.
pub fn keys(answer: &Value, format: OutputFormat) -> String {
    if format == OutputFormat::Json {
        return serde_json::to_string_pretty(answer).unwrap_or_default() + "\n";
    }
    let rows: Vec<&Value> = answer["keys"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut out = rows_table(&rows, &[("key", "/key".to_string())], format);
    if format == OutputFormat::Table {
        out.push_str(&format!(
            "\n{} of {} keys by {}  covered [{}, {})  as_of {}\n",
            rows.len(),
            cell(answer.get("total_keys")),
            cell(answer.get("order_by")),
            cell(answer.pointer("/covered/from")),
            cell(answer.pointer("/covered/to")),
            cell(answer.get("as_of"))
        ));
    }
    out
}

/// Renders a `/v1/keys/{key}/stats` answer.
pub fn key_page(answer: &Value, format: OutputFormat) -> String {
    if format == OutputFormat::Json {
        return serde_json::to_string_pretty(answer).unwrap_or_default() + "\n";
    }
    let windows: Vec<Value> = ["today", "this_month", "last_24h"]
        .iter()
        .map(|w| {
            let mut v = answer[*w].clone();
            v["window"] = Value::String((*w).to_string());
            v
        })
        .collect();
    let refs: Vec<&Value> = windows.iter().collect();
    let mut out = format!(
        "key {}  at {}  timezone {}  as_of {}\n\n",
        cell(answer.get("key")),
        cell(answer.get("at")),
        cell(answer.get("timezone")),
        cell(answer.get("as_of"))
    );
    out.push_str(&rows_table(
        &refs,
        &[("window", "/window".to_string())],
        format,
    ));
    for (title, dim) in [("by_model", "model"), ("by_api", "api")] {
        let rows: Vec<&Value> = answer[title]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        out.push('\n');
        if format == OutputFormat::Table {
            out.push_str(&format!("this month {title}\n"));
        }
        out.push_str(&rows_table(&rows, &[(dim, format!("/{dim}"))], format));
    }
    out
}
