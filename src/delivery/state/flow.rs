//! Flow policies shared by every replica through `endpoint_flow` (migration 5): a rate limit per
//! endpoint, back pressure from the receiver (429/503) and a circuit breaker. Invariant: the only
//! writers of a flow row are the claim (taking tokens and probes, under the row's lock, in
//! endpoint order) and `record_flow` (outcomes, under the same lock): so the limit holds across
//! replicas, and a receiver that is down gets one probe per interval, whoever makes it.
//!
//! Design, and why:
//! - **Token bucket in the claim.** A limited endpoint's row holds tokens and when they were
//!   counted; the claim refills them by the elapsed time, claims at most what is there, and
//!   subtracts what it took, in the same statement. Replicas wait for each other on the row, so
//!   two never spend the same tokens. The bucket holds a tenth of a second of tokens (at least
//!   one), so no second sees more than the rate and a tenth (a claim that leaves deliveries for
//!   want of tokens looks again 50 ms later). Deliveries waiting for tokens stay `pending`:
//!   nothing is counted as an attempt.
//! - **Back pressure.** A 429 or 503 halves the endpoint's rate (its limit, or for an unlimited
//!   endpoint `per_endpoint_concurrency` per second) and it recovers by a tenth of its ceiling per
//!   second; a `Retry-After` pauses the whole endpoint (at most an hour), not only the delivery.
//! - **Breaker.** Outcomes are counted per endpoint only once it fails (a healthy endpoint's
//!   successes cost one index probe), so the failure rate is measured from the first failure in a
//!   window. Open: nothing is claimed but one probe per `probe_interval`, so a receiver down for an
//!   hour does not burn its deliveries' attempts; a success closes it; open for `disable_after`
//!   disables the endpoint (its deliveries paused, as after a 410). Every transition is published
//!   into the outbox as `postern.endpoint.circuit_opened` / `circuit_closed` / `disabled`.
//! - **No cost when unused.** Every endpoint has a flow row, but a healthy unlimited endpoint's is
//!   neither locked nor written; the fan-out fast path skips only endpoints with a policy in force
//!   (so it never bypasses a limit), and claims take the gated statement only while the last
//!   fan-out pass saw some endpoint with one (the plain claim leaves such endpoints out).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

use super::{Ack, Settle};
use crate::config::{BreakerConfig, RateLimit};
use crate::db::Schema;

/// The replica's defaults for endpoints that set none.
#[derive(Debug, Clone)]
pub struct FlowDefaults {
    /// `outbound.rate_limit`, per second.
    pub rate: Option<f64>,
    /// `[outbound.breaker]` with every key filled.
    pub breaker: BreakerConfig,
    /// Where back pressure starts for an endpoint without a limit (per second).
    pub pushback_start: f64,
}

impl FlowDefaults {
    pub fn new(rate: Option<RateLimit>, breaker: &BreakerConfig, per_endpoint: usize) -> Self {
        Self {
            rate: rate.map(RateLimit::per_second),
            breaker: breaker.with_defaults(),
            pushback_start: per_endpoint.max(1) as f64,
        }
    }

    /// The breaker's window for endpoints that set none, in seconds (`breaker` has every key
    /// filled; were it not, a window of 0 ends at once, so no count could grow).
    pub fn window_seconds(&self) -> f64 {
        self.breaker.window.map_or(0.0, |d| d.0.as_secs_f64())
    }

    pub fn probe_seconds(&self) -> f64 {
        self.breaker
            .probe_interval
            .map_or(30.0, |d| d.0.as_secs_f64())
    }

    /// What `record_flow` takes as `p_defaults`.
    fn stored(&self) -> serde_json::Value {
        let mut v = self.breaker.to_stored();
        let m = v.as_object_mut().expect("an object");
        m.insert("rate".into(), self.rate.into());
        m.insert("pushback_start".into(), self.pushback_start.into());
        v
    }
}

