//! For tests: a schema of its own, migrated, in the Postgres at `DATABASE_URL` (else the local
//! one). Invariant: nothing outside that schema is touched.

use uuid::Uuid;

use super::{migrate, pool, tls, Schema};

pub(crate) struct Scratch {
    pub(crate) url: String,
    pub(crate) pool: deadpool_postgres::Pool,
    pub(crate) schema: Schema,
}

impl Scratch {
    pub(crate) async fn new() -> Self {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let pool = pool(&url, 2, &tls::unverified()).unwrap();
        let schema = Schema::new(&format!("postern_u_{}", Uuid::new_v4().simple())).unwrap();
        migrate(&pool, &schema, &[], &[]).await.unwrap();
        Self { url, pool, schema }
    }

    /// Runs `sql` (`__SCHEMA__` standing for the schema) as one batch.
    pub(crate) async fn run(&self, sql: &str) {
        let client = self.pool.get().await.unwrap();
        client.batch_execute(&self.schema.sql(sql)).await.unwrap();
    }

    /// The first two columns of `sql`'s rows (`__SCHEMA__` standing for the schema).
    pub(crate) async fn pairs<A, B>(&self, sql: &str) -> Vec<(A, B)>
    where
        A: for<'a> tokio_postgres::types::FromSql<'a>,
        B: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        let client = self.pool.get().await.unwrap();
        let rows = client.query(&self.schema.sql(sql), &[]).await.unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    pub(crate) async fn drop_schema(self) {
        self.run("DROP SCHEMA __SCHEMA__ CASCADE").await;
    }
}
