//! The migration runner against real PostgreSQL: a fresh database gets every
//! migration, replicas starting together apply each once, a database
//! migrated before there were checksums upgrades in place, and a changed
//! applied file stops the service before anything runs.

use prodsys_db::tokio_postgres::{self, NoTls};
use prodsys_db::{Db, Migration};

/// A database of its own on the test server (`PRODSYS_TEST_DATABASE_URL`,
/// an admin connection), dropped by `cleanup`.
struct TestEnv {
    admin: String,
    database: String,
    url: String,
}

impl TestEnv {
    async fn new() -> anyhow::Result<Self> {
        let admin = std::env::var("PRODSYS_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let database = format!(
            "prodsys_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        let (client, connection) = tokio_postgres::connect(&admin, NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await?;
        let Some((server, rest)) = admin.rsplit_once('/') else {
            anyhow::bail!("PRODSYS_TEST_DATABASE_URL must be a URL naming a database");
        };
        let query = rest.split_once('?').map_or("", |(_, q)| q);
        let url = format!("{server}/{database}?{query}");
        Ok(Self {
            admin,
            database,
            url,
        })
    }

    async fn db(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    async fn cleanup(self) {
        if let Ok((client, connection)) = tokio_postgres::connect(&self.admin, NoTls).await {
            tokio::spawn(connection);
            let _ = client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.database
                ))
                .await;
        }
    }
}

const THINGS: Migration = Migration {
    file: "0001_things.sql",
    sql: "CREATE TABLE things (id integer PRIMARY KEY);",
};
const THINGS_CHANGED: Migration = Migration {
    file: "0001_things.sql",
    sql: "CREATE TABLE things (id bigint PRIMARY KEY);",
};
const COLOURS: Migration = Migration {
    file: "0020_colours.sql",
    sql: "ALTER TABLE things ADD COLUMN colour text NOT NULL DEFAULT 'red';",
};

fn db(env: &TestEnv) -> Db {
    Db::new(&env.url, "svc", 2).unwrap()
}

