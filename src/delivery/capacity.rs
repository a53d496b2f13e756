//! A replica's delivery capacity: holds (a delivery claimed or handed over, not yet settled),
//! bounded in count per replica and per endpoint and in bytes by the memory budget, and request
//! slots, bounded per replica and per endpoint. Also which endpoints this replica must not send to
//! now (stopped) and which holds a change voided (revoked). Invariant: a hold lives from claim or
//! fan-out to written outcome, so claims and fan-outs never outrun settling; dropping it gives
//! everything back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::slots::{EndpointRequests, RequestSlot, Slots};

use super::WorkerSettings;

/// How many deliveries a replica holds (claimed or handed over, not yet settled) per request it
/// may have in flight to one endpoint: claims, fan-outs and settles are round trips to a database
/// the app is keeping busy, so the window of held deliveries must cover their latency, while
/// requests stay bounded by `per_endpoint_concurrency`. Measured with the live benchmark
/// (BENCHMARKS.md): a window of 4 kept 0.64-0.66 of the app's commits/s to one endpoint, 16 kept
/// 0.81-0.84 (before the fan-out fast path existed).
const HOLDS_PER_ENDPOINT_REQUEST: usize = 16;

/// The same for the whole replica, per request of `concurrency`. Every held delivery has its
/// payload in memory, so this also bounds memory: 1,024 held deliveries with the defaults (and
/// the reserve's 256; the memory budget bounds their bytes).
const HOLDS_PER_REQUEST: usize = 4;

/// What holding a delivery costs the memory budget, in KiB: its payload twice (the shared
/// payload, and the request body built from it while the attempt is in flight) plus a KiB for
/// the rest, so the budget bounds what the replica really keeps.
fn charge_kib(payload_len: usize) -> u32 {
    u32::try_from(payload_len.saturating_mul(2) / 1024 + 1).unwrap_or(u32::MAX >> 4)
}

/// This replica's delivery capacity, shared by the worker (claims) and the dispatcher (fresh
/// deliveries it claims as it fans them out). A hold is taken per delivery from claim (or
/// fan-out) to written outcome; requests are bounded separately, globally and per endpoint.
pub struct Capacity {
    holds: Arc<Semaphore>,
    /// Holds beyond `holds` for endpoints holding fewer than their request slots: however many
    /// deliveries slow endpoints keep waiting (each up to `per_endpoint_held`), another endpoint
    /// can still be sent to at once. `concurrency` of them, as many as requests can be in flight.
    reserve: Arc<Semaphore>,
    /// The memory budget in KiB: each held delivery takes its charge (see [`charge_kib`]).
    bytes: Arc<Semaphore>,
    /// The charge of the largest payload allowed: a claim waits until this much is free.
    max_charge: u32,
    memory_budget: u64,
    /// The largest payload seen lately (decaying): a claim asks for no more rows than the
    /// budget's room holds at that size, so the database does not size rows it cannot keep.
    recent_payload: std::sync::atomic::AtomicUsize,
    slots: Slots,
    per_endpoint_requests: usize,
    pub(super) per_endpoint_held: i32,
    /// Held deliveries per endpoint and the endpoint's request semaphore (present while any are held).
    per_endpoint: Mutex<HashMap<String, (i32, Arc<EndpointRequests>)>>,
    /// Endpoints this replica must not send to (an answer of 410, or paused or deleted through the
    /// API), until when: held deliveries to them go back instead of out, claims and the fast path
    /// skip them. After `stop_for` the database's state (inactive, deleted) is what counts.
    stopped: Mutex<HashMap<String, std::time::Instant>>,
    /// When each endpoint last changed in a way that voids what replicas hold for it (its tenant,
    /// say): holds taken before then are handed back, not sent.
    revoked: Mutex<HashMap<String, std::time::Instant>>,
    revoked_all: Mutex<Option<std::time::Instant>>,
    stop_for: Duration,
    /// Some endpoint has a flow policy in force (a rate limit, back pressure, an open circuit), as
    /// the last fan-out pass saw: claims then take the gated statement (`state::flow`).
    hindered: std::sync::atomic::AtomicBool,
    /// Per endpoint, the failures its breaker counts that are not written yet (see
    /// [`FailureMark`]).
    unwritten_failures: Mutex<HashMap<String, usize>>,
}

