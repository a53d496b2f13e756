//! The `[outbound]` and `[retention]` sections: how events are noticed, delivered, retried and
//! pruned. Values only: `delivery::retry::RetryPolicy::from_config` decides a retry table.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{defaults, BreakerConfig, ByteSize, Dur, RateLimit};

/// How the outbox trigger wakes Postern (DESIGN.md: protect the app's write path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyMode {
    /// Each commit of a sparse stream announced; a dense one at most once per `notify_throttle`,
    /// clocked by a sequence (no row lock held).
    #[default]
    Throttled,
    /// One NOTIFY per INSERT statement: simplest, costly under concurrent writers.
    Statement,
    /// No trigger: polling only.
    None,
}

impl NotifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyMode::Throttled => "throttled",
            NotifyMode::Statement => "statement",
            NotifyMode::None => "none",
        }
    }
}

/// What the failed head of an ordering key does to the deliveries behind it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// The next delivery of the key proceeds; the failed one stays `failed`, retryable.
    #[default]
    Skip,
    /// The key waits until the failed delivery is retried and delivered, or cancelled.
    Block,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Skip => "skip",
            OnFailure::Block => "block",
        }
    }
}

impl std::str::FromStr for OnFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "skip" => Ok(Self::Skip),
            "block" => Ok(Self::Block),
            other => Err(format!("unknown on_failure {other:?} (skip | block)")),
        }
    }
}

/// `[outbound.ordering]` (the default) and an endpoint's `ordering`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderingConfig {
    #[serde(default)]
    pub on_failure: OnFailure,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    #[serde(default)]
    pub notify: NotifyMode,
    #[serde(default = "defaults::notify_throttle")]
    pub notify_throttle: Dur,
    #[serde(default = "defaults::poll_interval")]
    pub poll_interval: Dur,
    #[serde(default = "defaults::request_timeout")]
    pub request_timeout: Dur,
    #[serde(default = "defaults::max_payload")]
    pub max_payload: ByteSize,
    /// Memory for deliveries held in the replica (claimed or handed over, not yet settled): each
    /// is charged twice its payload (the payload and the request body built from it).
    #[serde(default = "defaults::memory_budget")]
    pub memory_budget: ByteSize,
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    #[serde(default = "defaults::per_endpoint_concurrency")]
    pub per_endpoint_concurrency: usize,
    #[serde(default)]
    pub allow_private_networks: Vec<IpNet>,
    /// How long a claimed delivery stays reserved for this replica; after that another replica
    /// may retry it. Default: `request_timeout` + 15s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Dur>,
    /// Outbox rows fanned out per dispatcher transaction.
    #[serde(default = "defaults::dispatch_batch")]
    pub dispatch_batch: usize,
    /// A delivery whose lease lapses this many times in a row without an outcome (it kills or
    /// stalls whoever makes it) is failed instead of being sent again.
    #[serde(default = "defaults::max_lease_lapses")]
    pub max_lease_lapses: u32,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub ordering: OrderingConfig,
    /// The rate limit of endpoints that set none (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub breaker: BreakerConfig,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            notify: NotifyMode::default(),
            notify_throttle: defaults::notify_throttle(),
            poll_interval: defaults::poll_interval(),
            request_timeout: defaults::request_timeout(),
            max_payload: defaults::max_payload(),
            memory_budget: defaults::memory_budget(),
            concurrency: defaults::concurrency(),
            per_endpoint_concurrency: defaults::per_endpoint_concurrency(),
            allow_private_networks: Vec::new(),
            lease: None,
            dispatch_batch: defaults::dispatch_batch(),
            max_lease_lapses: defaults::max_lease_lapses(),
            retry: RetryConfig::default(),
            ordering: OrderingConfig::default(),
            rate_limit: None,
            breaker: BreakerConfig::default(),
        }
    }
}

/// A retry policy as written: either `schedule` (+ `jitter`) or the exponential keys.
/// Both forms are optional here so that defaults never collide with what the user wrote;
/// [`RetryConfig::policy`] decides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Vec<Dur>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<Dur>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Delivered deliveries, their attempts and fully delivered events are pruned after this.
    #[serde(default = "defaults::retention_delivered")]
    pub delivered: Dur,
    /// Failed and cancelled deliveries are pruned after this.
    #[serde(default = "defaults::retention_failed")]
    pub failed: Dur,
    /// How often a replica runs a pruning pass.
    #[serde(default = "defaults::retention_interval")]
    pub interval: Dur,
    /// Inbox messages the app has handled are pruned after this; unhandled ones are kept.
    #[serde(default = "defaults::retention_inbox")]
    pub inbox: Dur,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            delivered: defaults::retention_delivered(),
            failed: defaults::retention_failed(),
            interval: defaults::retention_interval(),
            inbox: defaults::retention_inbox(),
        }
    }
}
