//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and field selectors, parsed
//! from the strings `kubectl -l` and `--field-selector` take.

use serde_json::Value;

use crate::object::labels;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("invalid selector {selector:?}: {reason}")]
    Invalid { selector: String, reason: String },
    #[error("field selector on {field:?} is not supported for {kind} (supported: {supported})")]
    UnsupportedField {
        kind: String,
        field: String,
        supported: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

fn invalid(selector: &str, reason: impl Into<String>) -> SelectorError {
    SelectorError::Invalid {
        selector: selector.to_string(),
        reason: reason.into(),
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (idx, ch) in text.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..idx]);
                start = idx + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn check_label_key(selector: &str, key: &str) -> Result<String, SelectorError> {
    let valid = !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if valid {
        Ok(key.to_string())
    } else {
        Err(invalid(
            selector,
            format!("{key:?} is not a valid label key"),
        ))
    }
}

fn check_label_value(selector: &str, value: &str) -> Result<String, SelectorError> {
    let valid = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(value.to_string())
    } else {
        Err(invalid(
            selector,
            format!("{value:?} is not a valid label value"),
        ))
    }
}

fn parse_set(selector: &str, rest: &str) -> Result<Vec<String>, SelectorError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| {
            invalid(
                selector,
                "expected a set of values in parentheses, like (a,b)",
            )
        })?;
    inner
        .split(',')
        .map(|value| check_label_value(selector, value.trim()))
        .collect()
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<LabelSelector, SelectorError> {
        let mut requirements = Vec::new();
        if selector.trim().is_empty() {
            return Ok(LabelSelector { requirements });
        }
        for part in split_top_level(selector) {
            let part = part.trim();
            if part.is_empty() {
                return Err(invalid(selector, "empty requirement"));
            }
            let requirement = if let Some(key) = part.strip_prefix('!') {
                Requirement::DoesNotExist(check_label_key(selector, key.trim())?)
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(
                    check_label_key(selector, key.trim())?,
                    check_label_value(selector, value.trim())?,
                )
            } else if let Some((key, value)) =
                part.split_once("==").or_else(|| part.split_once('='))
            {
                Requirement::Equals(
                    check_label_key(selector, key.trim())?,
                    check_label_value(selector, value.trim())?,
                )
            } else if let Some((key, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(
                    check_label_key(selector, key.trim())?,
                    parse_set(selector, rest)?,
                )
            } else if let Some((key, rest)) = part.split_once(" in ") {
                Requirement::In(
                    check_label_key(selector, key.trim())?,
                    parse_set(selector, rest)?,
                )
            } else if part.contains(['(', ')', ' ', '<', '>']) {
                return Err(invalid(
                    selector,
                    format!("cannot parse requirement {part:?}"),
                ));
            } else {
                Requirement::Exists(check_label_key(selector, part)?)
            };
            requirements.push(requirement);
        }
        Ok(LabelSelector { requirements })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let get = |key: &str| labels(object).find(|(k, _)| *k == key).map(|(_, v)| v);
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                Requirement::Equals(key, value) => get(key) == Some(value.as_str()),
                Requirement::NotEquals(key, value) => get(key) != Some(value.as_str()),
                Requirement::In(key, values) => {
                    get(key).is_some_and(|v| values.iter().any(|x| x == v))
                }
                Requirement::NotIn(key, values) => {
                    !get(key).is_some_and(|v| values.iter().any(|x| x == v))
                }
                Requirement::Exists(key) => get(key).is_some(),
                Requirement::DoesNotExist(key) => get(key).is_none(),
            })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// Fields a field selector may name, per kind, as in Kubernetes.
fn supported_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "status.phase",
        ],
        "Event" => &[
            "metadata.name",
            "metadata.namespace",
            "involvedObject.name",
            "involvedObject.kind",
            "reason",
        ],
        _ => &["metadata.name", "metadata.namespace"],
    }
}

/// A parsed field selector: equality or inequality on supported fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<(String, bool, String)>,
}

impl FieldSelector {
    pub fn parse(kind: &str, selector: &str) -> Result<FieldSelector, SelectorError> {
        let mut requirements = Vec::new();
        if selector.trim().is_empty() {
            return Ok(FieldSelector { requirements });
        }
        for part in selector.split(',') {
            let part = part.trim();
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(invalid(
                    selector,
                    format!("{part:?} is not FIELD=VALUE or FIELD!=VALUE"),
                ));
            };
            let field = field.trim();
            let supported = supported_fields(kind);
            if !supported.contains(&field) {
                return Err(SelectorError::UnsupportedField {
                    kind: kind.to_string(),
                    field: field.to_string(),
                    supported: supported.join(", "),
                });
            }
            requirements.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector { requirements })
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|(field, equal, value)| {
            let actual = field
                .split('.')
                .try_fold(object, |node, part| node.get(part))
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests;