/// A failure on its way to the settler: while one is, a success of the same endpoint is not
/// written by its fan-out (`delivery::Folded`), which would put it in the breaker's count ahead of
/// the failure that came first. Dropped once the failure is written (or given up).
pub struct FailureMark {
    endpoint: String,
    capacity: Arc<Capacity>,
}

impl Drop for FailureMark {
    fn drop(&mut self) {
        let mut map = self
            .capacity
            .unwritten_failures
            .lock()
            .expect("failures map");
        if let Some(n) = map.get_mut(&self.endpoint) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.endpoint);
            }
        }
    }
}

/// One delivery's hold on its replica's capacity; dropping it gives the hold back. It lives until
/// the delivery's outcome is written, so claims and fan-outs never outrun settling.
pub struct Hold {
    _hold: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
    pub(super) endpoint: String,
    taken: std::time::Instant,
    endpoint_requests: Arc<EndpointRequests>,
    pub(super) capacity: Arc<Capacity>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut map = self.capacity.per_endpoint.lock().expect("capacity map");
        if let Some(entry) = map.get_mut(&self.endpoint) {
            entry.0 -= 1;
            if entry.0 <= 0 {
                map.remove(&self.endpoint);
            }
        }
    }
}

impl Capacity {
    /// What the last fan-out pass saw: whether some endpoint has a flow policy in force.
    pub fn set_hindered(&self, any: bool) {
        self.hindered
            .store(any, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn any_hindered(&self) -> bool {
        self.hindered.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn new(settings: &WorkerSettings) -> Arc<Self> {
        // Half the budget for held deliveries; the other half covers what claims and fan-out
        // passes bring into memory transiently (see `payload_room` and `app::start`).
        let budget_kib = (settings.memory_budget / 2 / 1024).clamp(1, u64::from(u32::MAX >> 4));
        Arc::new(Self {
            holds: Arc::new(Semaphore::new(settings.concurrency * HOLDS_PER_REQUEST)),
            reserve: Arc::new(Semaphore::new(settings.concurrency)),
            bytes: Arc::new(Semaphore::new(budget_kib as usize)),
            max_charge: charge_kib(settings.max_payload as usize).min(budget_kib as u32),
            memory_budget: settings.memory_budget,
            recent_payload: std::sync::atomic::AtomicUsize::new(0),
            slots: Slots::new(settings.concurrency),
            per_endpoint_requests: settings.per_endpoint_concurrency,
            per_endpoint_held: (settings.per_endpoint_concurrency * HOLDS_PER_ENDPOINT_REQUEST)
                as i32,
            per_endpoint: Mutex::default(),
            stopped: Mutex::default(),
            hindered: std::sync::atomic::AtomicBool::new(true),
            revoked: Mutex::default(),
            revoked_all: Mutex::default(),
            stop_for: settings.lease,
            unwritten_failures: Mutex::default(),
        })
    }

    /// Counts a failure of `endpoint` as unwritten until the mark is dropped.
    pub fn mark_failure(self: &Arc<Self>, endpoint: &str) -> FailureMark {
        *self
            .unwritten_failures
            .lock()
            .expect("failures map")
            .entry(endpoint.to_string())
            .or_default() += 1;
        FailureMark {
            endpoint: endpoint.to_string(),
            capacity: self.clone(),
        }
    }

    /// Whether a failure of `endpoint` is on its way to the settler.
    pub fn failing(&self, endpoint: &str) -> bool {
        self.unwritten_failures
            .lock()
            .expect("failures map")
            .contains_key(endpoint)
    }

    /// Stops sending to `endpoint` at once: what this replica holds for it is handed back as its
    /// attempts reach their turn (requests already in flight finish).
    pub fn stop(&self, endpoint: &str) {
        let now = std::time::Instant::now();
        let mut stopped = self.stopped.lock().expect("stopped endpoints");
        // Stops that ran out say nothing any more: without this, every endpoint ever paused,
        // deleted or answered 410 would stay in the map for the replica's life.
        stopped.retain(|_, until| *until > now);
        stopped.insert(endpoint.to_string(), now + self.stop_for);
        drop(stopped);
        self.revoke(endpoint);
    }

    /// Voids the holds taken for `endpoint` until now: they are handed back (the database then
    /// decides again what becomes of them) instead of being sent.
    pub fn revoke(&self, endpoint: &str) {
        let now = std::time::Instant::now();
        let mut revoked = self.revoked.lock().expect("revoked endpoints");
        // Holds never outlive a lease, so older revocations void nothing any more.
        revoked.retain(|_, at| now.duration_since(*at) < self.stop_for);
        revoked.insert(endpoint.to_string(), now);
    }

    /// Voids every hold taken until now (the listener reconnected: announcements made while it
    /// was away are lost, so nothing held may be trusted).
    pub fn revoke_all(&self) {
        *self.revoked_all.lock().expect("revoked all") = Some(std::time::Instant::now());
    }

    pub(super) fn is_revoked(&self, hold: &Hold) -> bool {
        if self
            .revoked_all
            .lock()
            .expect("revoked all")
            .is_some_and(|at| at >= hold.taken)
        {
            return true;
        }
        self.revoked
            .lock()
            .expect("revoked endpoints")
            .get(&hold.endpoint)
            .is_some_and(|at| *at >= hold.taken)
    }

    /// Lifts a stop (the endpoint was resumed).
    /// Held deliveries stay revoked: they went back to the database, which decides again.
    pub fn resume(&self, endpoint: &str) {
        self.stopped
            .lock()
            .expect("stopped endpoints")
            .remove(endpoint);
    }

    pub fn is_stopped(&self, endpoint: &str) -> bool {
        let mut stopped = self.stopped.lock().expect("stopped endpoints");
        match stopped.get(endpoint) {
            Some(until) if *until > std::time::Instant::now() => true,
            Some(_) => {
                stopped.remove(endpoint);
                false
            }
            None => false,
        }
    }

    /// A hold for a fresh delivery to `endpoint`, if one is free and the endpoint is under its
    /// limit of held deliveries.
    pub fn try_hold(self: &Arc<Self>, endpoint: &str, payload_len: usize) -> Option<Hold> {
        if self.is_stopped(endpoint) {
            return None;
        }
        let mut map = self.per_endpoint.lock().expect("capacity map");
        let held = map.get(endpoint).map_or(0, |e| e.0);
        if held >= self.per_endpoint_held {
            return None;
        }
        let bytes = self.take_bytes(payload_len)?;
        let permit = match self.holds.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) if held < self.reserve_per_endpoint() => {
                self.reserve.clone().try_acquire_owned().ok()?
            }
            Err(_) => return None,
        };
        Some(self.count(&mut map, endpoint, permit, bytes))
    }

    /// Counts a delivery the worker claimed with `permit` (the claim query applied the limit), if
    /// its payload fits the memory budget; `None` means hand it back.
    /// `claimed_at` is when the claim was sent: a revocation announced after it voids the hold.
    pub(super) fn hold_claimed(
        self: &Arc<Self>,
        endpoint: &str,
        permit: OwnedSemaphorePermit,
        payload_len: usize,
        claimed_at: std::time::Instant,
    ) -> Option<Hold> {
        let bytes = self.take_bytes(payload_len)?;
        let mut map = self.per_endpoint.lock().expect("capacity map");
        let mut hold = self.count(&mut map, endpoint, permit, bytes);
        hold.taken = claimed_at;
        Some(hold)
    }

    fn take_bytes(&self, payload_len: usize) -> Option<OwnedSemaphorePermit> {
        let _ = self.recent_payload.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |seen| Some((seen - seen / 64).max(payload_len)),
        );
        let charge = charge_kib(payload_len).min(self.max_charge.max(1));
        self.bytes.clone().try_acquire_many_owned(charge).ok()
    }

