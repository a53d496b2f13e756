//! Loading and validating configuration files: every bad value names its key.

use super::*;

const MINIMAL: &str = r#"
    [database]
    url = "postgres://postgres@127.0.0.1/postgres"
"#;

#[test]
fn durations_and_sizes_round_trip() {
    for (text, ms) in [
        ("500ms", 500),
        ("30s", 30_000),
        ("5m", 300_000),
        ("10h", 36_000_000),
        ("7d", 604_800_000),
    ] {
        let d: Dur = text.parse().unwrap();
        assert_eq!(d.0.as_millis(), ms);
        assert_eq!(d.to_string(), text);
    }
    assert!("soon".parse::<Dur>().is_err());
    assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
    assert_eq!("512KiB".parse::<ByteSize>().unwrap().to_string(), "512KiB");
    assert_eq!("1000".parse::<ByteSize>().unwrap().0, 1000);
    assert!("1 parsec".parse::<ByteSize>().is_err());
}

#[test]
fn defaults_fill_a_minimal_file() {
    let c = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(c.shutdown_grace.0, Duration::from_secs(25));
    assert_eq!(c.outbound.notify, NotifyMode::Throttled);
    assert_eq!(c.outbound.concurrency, 256);
    assert_eq!(c.database.schema, "postern");
    assert_eq!(c.outbound.retry, RetryConfig::default());
}

#[test]
fn unknown_keys_are_named() {
    let err =
        Config::from_toml_str(&format!("{MINIMAL}\n[outbound]\nconcurency = 3\n")).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.problems[0].starts_with("outbound.concurency: unknown key"),
        "{err}"
    );
}

#[test]
fn secrets_resolve_from_env_and_file_and_never_print() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
    std::env::set_var("POSTERN_TEST_HEADER_SECRET", "hunter2");
    let toml = format!(
        r#"
        [database]
        url = "postgres://app:pw@127.0.0.1/app"
        [[endpoints]]
        id = "e"
        url = "https://example.com/a"
        events = ["*"]
        secret = "file:{}"
        headers = {{ "x-api-key" = "env:POSTERN_TEST_HEADER_SECRET" }}
        "#,
        file.display()
    );
    let c = Config::from_toml_str(&toml).unwrap();
    assert_eq!(
        c.endpoints[0].secret.expose(),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    );
    assert_eq!(c.endpoints[0].headers["x-api-key"].expose(), "hunter2");
    let shown = c.to_redacted_toml();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("MfKQ9r8"), "{shown}");
    assert!(!shown.contains(":pw@"), "{shown}");
    assert!(
        shown.contains("postgres://app:<redacted>@127.0.0.1/app"),
        "{shown}"
    );
    assert!(format!("{c:?}").contains("<redacted>"));
    assert!(!format!("{c:?}").contains("hunter2"));

    let missing = toml.replace(
        "env:POSTERN_TEST_HEADER_SECRET",
        "env:POSTERN_TEST_NOT_SET_ANYWHERE",
    );
    let err = Config::from_toml_str(&missing).unwrap_err().to_string();
    assert!(err.contains("endpoints[0].headers.x-api-key"), "{err}");
    assert!(
        err.contains("POSTERN_TEST_NOT_SET_ANYWHERE is not set"),
        "{err}"
    );
}

#[test]
fn url_passwords_are_masked() {
    assert_eq!(
        mask_url_password("postgres://u:p@h:5432/db?x=1"),
        "postgres://u:<redacted>@h:5432/db?x=1"
    );
    assert_eq!(mask_url_password("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(
        mask_url_password("host=h password=p user=u"),
        "host=h password=<redacted> user=u"
    );
    // Issue 12: the query parameter, spaces around `=`, quoted values with escapes.
    assert_eq!(
        mask_url_password("postgres://u@h/db?sslmode=require&password=s3cret&x=1"),
        "postgres://u@h/db?sslmode=require&password=<redacted>&x=1"
    );
    assert_eq!(
        mask_url_password("postgres://u:p@h/db?PASSWORD=q"),
        "postgres://u:<redacted>@h/db?PASSWORD=<redacted>"
    );
    assert_eq!(
        mask_url_password(r"host=h password = 'a b\' c' user=u"),
        "host=h password = <redacted> user=u"
    );
    assert_eq!(
        mask_url_password("passwordless=1 password=x"),
        "passwordless=1 password=<redacted>"
    );
    // The driver takes the credentials to the first `@`: `/` and `?` may be in a password.
    for (url, secret) in [
        ("postgres://app:s3/cr3t@db:5432/app", "s3/cr3t"),
        ("postgres://app:pa?ss@db/app?sslmode=require", "pa?ss"),
        ("postgres://app:p@ss@db/app", "ss@"),
    ] {
        let shown = mask_url_password(url);
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("@db"), "{shown}");
    }
    // A keyword's length may end inside a character.
    assert_eq!(
        mask_url_password("host=h dbname=Überweisung password=x"),
        "host=h dbname=Überweisung password=<redacted>"
    );
    for shown in [
        mask_url_password(r"password='top secret'"),
        mask_url_password("postgres://h/db?password=top-secret"),
    ] {
        assert!(!shown.contains("secret"), "{shown}");
    }
}

