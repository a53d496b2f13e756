//! An endpoint's stored secrets: adding one (a rotation retires the others after a grace),
//! counting those that sign, and sealing them under the database encryption key. Invariant: a
//! secret is stored sealed whenever a key is configured, and a replica that cannot open one
//! refuses to start rather than sign with the wrong key.

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;

use crate::crypto::{Field, SecretBox};
use crate::db::Schema;

/// Every unexpired secret of an endpoint signs each delivery to it, so rotations stop at this
/// many (until an older one's grace ends, or a rotation with no grace retires the others).
pub const MAX_SIGNING_SECRETS: i64 = 5;

/// Stores a new secret for an endpoint, sealed. With `retire_others`, every other unexpired secret
/// keeps signing for that grace and then expires (a rotation); without, they are left as they are.
pub async fn add_secret(
    tx: &deadpool_postgres::Transaction<'_>,
    schema: &Schema,
    vault: &SecretBox,
    endpoint_id: &str,
    secret: &str,
    retire_others: Option<Duration>,
) -> anyhow::Result<()> {
    if let Some(grace) = retire_others {
        tx.execute(
            &schema.sql(
                "UPDATE __SCHEMA__.endpoint_secrets
                 SET expires_at = LEAST(COALESCE(expires_at, 'infinity'), now() + make_interval(secs => $2))
                 WHERE endpoint_id = $1 AND (expires_at IS NULL OR expires_at > now())",
            ),
            &[&endpoint_id, &grace.as_secs_f64()],
        )
        .await?;
    }
    tx.execute(
        &schema
            .sql("INSERT INTO __SCHEMA__.endpoint_secrets (endpoint_id, secret) VALUES ($1, $2)"),
        &[
            &endpoint_id,
            &vault.seal(
                secret,
                Field::Secret {
                    endpoint: endpoint_id,
                },
            ),
        ],
    )
    .await?;
    Ok(())
}

/// Every stored value that can be sealed: (endpoint, field, stored text, secret row id).
async fn sealed_values(
    client: &impl deadpool_postgres::GenericClient,
    schema: &Schema,
) -> anyhow::Result<Vec<(String, Option<String>, String, Option<i64>)>> {
    let mut values = Vec::new();
    for row in client
        .query(
            &schema.sql(
                "SELECT s.endpoint_id, s.secret, s.id FROM __SCHEMA__.endpoint_secrets s
                 JOIN __SCHEMA__.endpoints e ON e.id = s.endpoint_id
                 WHERE e.deleted_at IS NULL AND (s.expires_at IS NULL OR s.expires_at > now())",
            ),
            &[],
        )
        .await?
    {
        values.push((row.get(0), None, row.get(1), Some(row.get(2))));
    }
    for row in client
        .query(
            &schema.sql(
                "SELECT e.id, h.key, h.value FROM __SCHEMA__.endpoints e,
                        jsonb_each_text(e.headers) AS h(key, value)
                 WHERE e.deleted_at IS NULL",
            ),
            &[],
        )
        .await?
    {
        values.push((row.get(0), Some(row.get(1)), row.get(2), None));
    }
    Ok(values)
}

pub(super) fn cannot_open(f: Field<'_>) -> String {
    format!("cannot open {f} (set database.encryption_key, or list the key that sealed it in database.encryption_keys)")
}

fn field<'a>(endpoint: &'a str, header: Option<&'a str>) -> Field<'a> {
    match header {
        None => Field::Secret { endpoint },
        Some(name) => Field::Header { endpoint, name },
    }
}

/// Opens every stored secret and custom header value of every endpoint (the API's too), so a
/// missing or wrong key stops the replica at start with the endpoint named, instead of surfacing
/// delivery by delivery.
pub async fn check_sealed(pool: &Pool, schema: &Schema, vault: &SecretBox) -> anyhow::Result<()> {
    let client = pool.get().await?;
    for (endpoint, header, stored, _) in sealed_values(&client, schema).await? {
        let f = field(&endpoint, header.as_deref());
        vault.open(&stored, f).with_context(|| cannot_open(f))?;
    }
    Ok(())
}

