//! The environment layer: `POSTERN__SECTION__KEY` variables over the file. Values are read as
//! figment reads them (numbers, booleans, lists), except a secret's, which is kept as written: a
//! password or key of digits (`007`), or one that starts with `[` or `"`, stays the text it is.

use figment::providers::Env;
use figment::value::{Dict, Map, Value};
use figment::{Error, Metadata, Profile, Provider};

/// The keys whose value is one secret, as the environment layer names them.
const SECRET_KEYS: &[&str] = &[
    "database.url",
    "database.listen_url",
    "database.encryption_key",
];

fn variables() -> Env {
    Env::prefixed("POSTERN__").split("__").lowercase(true)
}

fn is_secret(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// Every `POSTERN__` variable: the secrets' verbatim, the rest parsed.
pub(super) fn layer() -> (Env, Secrets) {
    (variables().filter(|k| !is_secret(k.as_str())), Secrets)
}

/// The variables of `SECRET_KEYS`, as strings.
pub(super) struct Secrets;

impl Provider for Secrets {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable(s) holding secrets")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        Ok(Profile::Default.collect(secrets_dict(
            variables().iter().map(|(k, v)| (k.to_string(), v)),
        )))
    }
}

/// A value as an operator meant it, as figment reads a string: surrounding whitespace (a line
/// ending from a Secret made with `echo`) and one pair of double quotes (`--env-file` lines) go.
fn as_written(raw: &str) -> String {
    let t = raw.trim();
    t.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(t)
        .to_string()
}

fn secrets_dict(vars: impl Iterator<Item = (String, String)>) -> Dict {
    let mut database = Dict::new();
    for (key, raw) in vars {
        if let (true, Some(field)) = (is_secret(&key), key.strip_prefix("database.")) {
            database.insert(field.to_string(), Value::from(as_written(&raw)));
        }
    }
    let mut dict = Dict::new();
    if !database.is_empty() {
        dict.insert("database".into(), Value::from(database));
    }
    dict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_from_the_environment_stays_the_text_it_is() {
        let vars = [
            ("database.url", "123456"),
            ("database.encryption_key", "007"),
            ("database.listen_url", "[not, a, list]"),
            ("database.pool_size", "8"),
            ("database.url", " \"123456\"\n"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let dict = secrets_dict(vars.into_iter());
        let database = dict["database"].as_dict().unwrap();
        assert_eq!(database["url"].as_str(), Some("123456"));
        assert_eq!(database["encryption_key"].as_str(), Some("007"));
        assert_eq!(database["listen_url"].as_str(), Some("[not, a, list]"));
        assert!(
            !database.contains_key("pool_size"),
            "only secrets are taken verbatim"
        );
        // figment's own reading, which the other keys keep, would have changed them.
        assert_ne!("007".parse::<Value>().unwrap().as_str(), Some("007"));
    }
}
