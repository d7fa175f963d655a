//! How hcictl prints resources: aligned tables, JSON or YAML documents, and
//! `describe`'s human-readable view.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::client::Kind;

/// Output format of `get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned table with the most useful columns.
    Table,
    /// JSON documents (a list prints as a JSON array).
    Json,
    /// YAML documents (a list prints as documents separated by `---`).
    Yaml,
}

/// A value at a JSON pointer, as text (`-` when absent).
fn at(doc: &Value, pointer: &str) -> String {
    match doc.pointer(pointer) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// A short age (`45s`, `3m`, `2h`, `5d`) from an RFC 3339 time.
pub fn age(created: &str, now: DateTime<Utc>) -> String {
    let Ok(t) = DateTime::parse_from_rfc3339(created) else {
        return "-".into();
    };
    let secs = (now - t.with_timezone(&Utc)).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The extra columns of a kind: header and JSON pointer.
fn columns(kind: Kind) -> &'static [(&'static str, &'static str)] {
    match kind {
        Kind::Vm => &[
            ("CPUS", "/spec/cpus"),
            ("MEMORY", "/spec/memory"),
            ("NODE", "/status/node"),
            ("STRATEGY", "/spec/runStrategy"),
        ],
        Kind::Volume => &[
            ("SIZE", "/spec/size"),
            ("ALLOCATED", "/status/allocated"),
            ("REPLICAS", "/spec/replicas"),
            ("ATTACHED", "/status/attachedTo"),
        ],
        Kind::Image => &[
            ("SIZE", "/status/size"),
            ("PROGRESS", "/status/progress"),
            ("URL", "/spec/url"),
        ],
        Kind::Network => &[
            ("TYPE", "/spec/kind/type"),
            ("CIDR", "/spec/cidr"),
            ("NODES", "/status/readyNodes"),
        ],
        Kind::Snapshot => &[("VOLUME", "/spec/volume"), ("SIZE", "/status/size")],
        Kind::Backup => &[("TARGET", "/spec/target"), ("SIZE", "/status/size")],
        Kind::BackupTarget => &[("URL", "/spec/url")],
        Kind::Schedule => &[("CRON", "/spec/cron"), ("LAST", "/status/lastRun")],
        Kind::Node => &[
            ("CPUS", "/status/allocatable/cpus"),
            ("MEMORY", "/status/allocatable/memory"),
            ("ADDRESSES", "/spec/addresses"),
        ],
        Kind::VmSnapshot => &[("VM", "/spec/vm"), ("TAKEN", "/status/takenAt")],
    }
}

fn phase(kind: Kind, doc: &Value) -> String {
    match kind {
        Kind::Node | Kind::Network => {
            let ready = doc
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
                })
                .and_then(|c| c.get("status").and_then(Value::as_str));
            match ready {
                Some("True") => "Ready".into(),
                Some(_) => "NotReady".into(),
                None => "-".into(),
            }
        }
        _ => at(doc, "/status/phase"),
    }
}

/// Renders documents of one kind as an aligned table.
pub fn table(kind: Kind, docs: &[Value], now: DateTime<Utc>) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["NAME".to_string(), "PHASE".to_string()];
    header.extend(columns(kind).iter().map(|(h, _)| h.to_string()));
    header.push("AGE".into());
    rows.push(header);
    for doc in docs {
        let mut row = vec![at(doc, "/metadata/name"), phase(kind, doc)];
        row.extend(columns(kind).iter().map(|(_, p)| at(doc, p)));
        row.push(age(&at(doc, "/metadata/createdAt"), now));
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("   ").trim_end());
    }
    out
}

/// Renders documents as JSON or YAML (`many`: print as a list even if one).
pub fn documents(docs: &[Value], format: Format, many: bool) -> Result<String, String> {
    match format {
        Format::Json => {
            let text = if many {
                serde_json::to_string_pretty(docs)
            } else {
                serde_json::to_string_pretty(docs.first().unwrap_or(&Value::Null))
            };
            text.map(|t| t + "\n").map_err(|e| e.to_string())
        }
        Format::Yaml => {
            let mut out = String::new();
            for (i, doc) in docs.iter().enumerate() {
                if i > 0 {
                    out.push_str("---\n");
                }
                out.push_str(&serde_norway::to_string(doc).map_err(|e| e.to_string())?);
            }
            Ok(out)
        }
        Format::Table => Err("documents() does not render tables".into()),
    }
}