/// A batch's outcomes per endpoint, as `record_flow` takes them.
#[derive(Debug, Default)]
pub struct FlowBatch {
    endpoints: Vec<String>,
    attempts: Vec<i32>,
    failures: Vec<i32>,
    trailing: Vec<i32>,
    succeeded: Vec<bool>,
    pushback: Vec<bool>,
    retry_after: Vec<Option<f64>>,
    /// Endpoints whose outcomes were all successes, and how many: only reset if they had failed.
    pub healthy: Vec<String>,
    pub healthy_attempts: Vec<i32>,
}

impl FlowBatch {
    /// Groups the acks by endpoint. Outcomes that say nothing about the receiver (an attempt cut
    /// short at shutdown, a 410, which disables the endpoint by itself) are not counted.
    pub fn of(acks: &[Ack]) -> Self {
        #[derive(Default)]
        struct Tally {
            attempts: i32,
            failures: i32,
            trailing: i32,
            succeeded: bool,
            pushback: bool,
            retry_after: Option<f64>,
            probe: bool,
        }
        let mut per: BTreeMap<&str, Tally> = BTreeMap::new();
        // A 410 says the endpoint is gone (it is disabled), not that it is healthy: counted as
        // neither, or it would close an open circuit as a success would.
        for a in acks
            .iter()
            .filter(|a| a.judged && a.settle != Settle::EndpointGone)
        {
            let t = per.entry(&a.endpoint_id).or_default();
            t.attempts += 1;
            t.probe |= a.probe;
            match a.settle {
                Settle::Delivered => {
                    t.succeeded = true;
                    t.trailing = 0;
                }
                Settle::Retry { .. } | Settle::Failed => {
                    t.failures += 1;
                    t.trailing += 1;
                }
                Settle::EndpointGone => {}
            }
            if matches!(a.record.status_code, Some(429 | 503)) {
                t.pushback = true;
                if let Some(s) = a.retry_after {
                    let s = s.as_secs_f64();
                    t.retry_after = Some(t.retry_after.map_or(s, |r: f64| r.max(s)));
                }
            }
        }
        let mut b = FlowBatch::default();
        for (id, t) in per {
            if t.failures == 0 && !t.pushback && !t.probe {
                b.healthy.push(id.to_string());
                b.healthy_attempts.push(t.attempts);
                continue;
            }
            b.endpoints.push(id.to_string());
            b.attempts.push(t.attempts);
            b.failures.push(t.failures);
            b.trailing.push(t.trailing);
            b.succeeded.push(t.succeeded);
            b.pushback.push(t.pushback);
            b.retry_after.push(t.retry_after);
        }
        b
    }

    /// Whether `record_flow` has anything to record (failures, back pressure or a probe).
    pub fn needs_record(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// Moves the successes-only endpoints to what `record_flow` takes (which resets them only if
    /// they had failed), so a transaction locks all its flow rows in one pass, in endpoint order.
    pub fn fold_healthy_into_record(&mut self) {
        for (id, n) in self.healthy.drain(..).zip(self.healthy_attempts.drain(..)) {
            self.endpoints.push(id);
            self.attempts.push(n);
            self.failures.push(0);
            self.trailing.push(0);
            self.succeeded.push(true);
            self.pushback.push(false);
            self.retry_after.push(None);
        }
    }
}

/// A breaker transition, as published.
#[derive(Debug)]
pub struct Transition {
    pub endpoint_id: String,
    pub kind: String,
    pub reason: String,
    pub consecutive_failures: i32,
    pub opened_at: Option<DateTime<Utc>>,
}

/// SQL texts for one schema.
pub struct Flow {
    record: String,
    publish: String,
    disable: String,
    announce: String,
    revoke: String,
    defaults: serde_json::Value,
}

impl Flow {
    pub fn new(schema: &Schema, defaults: &FlowDefaults) -> Self {
        Self {
            record: schema.sql("SELECT * FROM __SCHEMA__.record_flow($1, $2, $3, $4, $5, $6, $7, $8)"),
            publish: schema.sql(
                "INSERT INTO __SCHEMA__.outbox (event_type, payload)
                 SELECT 'postern.endpoint.' || t.kind,
                        jsonb_build_object('endpoint_id', t.id, 'reason', t.reason,
                                           'consecutive_failures', t.n, 'circuit_opened_at', t.opened_at)
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[])
                   AS t(id, kind, reason, n, opened_at)",
            ),
            disable: schema.sql(
                "UPDATE __SCHEMA__.endpoints
                 SET active = false, disabled_reason = $2, updated_at = now()
                 WHERE id = $1 AND active",
            ),
            announce: format!("SELECT pg_notify('{}', 'stop:' || $1)", schema.endpoints_channel()),
            revoke: format!("SELECT pg_notify('{}', 'revoke:' || $1)", schema.endpoints_channel()),
            defaults: defaults.stored(),
        }
    }

