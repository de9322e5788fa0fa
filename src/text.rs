//! Client-chosen text made safe for one-line logs (a leaf: SSH and tunnels log through it).

/// A client-chosen name (user, certificate key ID) made safe for one-line logs: anything
/// outside `[A-Za-z0-9._@+=/-]` is percent-encoded, so it cannot fake log fields or lines.
pub(crate) fn clean(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes().take(128) {
        if b.is_ascii_alphanumeric() || b"._@+=/-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// Free text that may carry client-chosen parts: control characters and quotes escaped.
pub(crate) fn clean_text(s: &str) -> String {
    s.chars()
        .take(512)
        .flat_map(|c| {
            if c.is_control() || c == '"' || c == '\\' {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}