/// `describe`: the document's metadata, spec and status as indented YAML
/// with the conditions spelled out.
pub fn describe(kind: Kind, doc: &Value, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Name:     {}", at(doc, "/metadata/name"));
    let _ = writeln!(out, "Kind:     {}", kind.name());
    let _ = writeln!(out, "Phase:    {}", phase(kind, doc));
    let _ = writeln!(
        out,
        "Age:      {}",
        age(&at(doc, "/metadata/createdAt"), now)
    );
    let _ = writeln!(out, "Version:  {}", at(doc, "/metadata/resourceVersion"));
    let _ = writeln!(out, "UID:      {}", at(doc, "/metadata/uid"));
    for (title, key) in [("Labels", "labels"), ("Annotations", "annotations")] {
        if let Some(map) = doc
            .pointer(&format!("/metadata/{key}"))
            .and_then(Value::as_object)
            .filter(|m| !m.is_empty())
        {
            let _ = writeln!(out, "{title}:");
            for (k, v) in map {
                let _ = writeln!(out, "  {k}={}", v.as_str().unwrap_or_default());
            }
        }
    }
    for (title, key) in [("Spec", "spec"), ("Status", "status")] {
        let Some(part) = doc.get(key) else { continue };
        let mut part = part.clone();
        let conditions = part.as_object_mut().and_then(|o| o.remove("conditions"));
        let _ = writeln!(out, "{title}:");
        if let Ok(yaml) = serde_norway::to_string(&part) {
            for line in yaml.lines().filter(|l| *l != "{}") {
                let _ = writeln!(out, "  {line}");
            }
        }
        if let Some(Value::Array(cs)) = conditions {
            let _ = writeln!(out, "Conditions:");
            for c in cs {
                let _ = writeln!(
                    out,
                    "  {:<14} {:<6} {:<18} {}",
                    at(&c, "/type"),
                    at(&c, "/status"),
                    at(&c, "/reason"),
                    c.get("message").and_then(Value::as_str).unwrap_or("")
                );
            }
        }
    }
    out
}

/// Events as a table (`with_object`: with a KIND/NAME column), ages against `now`.
pub fn events(events: &[crate::proto::Event], with_object: bool, now: DateTime<Utc>) -> String {
    let mut rows: Vec<Vec<String>> = Vec::with_capacity(events.len() + 1);
    let mut header = vec!["AGE", "TYPE", "REASON"];
    if with_object {
        header.push("OBJECT");
    }
    header.push("MESSAGE");
    rows.push(header.into_iter().map(str::to_string).collect());
    for e in events {
        let mut row = vec![age(&e.time, now), e.r#type.clone(), e.reason.clone()];
        if with_object {
            row.push(format!("{}/{}", e.kind, e.name));
        }
        row.push(e.message.clone());
        rows.push(row);
    }
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == cols {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn ages_are_short() {
        assert_eq!(age("2026-11-22T11:59:30Z", now()), "30s");
        assert_eq!(age("2026-11-22T11:30:00Z", now()), "30m");
        assert_eq!(age("2026-11-22T06:00:00Z", now()), "6h");
        assert_eq!(age("2026-11-12T12:00:00Z", now()), "10d");
        assert_eq!(age("garbage", now()), "-");
    }

    #[test]
    fn tables_align_and_fill_gaps() {
        let docs = vec![
            serde_json::json!({"metadata": {"name": "data", "createdAt": "2026-11-22T11:59:00Z"},
                "spec": {"size": "1Gi", "replicas": 3}, "status": {"phase": "Attached", "attachedTo": "web"}}),
            serde_json::json!({"metadata": {"name": "logs-volume"}, "spec": {"size": "10Gi", "replicas": 1}}),
        ];
        let t = table(Kind::Volume, &docs, now());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME          PHASE"), "{t}");
        assert!(
            lines[1].contains("Attached") && lines[1].contains("web") && lines[1].ends_with("60s"),
            "{t}"
        );
        assert!(lines[2].starts_with("logs-volume   -"), "{t}");
    }

    #[test]
    fn documents_round_trip() {
        let docs = vec![serde_json::json!({"kind": "Volume", "metadata": {"name": "a"}})];
        let json = documents(&docs, Format::Json, false).expect("json");
        assert_eq!(
            serde_json::from_str::<Value>(&json).expect("parse"),
            docs[0]
        );
        let yaml = documents(&docs, Format::Yaml, true).expect("yaml");
        assert_eq!(
            serde_norway::from_str::<Value>(&yaml).expect("parse"),
            docs[0]
        );
    }
}
