//! How an app publishes: the business row and its event in ONE transaction, so the event exists
//! if and only if the order does. Postern (running beside the app) delivers it.
//!
//!     DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo run --example publish
//!
//! Needs the schema (`postern migrate`); creates a small `shop_orders` table of its own.

use tokio_postgres::NoTls;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let (mut client, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(connection);

    client
        .batch_execute("CREATE TABLE IF NOT EXISTS shop_orders (id bigserial PRIMARY KEY, total_cents bigint NOT NULL)")
        .await?;

    let tx = client.transaction().await?;
    let order_id: i64 = tx
        .query_one(
            "INSERT INTO shop_orders (total_cents) VALUES ($1) RETURNING id",
            &[&4200_i64],
        )
        .await?
        .get(0);
    let payload = serde_json::json!({ "order_id": order_id, "total_cents": 4200 });
    let event_id: uuid::Uuid = tx
        .query_one(
            "INSERT INTO postern.outbox (event_type, payload, ordering_key) VALUES ($1, $2, $3) RETURNING event_id",
            &[&"order.created", &payload, &format!("order-{order_id}")],
        )
        .await?
        .get(0);
    // Roll back instead, and neither the order nor the event exists.
    tx.commit().await?;

    println!("order {order_id} committed with event {event_id} (receivers see it as webhook-id)");
    Ok(())
}
