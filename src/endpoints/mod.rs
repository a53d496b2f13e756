//! Endpoint rows (their stored secrets in `secrets`). Invariant: endpoints live in Postgres (the
//! config file's are upserted at startup, the config winning for every field but the runtime state `active` /
//! `disabled_reason`), and a secret is never replaced outright: the old one keeps signing beside
//! the new one until its grace ends, so receivers switch without a gap.

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;

use crate::config::EndpointConfig;
use crate::crypto::{Field, SecretBox};
use crate::db::Schema;
use crate::delivery::state;

mod secrets;
use secrets::cannot_open;
pub use secrets::{
    add_secret, check_sealed, reseal, signing_secrets, MAX_SIGNING_SECRETS, SEALED_ONLY,
};

/// How long a config endpoint's previous secret keeps signing after the config changes it.
pub const CONFIG_SECRET_GRACE: Duration = Duration::from_secs(24 * 3600);

/// An endpoint URL must be absolute http(s) with a host. (Whether its address is allowed is
/// decided at connect time by the SSRF guard, which sees the address actually used.)
pub fn validate_endpoint_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a valid URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, not {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("must include a host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry credentials; use headers instead".into());
    }
    Ok(parsed)
}

/// Every endpoint has a flow row (`delivery::state::flow`), so a rate limit set on it at any time
/// has a row for the replicas to take tokens from under its lock.
pub async fn ensure_flow_row(
    tx: &deadpool_postgres::Transaction<'_>,
    schema: &Schema,
    id: &str,
) -> anyhow::Result<()> {
    tx.execute(
        &schema.sql(
            "INSERT INTO __SCHEMA__.endpoint_flow (endpoint_id) VALUES ($1) ON CONFLICT DO NOTHING",
        ),
        &[&id],
    )
    .await?;
    Ok(())
}

/// Custom headers may not override what Postern itself sets (signature, identity, framing).
pub fn validate_custom_header(name: &str) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    if reqwest::header::HeaderName::from_bytes(lower.as_bytes()).is_err() {
        return Err("not a valid header name".into());
    }
    const RESERVED: &[&str] = &[
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "transfer-encoding",
        "connection",
        // Hop-by-hop or framing: they would change how the request is carried, not what it says.
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "proxy-connection",
    ];
    if RESERVED.contains(&lower.as_str())
        || lower.starts_with("webhook-")
        || lower.starts_with("x-webhook-")
    {
        return Err("is set by Postern and cannot be overridden".into());
    }
    Ok(())
}

/// Two names of one header in any case (`Authorization`, `authorization`): which value a
/// receiver would get is not for the map's order to decide. Returns the second name.
pub fn repeated_header<'a>(names: impl IntoIterator<Item = &'a String>) -> Option<&'a str> {
    let mut seen = std::collections::HashSet::new();
    names
        .into_iter()
        .find(|n| !seen.insert(n.to_ascii_lowercase()))
        .map(String::as_str)
}

/// Why a config endpoint is inactive after it left the file; also how a later config that lists
/// it again recognises it and brings it back.
const RETIRED: &str = "removed from the config file";

/// What reconciling the config file's endpoints did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// The config was older than the one the database last reconciled: nothing was changed.
    pub stale: Option<u64>,
    /// Config endpoints no longer in the file that were retired (inactive, deliveries paused).
    pub retired: Vec<String>,
    /// Config endpoints no longer in the file left running, because this config is not newer
    /// than the database's.
    pub kept: Vec<String>,
}

