//! The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven
//! over WebDriver), against the real binary and Postgres. Each test saves screenshots under
//! `target/screenshots/`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::api::{start_ops, Ops, TOKEN};
use crate::common::*;

/// chromedriver's command for the browser's console log (read and cleared).
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// chromedriver on a port of its own and a headless Chromium session through it.
struct Browser {
    client: Client,
    driver: Child,
    base: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    unused_port()
}

impl Browser {
    async fn start(ops: &Ops) -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/test installs it)");
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1280,1000"]}),
        );
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        Self {
            client,
            driver,
            base: ops.api.trim_end_matches("/api/v1").to_string(),
        }
    }

    async fn open(&self, hash: &str) {
        self.client
            .goto(&format!("{}/{hash}", self.base))
            .await
            .unwrap();
    }

    /// Waits for `css` and returns its text (found afresh until read: a re-render between
    /// finding the element and reading it leaves a stale reference).
    async fn text(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let error = match self.client.find(Locator::Css(css)).await {
                Ok(e) => match e.text().await {
                    Ok(t) => return t,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "no {css}: {error}; the page says:\n{}",
                self.page_text().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn page_text(&self) -> String {
        match self.client.find(Locator::Css("main")).await {
            Ok(m) => m.text().await.unwrap_or_default(),
            Err(e) => format!("(no main: {e})"),
        }
    }

    /// Waits until `css`'s text contains `want` (rendering the route again every 1.5 s).
    async fn wait_text(&self, css: &str, want: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if let Ok(t) = e.text().await {
                    if t.contains(want) {
                        return t;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "{css} never showed {want:?}; page:\n{}",
                self.page_text().await
            );
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let _ = self
                .client
                .execute(
                    "window.dispatchEvent(new HashChangeEvent('hashchange'))",
                    vec![],
                )
                .await;
        }
    }

    /// Clicks `css` (found afresh until it works: the page re-renders after every action).
    async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let done = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.click().await.is_ok(),
                Err(_) => false,
            };
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cannot click {css}; the page says:\n{}",
                self.page_text().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the link `css` until `then` is on the page: the list the link is in re-renders on
    /// its own, and a click that lands as it is replaced navigates nowhere.
    async fn follow(&self, css: &str, then: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.click(css).await;
            let arrived = Instant::now() + Duration::from_secs(2);
            while Instant::now() < arrived {
                if self.client.find(Locator::Css(then)).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                Instant::now() < deadline,
                "following {css} never showed {then}; the page says:\n{}",
                self.page_text().await
            );
        }
    }

    async fn fill(&self, css: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let done = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.clear().await.is_ok() && e.send_keys(text).await.is_ok(),
                Err(_) => false,
            };
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cannot fill {css}; the page says:\n{}",
                self.page_text().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn sign_in(&self) {
        self.open("").await;
        self.fill("#token", TOKEN).await;
        self.click("#sign-in button[type=submit]").await;
        self.text("#overview").await;
    }

    /// Errors in the browser's console since it was last read (reading clears it).
    async fn console_errors(&self) -> Vec<String> {
        let log = self.client.issue_cmd(BrowserLog).await.unwrap();
        log.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Nothing went wrong on the page: no error in the browser's console, no script error and no
    /// Content-Security-Policy violation (the page records those itself too).
    async fn assert_quiet(&self, page: &str) {
        let console = self.console_errors().await;
        assert!(console.is_empty(), "console errors on {page}: {console:?}");
        let errors = self
            .client
            .execute("return window.__posternErrors || ['no error list']", vec![])
            .await
            .unwrap();
        assert_eq!(errors, json!([]), "errors on {page}");
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

/// One test, one browser at a time: three Chromiums beside the rest of the suite on two cores
/// made every wait a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    sign_in_create_an_endpoint_and_see_its_secret_once().await;
    a_failed_delivery_is_read_retried_and_delivered_and_payloads_stay_text().await;
    pause_resume_rotate_and_look_an_event_up().await;
}

async fn sign_in_create_an_endpoint_and_see_its_secret_once() {
    let ops = start_ops(TestDb::create().await, None, "").await;
    let b = Browser::start(&ops).await;

    // The page is served with a strict policy and never framed.
    let resp = reqwest::get(format!("{}/", b.base)).await.unwrap();
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(resp.headers()["x-frame-options"], "DENY");

    b.open("").await;
    b.fill("#token", "not-the-token").await;
    b.click("#sign-in button[type=submit]").await;
    let refused = b.text("#sign-in [role=alert]").await;
    assert!(refused.contains("refused"), "{refused}");
    // The refused token's 401 is the one console error a page may show.
    let refusal = b.console_errors().await;
    assert!(
        refusal.len() == 1 && refusal[0].contains("401"),
        "{refusal:?}"
    );
    b.sign_in().await;
    b.assert_quiet("overview").await;

    let receiver = Receiver::ok().await;
    b.open("#/endpoints").await;
    b.fill("#create input[name=url]", &receiver.url).await;
    b.fill("#create input[name=events]", "order.*").await;
    b.fill("#create input[name=description]", "made in the browser")
        .await;
    b.click("#create button[type=submit]").await;
    let secret = b.text("#secret").await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    b.screenshot("endpoints-secret-once").await;
    b.assert_quiet("endpoints").await;
    // Shown once: neither the list nor the endpoint's page has it again.
    b.open("#/").await;
    b.text("#overview").await;
    b.open("#/endpoints").await;
    b.wait_text("#endpoints", &receiver.url, Duration::from_secs(30))
        .await;
    assert!(!b.client.source().await.unwrap().contains(&secret));
    let (_, endpoints) = ops.call("GET", "/endpoints", None).await;
    let id = endpoints["endpoints"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    b.open(&format!("#/endpoints/{id}")).await;
    assert_eq!(b.text("#endpoint-id").await, id);
    assert!(!b.client.source().await.unwrap().contains(&secret));
    b.assert_quiet("endpoint").await;
}

async fn a_failed_delivery_is_read_retried_and_delivered_and_payloads_stay_text() {
    let ops = start_ops(TestDb::create().await, None, "").await;
    // Fails its first three requests (every attempt the test config allows), then accepts.
    let receiver = Receiver::start(|n, _| {
        if n < 3 {
            Reply::status(500).with_body(b"receiver says no <b>bold</b>")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let created = ops
        .create(&receiver.url, json!({"events": ["order.*"]}))
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let c = ops.db.client().await;
    let payload = json!({
        "note": "<script>window.__xss = 1</script>",
        "attr": "\"><img src=x onerror=\"window.__xss = 2\">",
    });
    c.execute(
        "INSERT INTO postern.outbox (event_type, payload) VALUES ('order.created', $1)",
        &[&payload],
    )
    .await
    .unwrap();
    wait_sql(
        &c,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'failed'",
        1,
        Duration::from_secs(20),
    )
    .await;

    let b = Browser::start(&ops).await;
    b.sign_in().await;
    b.open(&format!("#/endpoints/{id}")).await;
    b.wait_text("#deliveries", "failed", Duration::from_secs(30))
        .await;
    b.follow("#deliveries a", "#attempts").await;
    let attempts = b.text("#attempts").await;
    assert!(attempts.contains("500"), "{attempts}");
    assert!(
        attempts.contains("receiver says no <b>bold</b>"),
        "the receiver's body is shown as text: {attempts}"
    );
    let headers = b.text(".attempt-headers").await;
    assert!(
        headers.contains("webhook-signature: v1,") && headers.contains("webhook-id:"),
        "{headers}"
    );
    assert!(
        !headers.contains("whsec_"),
        "a secret in the attempt log: {headers}"
    );
    let shown = b.text("#payload").await;
    assert!(
        shown.contains("<script>window.__xss = 1</script>"),
        "{shown}"
    );
    assert!(shown.contains("onerror"), "{shown}");
    let xss = b
        .client
        .execute("return window.__xss === undefined", vec![])
        .await
        .unwrap();
    assert_eq!(xss, Value::Bool(true), "a payload ran as script");
    b.screenshot("delivery-failed").await;
    b.click("#retry").await;
    b.wait_text("#delivery-status", "delivered", Duration::from_secs(30))
        .await;
    b.screenshot("delivery-retried").await;
    b.assert_quiet("delivery").await;
}

async fn pause_resume_rotate_and_look_an_event_up() {
    let ops = start_ops(TestDb::create().await, None, "").await;
    let receiver = Receiver::ok().await;
    let created = ops.create(&receiver.url, json!({"events": ["*"]})).await;
    let id = created["id"].as_str().unwrap().to_string();
    let first_secret = created["secret"].as_str().unwrap().to_string();
    let c = ops.db.client().await;
    let event: uuid::Uuid = c
        .query_one(
            "INSERT INTO postern.outbox (event_type, payload) VALUES ('invoice.paid', '{\"n\": 1}') RETURNING event_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    receiver.wait_count(1, Duration::from_secs(10)).await;

    let b = Browser::start(&ops).await;
    b.sign_in().await;
    b.wait_text("#overview", &id, Duration::from_secs(30)).await;
    b.screenshot("overview").await;
    b.open(&format!("#/endpoints/{id}")).await;
    b.click("#pause").await;
    b.wait_text("main section", "paused", Duration::from_secs(30))
        .await;
    let (_, e) = ops.call("GET", &format!("/endpoints/{id}"), None).await;
    assert_eq!(e["active"], false);
    b.click("#resume").await;
    b.wait_text("main section", "active", Duration::from_secs(30))
        .await;
    let (_, e) = ops.call("GET", &format!("/endpoints/{id}"), None).await;
    assert_eq!(e["active"], true);

    b.fill("#grace", "1h").await;
    b.click("#rotate").await;
    let rotated = b.text("#secret").await;
    assert!(
        rotated.starts_with("whsec_") && rotated != first_secret,
        "{rotated}"
    );
    b.assert_quiet("endpoint").await;

    b.open("#/events").await;
    b.fill("#event-id", &event.to_string()).await;
    b.click("#lookup button[type=submit]").await;
    let found = b.text("#event-deliveries").await;
    assert!(
        found.contains(&id) && found.contains("delivered"),
        "{found}"
    );
    assert!(b.text("#payload").await.contains("\"n\": 1"));
    b.screenshot("event-lookup").await;
    b.assert_quiet("event lookup").await;

    b.open("#/inbound").await;
    b.text("#inbound-routes").await;
    b.assert_quiet("inbound").await;

    // A malformed link is an error on the page, not a page that never loads.
    b.open("#/%").await;
    assert!(
        b.text("main .error").await.contains("URI"),
        "{}",
        b.page_text().await
    );
    b.assert_quiet("a malformed link").await;

    // Edit, filter the deliveries, delete (confirming what happens to unfinished ones).
    b.open(&format!("#/endpoints/{id}")).await;
    b.fill("#edit input[name=description]", "edited in the browser")
        .await;
    b.click("#edit button[type=submit]").await;
    // The notice lasts until the page renders again (300 ms): the API is what to wait on.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, e) = ops.call("GET", &format!("/endpoints/{id}"), None).await;
        if e["description"] == "edited in the browser" {
            break;
        }
        assert!(Instant::now() < deadline, "the edit was not saved: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.open(&format!("#/endpoints/{id}?status=failed")).await;
    // The route renders afresh for the new hash: wait for the filtered page, then read it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shown = b
            .client
            .execute(
                "const s = document.querySelector('#delivery-filter select'); return s ? s.value : ''",
                vec![],
            )
            .await
            .unwrap();
        if shown == json!("failed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the filtered page never rendered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let none = b.text("#deliveries").await;
    assert!(!none.contains("delivered"), "{none}");
    b.open(&format!("#/endpoints/{id}?status=delivered")).await;
    b.wait_text("#deliveries", "delivered", Duration::from_secs(30))
        .await;
    b.click("#delete").await;
    let question = b.client.get_alert_text().await.unwrap();
    assert!(question.contains("cancelled"), "{question}");
    b.client.accept_alert().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = ops.call("GET", &format!("/endpoints/{id}"), None).await;
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "the endpoint was not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.assert_quiet("after delete").await;
}