    /// Payload bytes a claim may bring into memory now: what the held deliveries' share has room
    /// for, and at most an eighth of the budget (the query's result and the copies made from it
    /// exist together for a moment: a quarter).
    pub(super) fn payload_room(&self) -> i64 {
        let room = self.bytes.available_permits() as i64 * 1024 / 2;
        room.min(self.memory_budget as i64 / 8)
    }

    /// How many rows a claim should ask for at most, given the room and the payloads seen lately.
    pub(super) fn rows_for_room(&self) -> usize {
        let seen = self
            .recent_payload
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(512);
        (self.payload_room() as usize / seen).max(1)
    }

    /// Whether the largest allowed payload would fit now: claims wait for that much room, so what
    /// they take can be held.
    pub(super) fn has_room_for_a_claim(&self) -> bool {
        self.bytes.available_permits() >= self.max_charge as usize
    }

    fn count(
        self: &Arc<Self>,
        map: &mut HashMap<String, (i32, Arc<EndpointRequests>)>,
        endpoint: &str,
        permit: OwnedSemaphorePermit,
        bytes: OwnedSemaphorePermit,
    ) -> Hold {
        let entry = map
            .entry(endpoint.to_string())
            .or_insert_with(|| (0, EndpointRequests::new(self.per_endpoint_requests)));
        entry.0 += 1;
        Hold {
            _hold: permit,
            _bytes: bytes,
            endpoint: endpoint.to_string(),
            taken: std::time::Instant::now(),
            endpoint_requests: entry.1.clone(),
            capacity: self.clone(),
        }
    }

