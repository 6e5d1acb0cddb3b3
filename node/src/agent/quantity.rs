//! Kubernetes resource quantities (`500m`, `1.5`, `128Mi`, `1G`) as numbers.

/// CPU as billionths of a CPU (Docker's `NanoCpus`).
pub(super) fn cpu_nanos(quantity: &str) -> Option<i64> {
    let quantity = quantity.trim();
    if let Some(milli) = quantity.strip_suffix('m') {
        return milli
            .parse::<f64>()
            .ok()
            .map(|m| (m * 1_000_000.0).round() as i64);
    }
    quantity
        .parse::<f64>()
        .ok()
        .map(|c| (c * 1_000_000_000.0).round() as i64)
}

/// Memory as bytes.
pub(super) fn bytes(quantity: &str) -> Option<i64> {
    let quantity = quantity.trim();
    const SUFFIXES: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(number) = quantity.strip_suffix(suffix) {
            return number
                .parse::<f64>()
                .ok()
                .map(|n| (n * factor).round() as i64);
        }
    }
    quantity.parse::<f64>().ok().map(|n| n.round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(cpu_nanos("500m"), Some(500_000_000));
        assert_eq!(cpu_nanos("1.5"), Some(1_500_000_000));
        assert_eq!(cpu_nanos("2"), Some(2_000_000_000));
        assert_eq!(bytes("128Mi"), Some(134_217_728));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes("64Ki"), Some(65_536));
        assert_eq!(bytes("1000"), Some(1000));
        assert_eq!(bytes("lots"), None);
    }
}
