//! The outbox's notify trigger: the wake-up the app's commits send, installed per `outbound.notify`.
//! Invariant: nothing the trigger keeps can silence wake-ups for good: a clock never set, or set
//! to anything but the current window, makes the next commit announce itself; the table stays the
//! truth and polling covers a lost wake-up.

use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;

use super::Schema;
use crate::config::{Config, NotifyMode};

/// What the database's trigger does now, as `migrate` installed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifySetting {
    pub mode: String,
    pub throttle_ms: u64,
}

impl NotifySetting {
    pub fn from_config(config: &Config) -> Self {
        Self {
            mode: config.outbound.notify.as_str().to_string(),
            throttle_ms: config.outbound.notify_throttle.0.as_millis().max(1) as u64,
        }
    }

    fn encode(&self) -> String {
        format!("{}:{}:{TRIGGER_SHAPE}", self.mode, self.throttle_ms)
    }

    /// The setting and the shape of the trigger that was installed for it (1 when not recorded).
    fn decode(s: &str) -> Option<(Self, u32)> {
        let mut parts = s.split(':');
        let mode = parts.next()?.to_string();
        let throttle_ms = parts.next()?.parse().ok()?;
        let shape = match parts.next() {
            None => 1,
            Some(v) => v.parse().ok()?,
        };
        Some((Self { mode, throttle_ms }, shape))
    }
}

/// The shape of the trigger this build installs, recorded with the setting: an upgrade replaces a
/// trigger an earlier build installed even when mode and throttle are unchanged. 2: the throttle
/// compares window numbers (1 compared milliseconds with a sliding window); 3: as 2, and no
/// window at all while the stream is sparse; 4: sparse up to one event per 0.5 ms, not 2.
const TRIGGER_SHAPE: u32 = 4;

/// A stream whose events came at most one per this long on average since the previous wake-up is
/// sparse: each of its commits is announced (capped by the throttle). So a stream of up to about
/// 2,000 events/s is announced commit by commit; one commit closer than this to the previous
/// wake-up closes the window, and the next wake-up looks again.
pub const SPARSE_GAP: Duration = Duration::from_micros(500);

/// Installs the outbox trigger for `wanted`. With `force` (the `migrate` command) it always
/// installs; otherwise (startup) it installs only when none was installed yet and returns the
/// installed setting when it differs, so replicas configured differently warn instead of fighting.
pub async fn install_notify(
    pool: &Pool,
    schema: &Schema,
    wanted: &NotifySetting,
    force: bool,
) -> anyhow::Result<Option<NotifySetting>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    super::take_migration_lock(&tx, schema).await?;
    let current = tx
        .query_opt(
            &schema.sql("SELECT value FROM __SCHEMA__.settings WHERE key = 'notify'"),
            &[],
        )
        .await?
        .and_then(|r| NotifySetting::decode(r.get(0)));
    if let Some((current, shape)) = &current {
        // A newer build's trigger (a later shape) is kept: during a rollout or a rollback the
        // builds would otherwise replace each other's at every start.
        if current == wanted && *shape >= TRIGGER_SHAPE {
            return Ok(None);
        }
        if current != wanted && !force {
            return Ok(Some(current.clone()));
        }
    }
    let channel = schema.channel();
    // The throttle lives in the trigger's WHEN clause, which the executor evaluates before
    // deciding to call the function at all: inside a window (nearly every commit under load) no
    // plpgsql runs. Postgres parses the clause from its stored node text on every INSERT statement,
    // so its size is a cost on the app's commit path (3.7 kB of node text for a sliding window
    // cost 6 % of the bare insert rate against 1.4 kB for this, and a deadline compared with two
    // more operators cost about 2 % of the app-shaped rate): the clock is a window number,
    // compared once, with a typed constant that needs no cast node. The sequence remembers the
    // last window a wake-up was sent in; a clock never set or set to another window (by hand, or
    // the system clock stepped) is simply different, so nothing can silence wake-ups.
    // The function first closes the window (so few commits race it through), then looks at what
    // happened since the previous wake-up: when the events came further apart on average than
    // `SPARSE_GAP` (a sparse stream), it sets the clock to 0, a window that never comes, so the
    // next commit is announced too, whenever it comes; the first commit that comes sooner than
    // that after the previous one finds the stream dense and leaves the window closed. A commit
    // that raced the previous wake-up through the clause (the identity has not moved since) counts
    // as dense. The payload says which: `0` for sparse, the window in microseconds for dense.
    let window = format!(
        "(date_part('epoch', clock_timestamp()) * '{:?}'::float8)::bigint",
        1000.0 / wanted.throttle_ms as f64
    );
    let now = "(date_part('epoch', clock_timestamp()) * '1000000'::float8)::bigint";
    let long = wanted.throttle_ms.max(1) * 1000;
    let gap = (SPARSE_GAP.as_micros() as u64).min(long);
    let (body, when) = match wanted.mode.as_str() {
        "statement" => (
            format!("BEGIN PERFORM pg_notify('{channel}', ''); RETURN NULL; END"),
            String::new(),
        ),
        "throttled" => (
            format!(
                "DECLARE
                   now_us bigint := {now};
                   events bigint;
                   since bigint;
                   window_us bigint := {long};
                 BEGIN
                   PERFORM setval('__SCHEMA__.notify_clock', {window});
                   events := pg_sequence_last_value('__SCHEMA__.outbox_id_seq'::regclass);
                   since := events - coalesce(pg_sequence_last_value('__SCHEMA__.notify_mark'::regclass), 0);
                   IF since > 0 AND now_us - coalesce(pg_sequence_last_value('__SCHEMA__.notify_mark_at'::regclass), 0)
                                    >= since * {gap} THEN
                     window_us := 0;
                     PERFORM setval('__SCHEMA__.notify_clock', 0);
                   END IF;
                   PERFORM setval('__SCHEMA__.notify_mark', events);
                   PERFORM setval('__SCHEMA__.notify_mark_at', now_us);
                   PERFORM pg_notify('{channel}', window_us::text);
                   RETURN NULL;
                 END"
            ),
            format!(
                "WHEN (pg_sequence_last_value('__SCHEMA__.notify_clock'::regclass)
                       IS DISTINCT FROM {window})"
            ),
        ),
        _ => (String::new(), String::new()),
    };
    // Dropping the trigger needs the outbox to itself: waiting for it would queue every insert
    // of the app's behind this one. Better to fail and keep the trigger there is (the next start,
    // or `postern migrate`, tries again).
    tx.batch_execute(&schema.sql(
        "SET LOCAL lock_timeout = '2s'; DROP TRIGGER IF EXISTS outbox_notify ON __SCHEMA__.outbox;",
    ))
    .await
    .context("replacing the outbox notify trigger (the outbox was busy past the lock timeout?)")?;
    if !body.is_empty() {
        // Invoker's rights and no SET clause: a function-level SET costs a configuration save and
        // restore on every call, on the app's commit path. Publishers get rights on the clock
        // sequence instead (see `migrate`).
        tx.batch_execute(&schema.sql(&format!(
            "CREATE OR REPLACE FUNCTION __SCHEMA__.outbox_notify() RETURNS trigger
               LANGUAGE plpgsql
             AS $fn$ {body} $fn$;
             REVOKE EXECUTE ON FUNCTION __SCHEMA__.outbox_notify() FROM PUBLIC;
             CREATE TRIGGER outbox_notify AFTER INSERT ON __SCHEMA__.outbox
               FOR EACH STATEMENT {when} EXECUTE FUNCTION __SCHEMA__.outbox_notify();"
        )))
        .await
        .context("installing the outbox notify trigger")?;
    }
    super::put_setting(&tx, schema, "notify", &wanted.encode()).await?;
    tx.commit().await?;
    Ok(None)
}

