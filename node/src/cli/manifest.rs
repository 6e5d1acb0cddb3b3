//! Reading manifests: files, directories or stdin; multi-document YAML or JSON; `List` kinds
//! expanded. Everything is parsed and validated before anything is sent.

use std::path::Path;

use anyhow::{anyhow, bail, Context};
use flotilla_raft::store;
use serde::Deserialize;
use serde_json::Value;

use crate::api::limits;

/// One object from a manifest, with where it came from for error messages.
#[derive(Debug)]
pub(super) struct ManifestObject {
    pub(super) source: String,
    pub(super) object: Value,
}

fn parse_documents(source: &str, text: &str, out: &mut Vec<ManifestObject>) -> anyhow::Result<()> {
    for (doc_idx, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document).map_err(|e| {
            if limits::is_nesting_error(&e) {
                return anyhow!(
                    "{source}: {}",
                    limits::too_deep(&format!("document {}", doc_idx + 1))
                );
            }
            let at = e
                .location()
                .map(|l| format!(" at line {} column {}", l.line(), l.column()))
                .unwrap_or_default();
            anyhow!("{source}: invalid YAML{at}: {e}")
        })?;
        match value {
            Value::Null => continue,
            Value::Object(_) => {}
            other => bail!(
                "{source}: document {} is not a mapping but {}",
                doc_idx + 1,
                type_name(&other)
            ),
        }
        if value
            .get("kind")
            .and_then(Value::as_str)
            .is_some_and(|k| k.ends_with("List"))
        {
            let items = value
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in items {
                out.push(ManifestObject {
                    source: source.to_string(),
                    object: item,
                });
            }
        } else {
            out.push(ManifestObject {
                source: source.to_string(),
                object: value,
            });
        }
    }
    Ok(())
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn read_path(path: &Path, out: &mut Vec<ManifestObject>) -> anyhow::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("read directory {}", path.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            })
            .collect();
        entries.sort();
        for entry in entries {
            read_path(&entry, out)?;
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_documents(&path.display().to_string(), &text, out)
}

/// Reads every object of the `-f` arguments (`-` is stdin) and validates each one.
pub(super) fn read_manifests(files: &[String]) -> anyhow::Result<Vec<ManifestObject>> {
    let mut objects = Vec::new();
    for file in files {
        if file == "-" {
            let text =
                std::io::read_to_string(std::io::stdin()).context("read manifest from stdin")?;
            parse_documents("<stdin>", &text, &mut objects)?;
        } else {
            read_path(Path::new(file), &mut objects)?;
        }
    }
    if objects.is_empty() {
        bail!("no objects found in {}", files.join(", "));
    }
    for manifest in &mut objects {
        store::validate(&mut manifest.object).map_err(|e| anyhow!("{}: {e}", manifest.source))?;
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_and_lists_are_read_in_order() {
        let mut out = Vec::new();
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}\n";
        parse_documents("t", text, &mut out).unwrap();
        let names: Vec<_> = out
            .iter()
            .map(|m| m.object["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn invalid_yaml_is_reported_with_line_and_column() {
        let mut out = Vec::new();
        let error = parse_documents(
            "bad.yaml",
            "kind: ConfigMap\nmetadata:\n  name: [a\n",
            &mut out,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("bad.yaml: invalid YAML at line"),
            "{error}"
        );
    }

    #[test]
    fn deeply_nested_yaml_is_refused_with_the_nesting_limit() {
        let levels = 10_000;
        let flow = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\nextra: {}1{}\n",
            "[".repeat(levels),
            "]".repeat(levels)
        );
        let mappings = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\nextra: {}1{}\n",
            "{a: ".repeat(levels),
            "}".repeat(levels)
        );
        for text in [flow, mappings] {
            let error = parse_documents("deep.yaml", &text, &mut Vec::new()).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    "deep.yaml: document 1 is nested more than {} levels deep",
                    store::MAX_OBJECT_DEPTH
                )
            );
        }
    }

    #[test]
    fn json_manifests_are_accepted() {
        let mut out = Vec::new();
        parse_documents(
            "t.json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"j"}}"#,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 1);
    }
}