#[test]
fn tls_is_skipped_only_on_this_machine_and_only_when_no_sslmode_is_named() {
    for local in [
        "postgres://u@127.0.0.1:5432/db",
        "postgres://u@127.0.0.2/db",
        "postgres://u@localhost/db?application_name=x",
        "postgres://u@[::1]:5432/db",
        "host=127.0.0.1 user=u dbname=db",
        "host=/var/run/postgresql user=u",
        "host=localhost,127.0.0.1 user=u",
    ] {
        assert!(super::tls_skipped(local), "{local}");
    }
    for kept in [
        // Named, whatever it says.
        "postgres://u@127.0.0.1/db?sslmode=prefer",
        "postgres://u@127.0.0.1/db?sslmode=require",
        "host=localhost sslmode=prefer",
        // Another machine, or one of several hosts elsewhere.
        "postgres://u@db.internal/db",
        "postgres://u@10.0.0.5/db",
        "host=localhost,db.internal user=u",
        // Named localhost, connecting to an address elsewhere.
        "host=localhost hostaddr=10.0.0.5 user=u",
        // Not a connection string: left to the parser's own error.
        "not a url at all",
    ] {
        assert!(!super::tls_skipped(kept), "{kept}");
    }
}

#[test]
fn verification_asked_where_tls_would_be_skipped_is_refused_by_key() {
    let err = Config::from_toml_str(&format!("{MINIMAL}tls_verify = true\n")).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.problems
            .iter()
            .any(|p| p.starts_with("database.url: names a database on this machine and no sslmode")),
        "{err}"
    );
    let named = MINIMAL.replace("/postgres\"", "/postgres?sslmode=require\"");
    assert!(Config::from_toml_str(&format!("{named}tls_verify = true\n")).is_ok());
    let elsewhere = MINIMAL.replace("127.0.0.1", "db.internal");
    assert!(Config::from_toml_str(&format!("{elsewhere}ca_file = \"/ca.pem\"\n")).is_ok());
}

#[test]
fn a_secret_written_where_a_list_belongs_is_not_repeated_in_the_error() {
    let err = Config::from_toml_str(
        r#"
        [database]
        url = "postgres://app@127.0.0.1/app"
        [api]
        listen = "127.0.0.1:9090"
        tokens = "my-real-token-0123456789"
        "#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("api.tokens: invalid type: found a string"),
        "{err}"
    );
    assert!(!err.contains("my-real-token"), "{err}");
    // A secret where a choice belongs.
    let err = Config::from_toml_str(
        r#"
        [database]
        url = "postgres://app@127.0.0.1/app"
        [[endpoints]]
        id = "e"
        url = "https://example.com/a"
        events = ["*"]
        secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        signature = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        "#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown variant"), "{err}");
    assert!(!err.contains("MfKQ9r8"), "{err}");
}