/// Reconciles the config file's endpoints with the database, under `config_generation`:
/// - older than the generation the database last reconciled: nothing is changed (an older pod
///   restarting during a rolling update runs with the stored endpoint set);
/// - the same or newer: the file's endpoints are upserted (the config wins for every field but
///   the runtime state `active` / `disabled_reason`);
/// - newer only: config endpoints no longer in the file are retired: inactive, their pending
///   deliveries paused, nothing cancelled (`postern endpoints prune` deletes them).
pub async fn sync_config_endpoints(
    pool: &Pool,
    schema: &Schema,
    vault: &SecretBox,
    endpoints: &[EndpointConfig],
    generation: u64,
) -> anyhow::Result<Reconciled> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // Endpoints an older release created since migration 5 get their flow rows here.
    tx.execute(
        &schema.sql(
            "INSERT INTO __SCHEMA__.endpoint_flow (endpoint_id) SELECT id FROM __SCHEMA__.endpoints
             ON CONFLICT DO NOTHING",
        ),
        &[],
    )
    .await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("postern.endpoints.{}", schema.name())],
    )
    .await?;
    exclude_fan_out(&tx, schema).await?;
    let stored: Option<u64> = tx
        .query_opt(
            &schema.sql("SELECT value FROM __SCHEMA__.settings WHERE key = 'config_generation'"),
            &[],
        )
        .await?
        .and_then(|r| r.get::<_, String>(0).parse().ok());
    let mut outcome = Reconciled::default();
    if let Some(stored) = stored.filter(|s| *s > generation) {
        outcome.stale = Some(stored);
        tx.commit().await?;
        return Ok(outcome);
    }
    let retired_before: Vec<String> = tx
        .query(
            &schema.sql(&format!(
                "SELECT id FROM __SCHEMA__.endpoints WHERE source = 'config' AND deleted_at IS NULL
                   AND NOT active AND disabled_reason LIKE '{RETIRED}%'"
            )),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let upsert = schema.sql(&format!(
        "INSERT INTO __SCHEMA__.endpoints
            (id, url, events, tenant, description, headers, retry, signature, active, source,
             ordering_on_failure, rate_limit, breaker)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'config', $10, $11, $12)
         ON CONFLICT (id) DO UPDATE SET
            url = excluded.url, events = excluded.events, tenant = excluded.tenant,
            description = excluded.description, headers = excluded.headers, retry = excluded.retry,
            signature = excluded.signature, source = 'config', deleted_at = NULL,
            ordering_on_failure = excluded.ordering_on_failure,
            rate_limit = excluded.rate_limit, breaker = excluded.breaker,
            active = CASE WHEN endpoints.disabled_reason LIKE '{RETIRED}%' THEN excluded.active
                          ELSE endpoints.active END,
            disabled_reason = CASE WHEN endpoints.disabled_reason LIKE '{RETIRED}%' THEN NULL
                                   ELSE endpoints.disabled_reason END,
            updated_at = now()"
    ));
    let current_secrets = schema.sql(
        "SELECT secret FROM __SCHEMA__.endpoint_secrets WHERE endpoint_id = $1 AND expires_at IS NULL",
    );
    for e in endpoints {
        let headers: serde_json::Map<String, serde_json::Value> = e
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_ascii_lowercase(),
                    serde_json::Value::String(vault.seal(
                        v.expose(),
                        Field::Header {
                            endpoint: &e.id,
                            name: &k.to_ascii_lowercase(),
                        },
                    )),
                )
            })
            .collect();
        let retry = e
            .retry
            .as_ref()
            .map(|r| serde_json::to_value(r).expect("retry config serializes"));
        tx.execute(
            &upsert,
            &[
                &e.id,
                &e.url,
                &e.events,
                &e.tenant,
                &e.description,
                &serde_json::Value::Object(headers),
                &retry,
                &e.signature.as_str(),
                &e.active,
                &e.ordering.map(|o| o.on_failure.as_str()),
                &e.rate_limit.map(|r| r.to_string()),
                &e.breaker.map(|b| b.to_stored()),
            ],
        )
        .await
        .with_context(|| format!("upserting endpoint {}", e.id))?;
        ensure_flow_row(&tx, schema, &e.id).await?;
        if e.active && retired_before.contains(&e.id) {
            // Back in the file: what was paused when it left goes out now.
            state::resume_paused(&tx, schema, std::slice::from_ref(&e.id)).await?;
        }
        // Sealed values carry a random nonce, so compare after opening them.
        let mut present = false;
        for row in tx.query(&current_secrets, &[&e.id]).await? {
            let stored: String = row.get(0);
            let f = Field::Secret { endpoint: &e.id };
            let opened = vault.open(&stored, f).with_context(|| cannot_open(f))?;
            present |=
                crate::signing::constant_time_eq(opened.as_bytes(), e.secret.expose().as_bytes());
        }
        if !present {
            // A changed secret: the previous ones keep signing during the grace.
            add_secret(
                &tx,
                schema,
                vault,
                &e.id,
                e.secret.expose(),
                Some(CONFIG_SECRET_GRACE),
            )
            .await?;
        }
    }
    let ids: Vec<&str> = endpoints.iter().map(|e| e.id.as_str()).collect();
    let missing: Vec<String> = tx
        .query(
            &schema.sql(&format!(
                "SELECT id FROM __SCHEMA__.endpoints
                 WHERE source = 'config' AND deleted_at IS NULL AND id <> ALL($1)
                   AND (active OR disabled_reason IS NULL OR disabled_reason NOT LIKE '{RETIRED}%')
                 ORDER BY id"
            )),
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if stored.is_some_and(|s| s == generation) {
        outcome.kept = missing;
    } else if !missing.is_empty() {
        let reason = format!("{RETIRED} (config_generation {generation})");
        tx.execute(
            &schema.sql(
                "UPDATE __SCHEMA__.endpoints SET active = false, disabled_reason = $2, updated_at = now()
                 WHERE id = ANY($1)",
            ),
            &[&missing, &reason],
        )
        .await?;
        state::pause_waiting(&tx, schema, &missing).await?;
        announce(&tx, schema, &missing, Announce::Stop).await?;
        outcome.retired = missing;
    }
    crate::db::put_setting(&tx, schema, "config_generation", &generation.to_string()).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// `postern endpoints prune`: deletes the config endpoints retired because they left the file,
/// cancelling their unfinished deliveries (still listed). Returns their ids.
pub async fn prune_retired(pool: &Pool, schema: &Schema) -> anyhow::Result<Vec<String>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    exclude_fan_out(&tx, schema).await?;
    let ids: Vec<String> = tx
        .query(
            &schema.sql(&format!(
                "UPDATE __SCHEMA__.endpoints SET deleted_at = now(), updated_at = now()
                 WHERE source = 'config' AND deleted_at IS NULL AND NOT active
                   AND disabled_reason LIKE '{RETIRED}%'
                 RETURNING id"
            )),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    state::cancel_unfinished(&tx, schema, &ids).await?;
    announce(&tx, schema, &ids, Announce::Stop).await?;
    tx.commit().await?;
    Ok(ids)
}

/// Pauses or resumes an endpoint: inactive, its `pending` deliveries become `paused`; active
/// again, its `paused` deliveries become `pending`, due at once, so nothing is lost either way.
/// Returns false when no such (undeleted) endpoint exists.
pub async fn set_active(
    pool: &Pool,
    schema: &Schema,
    id: &str,
    active: bool,
    reason: Option<&str>,
) -> anyhow::Result<bool> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    exclude_fan_out(&tx, schema).await?;
    let found = tx
        .execute(
            &schema.sql(
                "UPDATE __SCHEMA__.endpoints
                 SET active = $2, disabled_reason = CASE WHEN $2 THEN NULL ELSE $3 END, updated_at = now()
                 WHERE id = $1 AND deleted_at IS NULL",
            ),
            &[&id, &active, &reason],
        )
        .await?
        > 0;
    if found {
        let ids = [id.to_string()];
        if active {
            state::resume_paused(&tx, schema, &ids).await?;
        } else {
            state::pause_waiting(&tx, schema, &ids).await?;
        }
        let what = if active {
            Announce::Resume
        } else {
            Announce::Stop
        };
        announce(&tx, schema, &[id.to_string()], what).await?;
    }
    tx.commit().await?;
    Ok(found)
}