/// Whether the notify mode needs a LISTEN connection at all.
pub fn listens(mode: NotifyMode) -> bool {
    mode != NotifyMode::None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::scratch::Scratch;

    /// During a rollout (or a rollback) two builds start side by side: the older must keep the
    /// trigger a newer build installed, not put its own back (each reinstall drops the trigger,
    /// which waits for, and then holds off, every insert into the outbox), and a reinstall that
    /// cannot have the outbox within its lock timeout gives up instead of queueing the app's
    /// inserts behind it.
    #[tokio::test]
    async fn an_older_build_keeps_a_newer_trigger_and_never_waits_long_for_the_outbox() {
        let s = Scratch::new().await;
        let wanted = NotifySetting {
            mode: "throttled".into(),
            throttle_ms: 10,
        };
        install_notify(&s.pool, &s.schema, &wanted, false)
            .await
            .unwrap();
        let newer = format!("throttled:10:{}", TRIGGER_SHAPE + 1);
        s.run(&format!(
            "UPDATE __SCHEMA__.settings SET value = '{newer}' WHERE key = 'notify'"
        ))
        .await;
        assert_eq!(
            install_notify(&s.pool, &s.schema, &wanted, false)
                .await
                .unwrap(),
            None
        );
        let kept: Vec<(String, String)> = s
            .pairs("SELECT key, value FROM __SCHEMA__.settings WHERE key = 'notify'")
            .await;
        assert_eq!(kept[0].1, newer, "the newer trigger was replaced");

        // An older shape is replaced, but not by waiting behind a transaction that holds the
        // outbox: the reinstall fails fast.
        s.run("UPDATE __SCHEMA__.settings SET value = 'throttled:10:1' WHERE key = 'notify'")
            .await;
        let mut app = s.pool.get().await.unwrap();
        let busy = app.transaction().await.unwrap();
        busy.batch_execute(
            &s.schema
                .sql("INSERT INTO __SCHEMA__.outbox (event_type, payload) VALUES ('t', '{}')"),
        )
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let tried = install_notify(&s.pool, &s.schema, &wanted, false).await;
        assert!(tried.is_err(), "installed while the outbox was held");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        busy.rollback().await.unwrap();
        drop(app);
        s.drop_schema().await;
    }
}