    /// Records the batch's failures, back pressure and probes, and acts on the transitions:
    /// publishes each, and disables endpoints open too long (announced, so every replica stops;
    /// the sweeper pauses their deliveries). Part of the caller's transaction.
    pub async fn record(
        &self,
        tx: &impl GenericClient,
        batch: &FlowBatch,
    ) -> anyhow::Result<Vec<Transition>> {
        if !batch.needs_record() {
            return Ok(Vec::new());
        }
        let rows = tx
            .query(
                &self.record,
                &[
                    &batch.endpoints,
                    &batch.attempts,
                    &batch.failures,
                    &batch.trailing,
                    &batch.succeeded,
                    &batch.pushback,
                    &batch.retry_after,
                    &self.defaults,
                ],
            )
            .await?;
        let transitions: Vec<Transition> = rows
            .iter()
            .map(|r| Transition {
                endpoint_id: r.get(0),
                kind: r.get(1),
                reason: r.get(2),
                consecutive_failures: r.get(3),
                opened_at: r.get(4),
            })
            .collect();
        if transitions.is_empty() {
            return Ok(transitions);
        }
        let kind = |t: &Transition| match t.kind.as_str() {
            "opened" => "circuit_opened",
            "closed" => "circuit_closed",
            _ => "disabled",
        };
        let ids: Vec<&str> = transitions.iter().map(|t| t.endpoint_id.as_str()).collect();
        let kinds: Vec<&str> = transitions.iter().map(kind).collect();
        let reasons: Vec<&str> = transitions.iter().map(|t| t.reason.as_str()).collect();
        let counts: Vec<i32> = transitions.iter().map(|t| t.consecutive_failures).collect();
        let opened: Vec<Option<DateTime<Utc>>> = transitions.iter().map(|t| t.opened_at).collect();
        tx.execute(&self.publish, &[&ids, &kinds, &reasons, &counts, &opened])
            .await?;
        // Open: what any replica holds for the endpoint goes back instead of out (the circuit
        // gets its probe and nothing else), once this commits.
        for t in transitions.iter().filter(|t| t.kind == "opened") {
            tx.execute(&self.revoke, &[&t.endpoint_id]).await?;
        }
        for t in transitions.iter().filter(|t| t.kind == "disabled") {
            let reason = format!("disabled by the circuit breaker: {}", t.reason);
            tx.execute(&self.disable, &[&t.endpoint_id, &reason])
                .await?;
            tx.execute(&self.announce, &[&t.endpoint_id]).await?;
        }
        Ok(transitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::state::AttemptRecord;

    fn ack(endpoint: &str, settle: Settle, status: i32) -> Ack {
        Ack {
            id: uuid::Uuid::now_v7(),
            attempt: 1,
            endpoint_id: endpoint.into(),
            ordering_key: None,
            judged: true,
            probe: false,
            retry_after: None,
            settle,
            record: AttemptRecord {
                started_at: chrono::Utc::now(),
                duration_ms: 1,
                status_code: Some(status),
                response_body: None,
                error: None,
                request_headers: None,
            },
        }
    }

    #[test]
    fn a_gone_endpoint_counts_neither_as_healthy_nor_as_failing() {
        let b = FlowBatch::of(&[ack("gone", Settle::EndpointGone, 410)]);
        assert!(b.healthy.is_empty(), "{b:?}");
        assert!(b.endpoints.is_empty(), "{b:?}");
        let b = FlowBatch::of(&[
            ack("ok", Settle::Delivered, 200),
            ack("gone", Settle::EndpointGone, 410),
        ]);
        assert_eq!(b.healthy, ["ok"]);
        assert!(b.endpoints.is_empty());
    }
}