/// (version, name, checksum) of every applied migration, by version.
async fn applied(env: &TestEnv) -> Vec<(i32, String, Option<String>)> {
    env.db()
        .await
        .unwrap()
        .query(
            "SELECT version, name, checksum FROM svc._migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn columns(env: &TestEnv, table: &str) -> Vec<String> {
    env.db()
        .await
        .unwrap()
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_schema = 'svc' AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_fresh_database_gets_every_migration_with_its_checksum() {
    let env = TestEnv::new().await.unwrap();
    db(&env).migrate(&[COLOURS, THINGS]).await.unwrap();
    let rows = applied(&env).await;
    let versions: Vec<i32> = rows.iter().map(|r| r.0).collect();
    assert_eq!(
        versions,
        [0, 1, 20, 30],
        "base and service migrations, in order"
    );
    assert_eq!(rows[1].1, "things");
    let base = prodsys_db::migrate::BASE;
    assert_eq!(rows[0].2.as_deref(), Some(base[0].checksum().as_str()));
    assert_eq!(rows[1].2.as_deref(), Some(THINGS.checksum().as_str()));
    assert_eq!(rows[2].2.as_deref(), Some(COLOURS.checksum().as_str()));
    assert_eq!(columns(&env, "things").await, ["id", "colour"]);
    assert!(
        columns(&env, "outbox")
            .await
            .contains(&"event_id".to_string())
    );
    // A second start applies nothing and accepts what it finds.
    db(&env).migrate(&[THINGS, COLOURS]).await.unwrap();
    assert_eq!(applied(&env).await, rows);
    env.cleanup().await;
}

/// A migration that takes a while and cannot run twice (a second
/// `CREATE TABLE` fails): replicas starting together must apply it once.
const SLOW_THINGS: Migration = Migration {
    file: "0001_things.sql",
    sql: "CREATE TABLE things (id integer PRIMARY KEY); SELECT pg_sleep(0.5);",
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_apply_each_migration_once() {
    let env = TestEnv::new().await.unwrap();
    let replicas: Vec<_> = (0..4)
        .map(|_| {
            let db = db(&env);
            tokio::spawn(async move { db.migrate(&[SLOW_THINGS, COLOURS]).await })
        })
        .collect();
    for replica in replicas {
        replica.await.unwrap().expect("every replica starts");
    }
    let rows = applied(&env).await;
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1, 20, 30]);
    assert_eq!(columns(&env, "things").await, ["id", "colour"]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_changed_applied_migration_is_refused_before_anything_runs() {
    let env = TestEnv::new().await.unwrap();
    db(&env).migrate(&[THINGS]).await.unwrap();
    let error = db(&env)
        .migrate(&[THINGS_CHANGED, COLOURS])
        .await
        .expect_err("a changed applied migration must stop the start");
    let message = format!("{error:#}");
    assert!(
        message.contains("migration 1 (0001_things.sql)") && message.contains("changed"),
        "{message}"
    );
    assert_eq!(
        columns(&env, "things").await,
        ["id"],
        "the new migration was not applied"
    );
    assert_eq!(applied(&env).await.len(), 3);
    // The file restored, the new one applies.
    db(&env).migrate(&[THINGS, COLOURS]).await.unwrap();
    assert_eq!(columns(&env, "things").await, ["id", "colour"]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_database_migrated_before_checksums_upgrades_in_place() {
    let env = TestEnv::new().await.unwrap();
    // What the runner without checksums left behind: its table and rows,
    // names as they were spelled then.
    env.db()
        .await
        .unwrap()
        .batch_execute(
            "CREATE SCHEMA svc;
             CREATE TABLE svc._migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );
             SET search_path TO svc;
             CREATE TABLE outbox (id bigserial PRIMARY KEY, event_id uuid NOT NULL UNIQUE);
             CREATE TABLE inbox (event_id uuid PRIMARY KEY, received_at timestamptz NOT NULL DEFAULT now());
             CREATE INDEX inbox_received_at ON inbox (received_at);
             CREATE TABLE things (id integer PRIMARY KEY);
             INSERT INTO things VALUES (7);
             INSERT INTO svc._migrations (version, name) VALUES
                 (0, 'outbox and inbox'), (1, 'things'), (30, 'inbox by age');",
        )
        .await
        .unwrap();
    db(&env).migrate(&[THINGS, COLOURS]).await.unwrap();
    let rows = applied(&env).await;
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1, 20, 30]);
    assert!(
        rows.iter().all(|r| r.2.is_some()),
        "checksums filled: {rows:?}"
    );
    assert_eq!(rows[1].1, "things", "existing rows keep their names");
    assert_eq!(rows[1].2.as_deref(), Some(THINGS.checksum().as_str()));
    let kept: i32 = env
        .db()
        .await
        .unwrap()
        .query_one("SELECT id FROM svc.things", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 7, "applied migrations are not run again");
    assert_eq!(columns(&env, "things").await, ["id", "colour"]);
    // From now on the filled checksums guard the files.
    let error = db(&env).migrate(&[THINGS_CHANGED, COLOURS]).await;
    assert!(error.is_err());
    env.cleanup().await;
}

#[tokio::test]
async fn two_files_with_one_version_are_refused() {
    let env = TestEnv::new().await.unwrap();
    let twin = Migration {
        file: "0001_other_things.sql",
        sql: "CREATE TABLE other_things (id integer);",
    };
    let error = db(&env).migrate(&[THINGS, twin]).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains("same version 1"), "{message}");
    env.cleanup().await;
}

#[test]
fn versions_and_names_come_from_the_file_name() {
    assert_eq!(COLOURS.version().unwrap(), 20);
    assert_eq!(COLOURS.name(), "colours");
    let bad = Migration {
        file: "things.sql",
        sql: "",
    };
    assert!(bad.version().is_err());
    let crlf = Migration {
        file: "0001_things.sql",
        sql: "CREATE TABLE things (id integer PRIMARY KEY);\r\n",
    };
    let lf = Migration {
        file: "0001_things.sql",
        sql: "CREATE TABLE things (id integer PRIMARY KEY);\n",
    };
    assert_eq!(crlf.checksum(), lf.checksum());
    assert_ne!(THINGS.checksum(), THINGS_CHANGED.checksum());
}