    /// Takes free holds for a claim of that many (see [`take_most`]).
    pub(super) fn take_free(&self) -> Vec<OwnedSemaphorePermit> {
        take_most(&self.holds)
    }

    /// When no hold is free: holds from the reserve, for a claim that gives each endpoint no
    /// more than [`Self::reserve_per_endpoint`] in all (what it holds already counted).
    pub(super) fn take_reserve(&self) -> Vec<OwnedSemaphorePermit> {
        take_most(&self.reserve)
    }

    /// How many held deliveries an endpoint may reach with reserve holds: its request slots.
    pub(super) fn reserve_per_endpoint(&self) -> i32 {
        self.per_endpoint_requests as i32
    }

    pub(super) fn requests_in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    /// Held deliveries per endpoint, for the claim to subtract; a stopped endpoint counts as full.
    pub(super) fn held_per_endpoint(&self) -> Vec<(String, i32)> {
        let mut held: HashMap<String, i32> = self
            .per_endpoint
            .lock()
            .expect("capacity map")
            .iter()
            .map(|(k, v)| (k.clone(), v.0))
            .collect();
        let now = std::time::Instant::now();
        for (endpoint, until) in self.stopped.lock().expect("stopped endpoints").iter() {
            if *until > now {
                held.insert(endpoint.clone(), self.per_endpoint_held);
            }
        }
        held.into_iter().collect()
    }

    /// Waits for a request slot of the hold's endpoint and one of the replica's (see
    /// [`Slots::take`]).
    pub(super) async fn request_slot(&self, hold: &Hold) -> Option<RequestSlot> {
        self.slots.take(&hold.endpoint_requests).await
    }
}