/// Seals again, with the current key, every value that is plain text or sealed by an older key
/// or format; returns how many. Then, with a key in use, the tables refuse plain text from now on
/// (a replica without the key cannot downgrade a secret). Idempotent; one replica at a time.
pub async fn reseal(pool: &Pool, schema: &Schema, vault: &SecretBox) -> anyhow::Result<usize> {
    if !vault.encrypting() {
        return Ok(0);
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("postern.endpoints.{}", schema.name())],
    )
    .await?;
    let mut n = 0;
    for (endpoint, header, stored, secret_id) in sealed_values(&tx, schema).await? {
        if !vault.needs_reseal(&stored) {
            continue;
        }
        let f = field(&endpoint, header.as_deref());
        let plain = vault
            .open(&stored, f)
            .with_context(|| format!("re-sealing {f}"))?;
        let sealed = vault.seal(&plain, f);
        match (secret_id, &header) {
            (Some(id), _) => {
                tx.execute(
                    &schema.sql(
                        "UPDATE __SCHEMA__.endpoint_secrets SET secret = $2 WHERE id = $1 AND secret = $3",
                    ),
                    &[&id, &sealed, &stored],
                )
                .await?;
            }
            (None, Some(name)) => {
                tx.execute(
                    &schema.sql(
                        "UPDATE __SCHEMA__.endpoints SET headers = jsonb_set(headers, ARRAY[$2], to_jsonb($3::text))
                         WHERE id = $1 AND headers->>$2 = $4",
                    ),
                    // Only if the value is still the one opened: an API change made meanwhile wins.
                    &[&endpoint, name, &sealed, &stored],
                )
                .await?;
            }
            (None, None) => unreachable!("a value is a secret or a header"),
        }
        n += 1;
    }
    // The endpoints' version triggers (migration 9) wait for the commit; with their events
    // pending, the ALTER TABLE below is refused. Fired now, they move the version all the same.
    tx.batch_execute(&schema.sql(
        "SET CONSTRAINTS __SCHEMA__.endpoints_changed, __SCHEMA__.endpoint_secrets_changed IMMEDIATE",
    ))
    .await?;
    // NOT VALID: rows written before (expired secrets, deleted endpoints) are left as they are.
    let constraints = [
        // This build's format only: a value sealed without a key id or row binding (enc:v1)
        // copied into a row is refused too.
        ("endpoint_secrets", "secret LIKE 'enc:v2:%'"),
        (
            "endpoints",
            r#"NOT jsonb_path_exists(headers, '$.* ? (!(@ starts with "enc:v2:"))')"#,
        ),
    ];
    for (table, check) in constraints {
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint
                  WHERE conname = $1 AND conrelid = to_regclass($2))",
                &[&SEALED_ONLY, &format!("{}.{table}", schema.name())],
            )
            .await?
            .get(0);
        if !exists {
            tx.batch_execute(&schema.sql(&format!(
                "ALTER TABLE __SCHEMA__.{table} ADD CONSTRAINT {SEALED_ONLY} CHECK ({check}) NOT VALID"
            )))
            .await?;
        }
    }
    tx.commit().await?;
    Ok(n)
}

/// The constraint that keeps plain text out once a key is in use; its name is the message a
/// replica without the key gets.
pub const SEALED_ONLY: &str = "sealed_only_database_encryption_key_in_use";

/// How many of an endpoint's secrets sign now, and when the first of them retires (RFC 3339, UTC;
/// `None` when none has an end). Part of the caller's transaction.
pub async fn signing_secrets(
    tx: &deadpool_postgres::Transaction<'_>,
    schema: &Schema,
    endpoint_id: &str,
) -> anyhow::Result<(i64, Option<String>)> {
    let row = tx
        .query_one(
            &schema.sql(
                "SELECT count(*), to_char(min(expires_at) AT TIME ZONE 'UTC',
                                         'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                 FROM __SCHEMA__.endpoint_secrets
                 WHERE endpoint_id = $1 AND (expires_at IS NULL OR expires_at > now())",
            ),
            &[&endpoint_id],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}
