//! Config errors as Postern prints them: `key: message`, and never a secret. Both TOML's and
//! figment's own messages can quote what was written (a line of the file, a value), so each is
//! rebuilt from its parts.

/// A document that is not TOML, said by line and column only: the parser's own message quotes
/// the line, which may hold a secret, and config errors reach the logs.
pub(super) fn toml_syntax(text: &str) -> Result<(), String> {
    let Err(e) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!(" at line {line}, column {column}")
    });
    Err(format!(
        "not valid TOML{}: {}",
        at.unwrap_or_default(),
        e.message()
    ))
}

/// figment's path sometimes already ends with the offending field.
fn append_field(key: &mut String, field: &str) {
    if key == field || key.ends_with(&format!(".{field}")) {
        return;
    }
    if !key.is_empty() {
        key.push('.');
    }
    key.push_str(field);
}

/// Turns figment's error (which carries the key path) into `key: message`.
pub(super) fn describe_figment_error(e: figment::Error) -> String {
    let mut key = String::new();
    for segment in &e.path {
        if let Ok(i) = segment.parse::<usize>() {
            key.push_str(&format!("[{i}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(segment);
        }
    }
    let message = match &e.kind {
        figment::error::Kind::UnknownField(field, _) => {
            append_field(&mut key, field);
            "unknown key".to_string()
        }
        figment::error::Kind::MissingField(field) => {
            append_field(&mut key, field);
            "missing (required)".to_string()
        }
        // What was written is not repeated when it is text: it may be a secret written where
        // a list or table was expected (`tokens = "..."`), and these errors reach the logs.
        figment::error::Kind::InvalidType(actual, expected) => {
            format!(
                "invalid type: found {}, expected {expected}",
                without_text(actual)
            )
        }
        figment::error::Kind::UnknownVariant(_, expected) => {
            format!("unknown variant, expected one of {}", expected.join(", "))
        }
        figment::error::Kind::InvalidValue(actual, expected) => {
            format!(
                "invalid value: found {}, expected {expected}",
                without_text(actual)
            )
        }
        kind => kind.to_string(),
    };
    if key.is_empty() {
        message
    } else {
        format!("{key}: {message}")
    }
}

/// A value's kind, and the value itself only where it cannot be a secret.
fn without_text(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Str(_) => "a string".into(),
        Actual::Char(_) => "a character".into(),
        Actual::Bytes(_) => "bytes".into(),
        Actual::Other(_) => "a value of another kind".into(),
        // A secret can be all digits (a PIN, a token written without quotes).
        Actual::Signed(_) | Actual::Unsigned(_) | Actual::Float(_) => "a number".into(),
        other => other.to_string(),
    }
}