/// Three quarters of a semaphore's free permits (all of one), so the dispatcher's fresh
/// deliveries still find room while a claim is out (with every hold taken they would go to
/// `pending` and wait for a later claim).
fn take_most(holds: &Arc<Semaphore>) -> Vec<OwnedSemaphorePermit> {
    let n = holds.available_permits();
    let n = if n > 1 { n - n / 4 } else { n };
    std::iter::from_fn(|| holds.clone().try_acquire_owned().ok())
        .take(n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn capacity(concurrency: usize, per_endpoint: usize) -> Arc<Capacity> {
        let config = Config::from_toml_str(&format!(
            "[database]\nurl = \"postgres://127.0.0.1/app\"\n[outbound]\n\
             concurrency = {concurrency}\nper_endpoint_concurrency = {per_endpoint}\n"
        ))
        .expect("valid config");
        Capacity::new(&WorkerSettings::from_config(&config))
    }

    #[test]
    fn holds_are_bounded_per_endpoint_and_per_replica_and_given_back_on_drop() {
        // 2 requests -> 8 holds per replica and a reserve of 2; 1 request per endpoint -> 16
        // holds per endpoint, and 1 from the reserve.
        let cap = capacity(2, 1);
        let a: Vec<Hold> = std::iter::from_fn(|| cap.try_hold("a", 10)).collect();
        assert_eq!(a.len(), 8, "the replica-wide bound applies first");
        // With every hold taken, other endpoints still get one each (their request slots) from
        // the reserve, until it runs out.
        let b: Vec<Hold> = std::iter::from_fn(|| cap.try_hold("b", 10)).collect();
        assert_eq!(b.len(), 1);
        let c = cap.try_hold("c", 10).expect("the reserve's second hold");
        assert!(cap.try_hold("d", 10).is_none(), "the reserve is spent");
        drop((a, b, c));
        assert_eq!(cap.holds.available_permits(), 8);
        assert_eq!(cap.reserve.available_permits(), 2);
        assert!(cap.held_per_endpoint().is_empty());

        // 8 requests -> 32 holds per replica; 1 per endpoint -> 16 holds per endpoint.
        let cap = capacity(8, 1);
        let a: Vec<Hold> = std::iter::from_fn(|| cap.try_hold("a", 10)).collect();
        assert_eq!(a.len(), 16, "one endpoint cannot take every hold");
        assert!(cap.try_hold("b", 10).is_some());
        assert_eq!(cap.held_per_endpoint(), vec![("a".to_string(), 16)]);
    }

    #[test]
    fn a_revocation_voids_holds_claimed_before_it_even_if_counted_after() {
        let cap = capacity(8, 4);
        let claim_sent = std::time::Instant::now();
        cap.revoke("a");
        // The claim's result is handled after the revocation arrived: still void.
        let slot = cap.take_free().into_iter().next().unwrap();
        let late = cap.hold_claimed("a", slot, 10, claim_sent).unwrap();
        assert!(cap.is_revoked(&late));
        let fresh = cap.try_hold("a", 10).unwrap();
        assert!(!cap.is_revoked(&fresh), "taken after the revocation");
        let other = cap.try_hold("b", 10).unwrap();
        assert!(!cap.is_revoked(&other));
        cap.revoke_all();
        assert!(cap.is_revoked(&fresh) && cap.is_revoked(&other));
        assert!(!cap.is_revoked(&cap.try_hold("b", 10).unwrap()));
        // A stop also refuses new holds until it is lifted.
        cap.stop("c");
        assert!(cap.try_hold("c", 10).is_none());
        cap.resume("c");
        assert!(cap.try_hold("c", 10).is_some());
    }

    #[test]
    fn stops_that_ran_out_are_forgotten() {
        let cap = capacity(8, 4);
        let past = std::time::Instant::now() - Duration::from_secs(1);
        cap.stopped
            .lock()
            .unwrap()
            .extend((0..1000).map(|i| (format!("old{i}"), past)));
        cap.stop("new");
        let stopped = cap.stopped.lock().unwrap();
        assert_eq!(stopped.keys().collect::<Vec<_>>(), vec!["new"]);
    }

    #[test]
    fn holds_are_bounded_by_the_memory_budget() {
        let config = Config::from_toml_str(
            "[database]\nurl = \"postgres://127.0.0.1/app\"\n[outbound]\n\
             max_payload = \"256KiB\"\nmemory_budget = \"8MiB\"\n",
        )
        .expect("valid config");
        let cap = Capacity::new(&WorkerSettings::from_config(&config));
        // Holds get half of 8 MiB; each 256 KiB payload is charged 513 KiB: seven fit.
        let held: Vec<Hold> = std::iter::from_fn(|| cap.try_hold("a", 256 << 10))
            .take(20)
            .collect();
        assert_eq!(held.len(), 7);
        assert!(!cap.has_room_for_a_claim());
        // Small payloads still fit in what is left.
        assert!(cap.try_hold("b", 100).is_some());
        drop(held);
        assert!(cap.has_room_for_a_claim());
        assert!(Config::from_toml_str(
            "[database]\nurl = \"postgres://127.0.0.1/app\"\n[outbound]\n\
             max_payload = \"1MiB\"\nmemory_budget = \"1MiB\"\n",
        )
        .is_err());
    }

    #[tokio::test]
    async fn a_claim_keeps_only_the_holds_it_used_and_requests_are_bounded() {
        let cap = capacity(1, 1);
        let taken = cap.take_free();
        assert_eq!(taken.len(), 3, "a quarter stays free for fresh deliveries");
        assert_eq!(cap.holds.available_permits(), 1);
        let mut taken = taken.into_iter();
        let hold = cap
            .hold_claimed("a", taken.next().unwrap(), 10, std::time::Instant::now())
            .unwrap();
        drop(taken);
        assert_eq!(cap.holds.available_permits(), 3);
        // A request slot of the endpoint and of the replica, then none until it is returned.
        let slot = cap.request_slot(&hold).await.expect("a request slot");
        assert_eq!(cap.requests_in_flight(), 1);
        let second = cap.try_hold("a", 10).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), cap.request_slot(&second))
                .await
                .is_err(),
            "the endpoint's one request slot is taken"
        );
        drop(slot);
        assert_eq!(cap.requests_in_flight(), 0);
        drop(hold);
        assert_eq!(cap.held_per_endpoint(), vec![("a".to_string(), 1)]);
    }
}