/// Fan-out passes hold this lock shared; a change that stops an endpoint taking some deliveries
/// (delete, pause, a new tenant) holds it exclusively. So a pass that read the endpoint as it was
/// before the change has committed before the change does, and the change's own statements then
/// see (and pause or cancel) what that pass inserted: no race leaves a delivery behind.
/// This takes it exclusively, until the transaction ends.
pub async fn exclude_fan_out(
    tx: &deadpool_postgres::Transaction<'_>,
    schema: &Schema,
) -> anyhow::Result<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&schema.fan_out_lock_key()],
    )
    .await?;
    Ok(())
}

/// What every replica is told about an endpoint when the transaction commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// Send nothing more to it (deleted, paused): held deliveries go back.
    Stop,
    /// It takes deliveries again.
    Resume,
    /// What is held for it was decided under rules that changed: held deliveries go back.
    Revoke,
}

impl Announce {
    pub fn as_str(self) -> &'static str {
        match self {
            Announce::Stop => "stop",
            Announce::Resume => "resume",
            Announce::Revoke => "revoke",
        }
    }

    /// Parses a notification payload `<what>:<endpoint id>`.
    pub fn parse(payload: &str) -> Option<(Self, &str)> {
        let (what, id) = payload.split_once(':')?;
        let what = match what {
            "stop" => Announce::Stop,
            "resume" => Announce::Resume,
            "revoke" => Announce::Revoke,
            _ => return None,
        };
        Some((what, id))
    }
}

pub async fn announce(
    tx: &deadpool_postgres::Transaction<'_>,
    schema: &Schema,
    endpoint_ids: &[String],
    what: Announce,
) -> anyhow::Result<()> {
    for id in endpoint_ids {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[
                &schema.endpoints_channel(),
                &format!("{}:{id}", what.as_str()),
            ],
        )
        .await?;
    }
    Ok(())
}
