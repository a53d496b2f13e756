//! A database away longer than a lease (a failover, a restart): what a replica learned meanwhile
//! is kept, and nothing is sent twice for want of it.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// A replica cut off from the database (a partition, a failover) while a receiver answered 200
/// to it: its lease lapses meanwhile, and another replica's reaper finds the delivery. The
/// outcome the first replica holds must be written before the delivery is due again: the
/// receiver gets the event once, and the delivery is `delivered` on its first attempt. Before
/// the reaper gave that grace, the other replica made the delivery due at once and sent it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_held_through_an_outage_longer_than_a_lease_is_written_not_sent_again() {
    let relay = TcpRelay::start(pg_target()).await;
    let db = TestDb::create().await;
    let receiver =
        Receiver::start(|_, _| Reply::status(200).after(Duration::from_millis(1500))).await;
    // The base config's lease is 4 s (request timeout 2 s).
    let config = base_config(&db) + &endpoint("e", &receiver.url, &["*"], "");
    let _cut_off = Postern::start(&config.replace(&db.url, &relay.url_for(&db.url))).await;
    let client = db.client().await;

    publish_one(&client, "order.created", json!({ "n": 1 })).await;
    receiver.wait_count(1, Duration::from_secs(10)).await;
    // The fan-out committed the delivery (claimed, under its lease) before the receiver answers.
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivering'",
        1,
        Duration::from_secs(5),
    )
    .await;
    relay.cut();
    // Another replica, still connected, reaps the lease when it lapses.
    let other = Postern::start(&config).await;
    other
        .wait_log(
            "deliveries whose lease lapsed are due again",
            Duration::from_secs(10),
        )
        .await;
    relay.restore();
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.deliveries WHERE status = 'delivered'",
        1,
        Duration::from_secs(20),
    )
    .await;
    // Past the grace, with time for a second request had the delivery been made due again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(receiver.count(), 1, "the event was sent again");
    let attempts = scalar(
        &client,
        "SELECT attempts::bigint FROM postern.deliveries WHERE status = 'delivered'",
    )
    .await;
    assert_eq!(attempts, 1);
    let answered = scalar(
        &client,
        "SELECT count(*) FROM postern.attempts WHERE attempt = 1 AND status_code = 200",
    )
    .await;
    assert_eq!(answered, 1, "the outcome replaces the reaper's 'unknown'");
}

/// The same for the inbox: a replica forwarding a stored message to the app is cut off from the
/// database while the app answers; the forward lease (the upstream timeout and 15 s) lapses, and
/// another replica's upkeep reaps it. The cut-off replica keeps trying to write the app's answer,
/// and writes it inside the grace once the database is back: the app gets the message once.
/// Before, it tried once, logged "the lease will lapse and it is sent again", and it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_answer_held_through_an_outage_longer_than_a_lease_is_written_not_forwarded_again()
{
    use crate::inbox::{config, send_many, Service};
    let relay = TcpRelay::start(pg_target()).await;
    let db = TestDb::create().await;
    let app = Receiver::start(|_, _| Reply::status(200).after(Duration::from_millis(1500))).await;
    let (cut_off, _) = config(&db, &relay.url_for(&db.url), app.port(), "forward", "");
    let a = Service::start(cut_off).await;
    let answers = send_many(&a, "held", 1, 1).await;
    assert_eq!(answers[0].1, 200, "{answers:?}");
    app.wait_count(1, Duration::from_secs(10)).await;
    relay.cut();
    // Another replica, still connected, reaps the forward lease when it lapses.
    let (connected, _) = config(&db, &db.url, app.port(), "forward", "");
    let b = Service::start(connected).await;
    b.postern
        .wait_log("inbox leases lapsed", Duration::from_secs(30))
        .await;
    relay.restore();
    let client = db.client().await;
    wait_sql(
        &client,
        "SELECT count(*) FROM postern.inbox WHERE status = 'done' AND attempts = 1",
        1,
        Duration::from_secs(10),
    )
    .await;
    // Past the grace and the forwarder's next look, had the message been made due again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(app.count(), 1, "the message was forwarded again");
    drop(a);
}