/// Every config error reaches the logs: no secret may appear in one, whatever its form (a line of
/// a file that is not TOML, a secret written as a number).
#[test]
fn no_config_error_repeats_a_secret() {
    for (toml, secret) in [
        (
            "[database]\nurl = \"postgres://app:Hunter2Secret@127.0.0.1/db\"\nurl = \"postgres://app:Hunter2Secret@127.0.0.1/db\"\n",
            "Hunter2Secret",
        ),
        (
            "[database]\nurl = \"postgres://app@127.0.0.1/db\"\n[api]\ntokens = [\"SuperSecretApiToken123456\" \"second\"]\n",
            "SuperSecretApiToken123456",
        ),
        (
            "[database]\nurl = \"postgres://app@127.0.0.1/db\"\nencryption_key = \"c2VjcmV0c2VjcmV0\n",
            "c2VjcmV0c2VjcmV0",
        ),
        (
            "[database]\nurl = \"postgres://app@127.0.0.1/db\"\nencryption_key = 123456789012\n",
            "123456789012",
        ),
        (
            "[database]\nurl = \"postgres://app@127.0.0.1/db\"\n[inbound]\nupstream = \"http://user:UpstrPass@127.0.0.1:8080/x\"\n",
            "UpstrPass",
        ),
    ] {
        let err = crate::checks::from_toml_str(toml).unwrap_err().to_string();
        assert!(!err.contains(secret), "{err}");
        assert!(!err.is_empty());
    }
    let err = crate::checks::from_toml_str(
        "[database]\nurl = \"postgres://app:Hunter2Secret@127.0.0.1/db\"\nurl = \"x\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("line 3"), "the place is still named: {err}");
}

/// Values that parse but cannot work are refused by key, not left to fail (or be misread) at run
/// time: a lease past what a timestamp holds, a tolerance rounded to nothing or wrapped negative,
/// a route that accepts no method or whose path no request can match, a memory budget that
/// overflows.
#[test]
fn values_that_parse_but_cannot_work_are_refused_by_key() {
    let route = |extra: &str| {
        format!(
            "{MINIMAL}\n[inbound]\nupstream = \"http://127.0.0.1:8080\"\n[[inbound.routes]]\npath = \"/wh\"\nprovider = \"stripe\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n{extra}\n"
        )
    };
    for (toml, key) in [
        (
            format!("{MINIMAL}\n[outbound]\nlease = \"99999999999999d\"\n"),
            "outbound.lease",
        ),
        (
            format!("{MINIMAL}\n[retention]\ndelivered = \"99999999999999d\"\n"),
            "retention.delivered",
        ),
        (
            route("tolerance = \"500ms\""),
            "inbound.routes[0].tolerance",
        ),
        (
            route("tolerance = \"9223372036854775808s\""),
            "inbound.routes[0].tolerance",
        ),
        (route("methods = []"), "inbound.routes[0].methods"),
        (
            route("").replace("provider = \"stripe\"", "provider = \"github\"")
                + "tolerance = \"5m\"\n",
            "inbound.routes[0].tolerance",
        ),
        (
            format!("{MINIMAL}\n[outbound]\nmemory_budget = \"18446744073709551615\"\n"),
            "outbound.memory_budget",
        ),
        (
            format!("{MINIMAL}\n[inbound]\nupstream = \"http://127.0.0.1:8080/?a=1\"\n"),
            "inbound.upstream",
        ),
        (
            route("").replace(
                "secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]",
                "secrets = [\"  \"]",
            ),
            "inbound.routes[0].secrets[0]",
        ),
    ] {
        let err = crate::checks::from_toml_str(&toml)
            .err()
            .unwrap_or_else(|| panic!("accepted: {toml}"))
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    let endpoint = |headers: &str| {
        format!(
            "{MINIMAL}\n[[endpoints]]\nid = \"e\"\nurl = \"https://example.com/a\"\nevents = [\"*\"]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nheaders = {headers}\n"
        )
    };
    for (headers, key) in [
        (
            "{ Authorization = \"a\", authorization = \"b\" }",
            "endpoints[0].headers.authorization",
        ),
        ("{ te = \"trailers\" }", "endpoints[0].headers.te"),
        ("{ Upgrade = \"h2c\" }", "endpoints[0].headers.Upgrade"),
    ] {
        let err = crate::checks::from_toml_str(&endpoint(headers))
            .err()
            .unwrap_or_else(|| panic!("accepted headers {headers}"))
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    for path in ["/a//b", "/caf%C3%A9", "/wh/"] {
        let toml = route("").replace("path = \"/wh\"", &format!("path = {}", toml_string(path)));
        crate::checks::from_toml_str(&toml).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    }
    for path in [
        "/gh#frag", "/a/../gh", "/./gh", "/%4", "/%zz", "/g h", "/g\u{0}h",
    ] {
        let toml = route("").replace("path = \"/wh\"", &format!("path = {}", toml_string(path)));
        let err = crate::checks::from_toml_str(&toml)
            .err()
            .unwrap_or_else(|| panic!("accepted path {path:?}"))
            .to_string();
        assert!(err.contains("inbound.routes[0].path"), "{path:?}: {err}");
    }
}

/// Two listeners on one port fail only when the second binds, after the pipeline started: found
/// at load instead. A `file:` secret is read no further than a secret could go.
#[test]
fn listeners_on_one_port_and_endless_secret_files_are_refused_by_key() {
    let err = crate::checks::from_toml_str(&format!(
        "{MINIMAL}\n[admin]\nlisten = \"0.0.0.0:18950\"\n[api]\nlisten = \"127.0.0.1:18950\"\n"
    ))
    .expect_err("two listeners on one port")
    .to_string();
    assert!(err.contains("api.listen"), "{err}");
    let err = crate::checks::from_toml_str(&format!(
        "{MINIMAL}\n[api]\nlisten = \"127.0.0.1:9090\"\ntokens = [\"file:/dev/zero\"]\n"
    ))
    .expect_err("an endless secret file")
    .to_string();
    assert!(
        err.contains("api.tokens") && err.contains("/dev/zero"),
        "{err}"
    );
}
