//! TLS between the services and their servers: PostgreSQL (`sslmode`,
//! `sslrootcert`, a client certificate) and RabbitMQ (`amqps://` with a
//! private CA and a client certificate); and client certificates on the
//! services' own ports (`tls.client_ca_file`), which the services present
//! to each other and prodctl and the Python client present too.
//!
//! The machine's PostgreSQL and RabbitMQ are shared and not ours to
//! reconfigure, so each of their tests starts a private server of its own — a
//! PostgreSQL cluster (`initdb`, `pg_ctl`) or a second RabbitMQ node (its
//! own node name, data directory, distribution port and TLS listener) —
//! under a temporary directory, with a CA and certificates the test makes
//! with `rcgen`, and stops it by its process (group) at the end. The
//! client-certificate test needs no server of its own: the stack's ports are
//! the servers.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use support::{sleep_request, spawn_app_with, use_test_profiles};

/// A small production submitted to `app` is accepted and runs to COMPLETED.
async fn runs_to_completion(app: &support::App, name: &str, what: &str) {
    let request_id = app
        .intake
        .clone()
        .submit_request(sleep_request(2, 0.0, -1, name, "local"))
        .await
        .unwrap_or_else(|e| panic!("submitting {name}: {e}"))
        .into_inner()
        .request_id;
    let decided = support::decided(&app.intake, &request_id).await;
    assert_eq!(decided.state(), pb::RequestState::Accepted, "{decided:?}");
    app.production_when(what, Duration::from_secs(60), &decided.production_id, |p| {
        p.state() == pb::ProductionState::Completed
    })
    .await;
}

/// A CA, and certificates it signed, as PEM files in a directory.
struct Pki {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    ca_file: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("prodsys test CA {name}"));
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Self {
            dir: dir.to_path_buf(),
            ca,
            ca_file,
        }
    }

    /// A certificate for `names` (host names and IP addresses) whose common
    /// name is `common_name`: (cert, key) files.
    fn issue(&self, file: &str, common_name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let paths = (
            self.dir.join(format!("{file}-cert.pem")),
            self.dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&paths.0, cert.pem()).unwrap();
        std::fs::write(&paths.1, key.serialize_pem()).unwrap();
        paths
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private PostgreSQL cluster that speaks TLS only: `hostnossl` is
/// rejected, `certuser` logs in by its client certificate, everyone else
/// by password (SCRAM). Stopped when dropped.
struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    password: String,
    as_postgres: bool,
}

impl PrivatePostgres {
    fn start(dir: &Path, pki: &Pki) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's programs under /usr/lib/postgresql")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max_by_key(|b| {
                b.parent()
                    .and_then(|v| v.file_name())
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0)
            })
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let (cert, key) = pki.issue("postgres", "127.0.0.1", &["127.0.0.1"]);
        let password = uuid::Uuid::new_v4().simple().to_string();
        let password_file = dir.join("password");
        std::fs::write(&password_file, &password).unwrap();
        let data = dir.join("data");
        // initdb and the server refuse to run as root: as the postgres user then.
        let as_postgres = is_root();
        if as_postgres {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir),
                "chown",
            );
        }
        let command = |program: &str| {
            let mut command = if as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin.join(program));
                c
            } else {
                Command::new(bin.join(program))
            };
            command.env("LC_ALL", "C.UTF-8");
            command
        };
        run(
            command("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=scram-sha-256", "-E", "UTF8"])
                .arg(format!("--pwfile={}", password_file.display())),
            "initdb",
        );
        let port = free_port();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        write!(
            conf,
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             max_connections = 100\nshared_buffers = 16MB\nfsync = off\n\
             ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\nssl_ca_file = '{ca}'\n",
            dir = dir.display(),
            cert = cert.display(),
            key = key.display(),
            ca = pki.ca_file.display(),
        )
        .unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostnossl all all 0.0.0.0/0 reject\n\
             hostssl all certuser 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             local all all scram-sha-256\n",
        )
        .unwrap();
        if as_postgres {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir),
                "chown",
            );
        }
        std::fs::set_permissions(
            &key,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )
        .unwrap();
        run(
            command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("log"))
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
        );
        Self {
            bin,
            data,
            port,
            password,
            as_postgres,
        }
    }

    /// The URL of `database` as `postgres`, with `query` (TLS parameters).
    fn url(&self, host: &str, database: &str, query: &str) -> String {
        format!(
            "postgres://postgres:{}@{host}:{}/{database}?{query}",
            self.password, self.port
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let _ = command
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// Whether a connection with `url` works, or the error in full.
async fn connects(url: &str) -> Result<String, String> {
    match prodsys_db::connect(url).await {
        Ok(client) => client
            .query_one("SELECT current_user::text", &[])
            .await
            .map(|row| row.get::<_, String>(0))
            .map_err(|e| format!("{e:#}")),
        Err(error) => Err(format!("{error:#}")),
    }
}

#[tokio::test]
async fn the_services_reach_postgresql_over_tls_verified_against_its_ca() {
    let dir = std::env::temp_dir().join(format!("prodsys-pg-tls-{}", uuid::Uuid::new_v4()));
    let pki = Pki::new(&dir, "db");
    let stranger = Pki::new(&dir.join("stranger"), "stranger");
    let (client_cert, client_key) = pki.issue("certuser", "certuser", &[]);
    let pg = PrivatePostgres::start(&dir, &pki);
    let ca = pki.ca_file.display().to_string();
    let verify_full = format!("sslmode=verify-full&sslrootcert={ca}");

    // verify-full: the chain and the name (the certificate is for 127.0.0.1).
    assert_eq!(
        connects(&pg.url("127.0.0.1", "postgres", &verify_full)).await,
        Ok("postgres".into())
    );
    // The session's channel binding is offered and checked by the server's SCRAM.
    assert_eq!(
        connects(&pg.url(
            "127.0.0.1",
            "postgres",
            &format!("{verify_full}&channel_binding=require")
        ))
        .await,
        Ok("postgres".into())
    );
    // A server whose certificate another CA signed is refused...
    let error = connects(&pg.url(
        "127.0.0.1",
        "postgres",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            stranger.ca_file.display()
        ),
    ))
    .await
    .unwrap_err();
    assert!(error.contains("certificate"), "{error}");
    // ...and so is one whose certificate names another host, unless only
    // the chain is asked for (verify-ca).
    // (hostaddr: the name is checked, the address connected to.)
    let error = connects(&pg.url(
        "localhost",
        "postgres",
        &format!("hostaddr=127.0.0.1&{verify_full}"),
    ))
    .await
    .unwrap_err();
    assert!(error.contains("certificate"), "{error}");
    assert_eq!(
        connects(&pg.url(
            "localhost",
            "postgres",
            &format!("hostaddr=127.0.0.1&sslmode=verify-ca&sslrootcert={ca}")
        ))
        .await,
        Ok("postgres".into())
    );
    // require encrypts without checking; plain text is what the server refuses.
    assert_eq!(
        connects(&pg.url("127.0.0.1", "postgres", "sslmode=require")).await,
        Ok("postgres".into())
    );
    assert!(
        connects(&pg.url("127.0.0.1", "postgres", "sslmode=disable"))
            .await
            .is_err()
    );
    // A client certificate: certuser has no password, only its certificate.
    let admin = prodsys_db::connect(&pg.url("127.0.0.1", "postgres", &verify_full))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE ROLE certuser LOGIN")
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE prodsys")
        .await
        .unwrap();
    let as_certuser = |query: String| {
        format!(
            "postgres://certuser@127.0.0.1:{}/postgres?{verify_full}{query}",
            pg.port
        )
    };
    assert_eq!(
        connects(&as_certuser(format!(
            "&sslcert={}&sslkey={}",
            client_cert.display(),
            client_key.display()
        )))
        .await,
        Ok("certuser".into())
    );
    assert!(connects(&as_certuser(String::new())).await.is_err());

    // A whole stack on that database: verify-full from the settings' keys
    // (the URL has none), a production run to its end.
    let database_url = format!(
        "postgres://postgres:{}@127.0.0.1:{}/prodsys",
        pg.password, pg.port
    );
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.database.url = database_url.clone().into();
        env.settings.database.sslmode = Some("verify-full".into());
        env.settings.database.sslrootcert = Some(pki.ca_file.clone());
    })
    .await;
    runs_to_completion(
        &app,
        "db-over-tls",
        "the production over TLS to the database",
    )
    .await;
    // Every service's connections are TLS ones (plain text is refused anyway).
    let rows = admin
        .query(
            "SELECT a.application_name, bool_and(s.ssl) FROM pg_stat_activity a
             JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name LIKE 'prodsys-%' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        seen.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
        [
            "prodsys-catalog",
            "prodsys-checker",
            "prodsys-dispatcher",
            "prodsys-intake",
            "prodsys-status"
        ],
        "{seen:?}"
    );
    assert!(seen.iter().all(|(_, ssl)| *ssl), "{seen:?}");
    app.stop().await;

    // A service given a CA that did not sign the server's certificate does not start.
    let mut env = prodsys_testkit::TestEnv::new().await.unwrap();
    env.settings.database.url = database_url.clone().into();
    env.settings.database.sslmode = Some("verify-full".into());
    env.settings.database.sslrootcert = Some(stranger.ca_file.clone());
    refused_to_start(env, "certificate").await;
    drop(pg);
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts the catalog on `env`'s settings, which it must refuse: the error,
/// within a minute, names `named`. Cleans `env` up.
async fn refused_to_start(env: prodsys_testkit::TestEnv, named: &str) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        prodsys::start(
            &[prodsys::Service::Catalog],
            &env.settings,
            shutdown.clone(),
        ),
    )
    .await
    .expect("a refusal in time");
    let error = match refused {
        Ok(_) => panic!("the catalog started where it should refuse ({named})"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains(named), "{named}: {error}");
    shutdown.cancel();
    env.cleanup().await;
}

/// A second RabbitMQ node (not the machine's): its own node name, data and
/// log directories, distribution port, no plugins, and one listener, TLS,
/// that asks every client for a certificate of the test's CA. Stopped with
/// its process group when dropped.
struct PrivateRabbit {
    child: std::process::Child,
    port: u16,
}

impl PrivateRabbit {
    fn start(dir: &Path, pki: &Pki) -> Self {
        let (cert, key) = pki.issue("rabbit", "127.0.0.1", &["127.0.0.1"]);
        let port = free_port();
        let config = dir.join("rabbitmq.conf");
        std::fs::write(
            &config,
            format!(
                "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {ca}\nssl_options.certfile = {cert}\n\
                 ssl_options.keyfile = {key}\nssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n",
                ca = pki.ca_file.display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        let node = format!(
            "prodsys-tls-{}@localhost",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let log = std::fs::File::create(dir.join("node.log")).unwrap();
        let mut command = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        command
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", &config)
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("node.pid"))
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("starting a second RabbitMQ node");
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        // The script traps TERM and stops the Erlang VM it started; the whole
        // group is killed after a grace period in case it did not.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// Opens (and closes) a connection to `url` with `tls`; the error in full otherwise.
async fn amqp_connects(url: &str, tls: lapin::tcp::OwnedTLSConfig) -> Result<(), String> {
    let connecting = lapin::Connection::connect_with_config(
        url,
        lapin::ConnectionProperties::default(),
        tls,
        lapin::runtime::default_runtime().unwrap(),
    );
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(connection)) => {
            let _ = connection.close(200, "checked".into()).await;
            Ok(())
        }
        Ok(Err(error)) => Err(format!("{error:#}")),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test]
async fn the_services_reach_rabbitmq_over_tls_with_a_private_ca_and_a_client_certificate() {
    let dir = std::env::temp_dir().join(format!("prodsys-amqp-tls-{}", uuid::Uuid::new_v4()));
    let pki = Pki::new(&dir, "broker");
    let stranger = Pki::new(&dir.join("stranger"), "stranger");
    let (client_cert, client_key) = pki.issue("client", "prodsys", &[]);
    let rabbit = PrivateRabbit::start(&dir, &pki);
    let tls = |ca: &Path, client: bool| {
        let (cert, key) = (client_cert.as_path(), client_key.as_path());
        prodsys_messaging::broker::tls_from_files(
            Some(ca),
            client.then_some(cert),
            client.then_some(key),
        )
        .unwrap()
    };
    // The node is up once a TLS connection with the CA and a client certificate opens.
    wait_for(
        "the second RabbitMQ node's TLS listener",
        Duration::from_secs(90),
        || async {
            amqp_connects(&rabbit.url(), tls(&pki.ca_file, true))
                .await
                .ok()
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
        )
    });
    // Without the CA the broker's certificate is not trusted (it is in no
    // web PKI root), nor with another CA; without a client certificate the
    // broker refuses; plain AMQP gets no answer from a TLS listener.
    let no_ca = amqp_connects(&rabbit.url(), Default::default()).await;
    assert!(
        no_ca.is_err(),
        "a broker of a private CA was trusted without it"
    );
    assert!(
        amqp_connects(&rabbit.url(), tls(&stranger.ca_file, true))
            .await
            .is_err(),
        "a broker of another CA was trusted"
    );
    assert!(
        amqp_connects(&rabbit.url(), tls(&pki.ca_file, false))
            .await
            .is_err(),
        "the broker took a client without a certificate"
    );
    assert!(
        amqp_connects(
            &rabbit.url().replacen("amqps://", "amqp://", 1),
            Default::default()
        )
        .await
        .is_err()
    );

    // A whole stack over amqps://, from the settings' keys: a production to its end.
    let url = rabbit.url();
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.amqp.url = url.clone().into();
        env.settings.amqp.ca_file = Some(pki.ca_file.clone());
        env.settings.amqp.cert_file = Some(client_cert.clone());
        env.settings.amqp.key_file = Some(client_key.clone());
    })
    .await;
    runs_to_completion(
        &app,
        "broker-over-tls",
        "the production over TLS to the broker",
    )
    .await;
    app.stop().await;

    // TLS settings with a plain amqp:// URL, or a CA file that is no
    // certificate, stop a service at start, named.
    for (url, ca_file, named) in [
        (
            url.replacen("amqps://", "amqp://", 1),
            pki.ca_file.clone(),
            "amqps://",
        ),
        (url.clone(), client_key.clone(), "amqp.ca_file"),
    ] {
        let mut env = prodsys_testkit::TestEnv::new().await.unwrap();
        env.settings.amqp.url = url.into();
        env.settings.amqp.ca_file = Some(ca_file);
        refused_to_start(env, named).await;
    }
    drop(rabbit);
    let _ = std::fs::remove_dir_all(dir);
}

/// The test-sleep profile, renamed, with a catalog identity: the checker
/// then asks the catalog about every request before it decides.
fn write_catalogued_profile(env: &prodsys_testkit::TestEnv) {
    let source = prodsys_testkit::repo_root().join("tests/profiles/test-sleep.json");
    let mut profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source).unwrap()).unwrap();
    profile["name"] = "test-catalogued".into();
    profile["id_prefix"] = "CAT".into();
    profile["outputs"]["metadata"]["tag"] = "{tag}".into();
    profile["catalog"] = serde_json::json!({
        "keys": { "run_number": "integer", "tag": "string" },
        "required": ["tag"]
    });
    std::fs::write(
        env.settings.profiles_dir.join("test-catalogued.json"),
        profile.to_string(),
    )
    .unwrap();
}

/// A TLS client of `url` verified against `ca`, presenting `certificate`.
async fn tls_channel(
    url: &str,
    ca: &Path,
    certificate: Option<&prodsys_auth::tls::ClientCertificate>,
) -> Result<tonic::transport::Channel, String> {
    prodsys_auth::tls::client_endpoint(url, Some(ca), certificate, "test")
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Whether the service at `url` answers a health check to a client
/// presenting `certificate` (the TLS handshake may complete on the client's
/// side before the server refuses the certificate, so the call says).
async fn answers(
    url: &str,
    ca: &Path,
    certificate: Option<&prodsys_auth::tls::ClientCertificate>,
) -> Result<(), String> {
    let channel = tls_channel(url, ca, certificate).await?;
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// An HTTP client trusting `ca`, presenting the certificate and key of
/// `identity` when given.
fn https_client(ca: &Path, identity: Option<(&Path, &Path)>) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    let mut builder = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(10));
    if let Some((cert, key)) = identity {
        let mut pem = std::fs::read(cert).unwrap();
        pem.extend(std::fs::read(key).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

#[tokio::test]
async fn with_client_certificates_required_the_services_reach_each_other_and_strangers_are_refused()
{
    let dir = std::env::temp_dir().join(format!("prodsys-mtls-{}", uuid::Uuid::new_v4()));
    let pki = Pki::new(&dir, "services");
    let stranger = Pki::new(&dir.join("stranger"), "stranger");
    // The services' own certificate, which they also present to each other
    // (tls.client_cert_file unset), and a user's of the same CA.
    let (cert, key) = pki.issue("server", "prodsys services", &["localhost", "127.0.0.1"]);
    let (user_cert, user_key) = pki.issue("user", "a user", &[]);
    let (stranger_cert, stranger_key) = stranger.issue("stranger", "a stranger", &[]);
    let settings = prodsys_config::TlsSettings {
        cert_file: Some(cert.clone()),
        key_file: Some(key.clone()),
        ca_file: Some(pki.ca_file.clone()),
        client_ca_file: Some(pki.ca_file.clone()),
        ..Default::default()
    };
    let app = {
        let settings = settings.clone();
        spawn_app_with(|env| {
            use_test_profiles(env);
            write_catalogued_profile(env);
            env.settings.tls = settings;
        })
        .await
    };
    let addr = |service| app.stack.addr(service).unwrap();
    let intake_url = format!("https://{}", addr(prodsys::Service::Intake));
    let status_url = format!("https://{}", addr(prodsys::Service::Status));
    let catalog_url = format!("https://{}", addr(prodsys::Service::Catalog));
    let user =
        prodsys_auth::tls::ClientCertificate::from_files(&user_cert, "cert", &user_key, "key")
            .unwrap();
    let other = prodsys_auth::tls::ClientCertificate::from_files(
        &stranger_cert,
        "cert",
        &stranger_key,
        "key",
    )
    .unwrap();

    // Every call between the services presents the services' certificate
    // (a refused one would stall or fail what follows): intake asks the
    // checker to validate; the checker asks the catalog before it decides;
    // status asks the checker, the catalog, intake and the dispatcher.
    let mut intake = pb::request_service_client::RequestServiceClient::new(
        tls_channel(&intake_url, &pki.ca_file, Some(&user))
            .await
            .expect("a TLS connection with a client certificate"),
    );
    let status = pb::status_service_client::StatusServiceClient::new(
        tls_channel(&status_url, &pki.ca_file, Some(&user))
            .await
            .unwrap(),
    );
    let request = pb::SubmitRequestRequest {
        profile: "test-catalogued".into(),
        ..sleep_request(2, 0.0, -1, "mtls", "local")
    };
    let validation = intake
        .validate_request(request.clone())
        .await
        .expect("intake validating through the checker")
        .into_inner();
    assert!(validation.acceptable, "{validation:?}");
    let request_id = intake
        .submit_request(request)
        .await
        .expect("submitting with a client certificate")
        .into_inner()
        .request_id;
    let decided = support::decided(&intake, &request_id).await;
    assert_eq!(decided.state(), pb::RequestState::Accepted, "{decided:?}");
    let production_id = decided.production_id.clone();
    wait_for(
        "the production COMPLETED with client certificates required",
        Duration::from_secs(60),
        || {
            let mut status = status.clone();
            let production_id = production_id.clone();
            async move {
                let p = status
                    .get_production(pb::GetProductionRequest { production_id })
                    .await
                    .ok()?
                    .into_inner();
                (p.state() == pb::ProductionState::Completed).then_some(())
            }
        },
    )
    .await
    .unwrap();

    // HTTP with the certificate: status asks the dispatcher for the jobs,
    // the catalog for the record, the checker for the templates, and intake
    // to submit.
    let with_certificate = https_client(&pki.ca_file, Some((&user_cert, &user_key)));
    // The catalog takes production.completed on its own queue: the record
    // may come a moment after status says COMPLETED.
    let record_url = format!("{status_url}/api/productions/{production_id}/record");
    wait_for(
        "the production's record in the catalog",
        Duration::from_secs(30),
        || async {
            let answer = with_certificate.get(&record_url).send().await.ok()?;
            (answer.status().as_u16() != 404).then_some(())
        },
    )
    .await
    .unwrap();
    for path in [
        format!("/api/productions/{production_id}/record"),
        "/api/templates".to_string(),
    ] {
        let answer = with_certificate
            .get(format!("{status_url}{path}"))
            .send()
            .await
            .expect("HTTP with a client certificate");
        assert_eq!(
            answer.status().as_u16(),
            200,
            "{path}: {:?}",
            answer.text().await
        );
    }
    let submitted = with_certificate
        .post(format!("{status_url}/api/v1/requests"))
        .json(&serde_json::json!({
            "profile": "test-sleep",
            "vo": "test",
            "backend": "local",
            "parameters": {"jobs": 1, "per_job": 1, "seconds": 0, "fail_job": -1, "tag": "mtls-http"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        submitted.status().as_u16(),
        202,
        "{:?}",
        submitted.text().await
    );
    let jobs = with_certificate
        .get(format!("{status_url}/api/productions/{production_id}/jobs"))
        .send()
        .await
        .expect("HTTP with a client certificate");
    assert_eq!(jobs.status().as_u16(), 200);
    let jobs: serde_json::Value = jobs.json().await.unwrap();
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(2), "{jobs}");

    // No certificate, or one of another CA: refused on gRPC and on HTTP, on
    // every port.
    for service in prodsys::Service::ALL {
        let url = format!("https://{}", addr(service));
        answers(&url, &pki.ca_file, Some(&user))
            .await
            .unwrap_or_else(|e| panic!("{service} with a certificate: {e}"));
        let refused = answers(&url, &pki.ca_file, None).await;
        assert!(
            refused.is_err(),
            "{service} answered gRPC without a certificate"
        );
        let refused = answers(&url, &pki.ca_file, Some(&other)).await;
        assert!(
            refused.is_err(),
            "{service} answered gRPC with another CA's certificate"
        );
    }
    for client in [
        https_client(&pki.ca_file, None),
        https_client(&pki.ca_file, Some((&stranger_cert, &stranger_key))),
    ] {
        let refused = client
            .get(format!("{status_url}/api/productions"))
            .send()
            .await;
        assert!(refused.is_err(), "HTTP answered: {refused:?}");
    }

    // prodctl with --cert-file and --key-file (here from the environment),
    // and refused without.
    let prodctl = support::built_binary("prodctl", "prodctl");
    let run = |certificate: Option<(&Path, &Path)>| {
        let mut command = tokio::process::Command::new(&prodctl);
        command
            .args(["status", &production_id, "-o", "json"])
            .env("PRODSYS_INTAKE_URL", &intake_url)
            .env("PRODSYS_STATUS_URL", &status_url)
            .env("PRODSYS_CATALOG_URL", &catalog_url)
            .env("PRODSYS_CA_FILE", &pki.ca_file)
            .env_remove("PRODSYS_CERT_FILE")
            .env_remove("PRODSYS_KEY_FILE");
        if let Some((cert, key)) = certificate {
            command
                .env("PRODSYS_CERT_FILE", cert)
                .env("PRODSYS_KEY_FILE", key);
        }
        command.output()
    };
    let out = run(Some((&user_cert, &user_key))).await.unwrap();
    assert!(
        out.status.success(),
        "prodctl with a client certificate: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("COMPLETED"));
    let out = run(None).await.unwrap();
    assert!(!out.status.success(), "prodctl without a certificate");
    let out = run(Some((&stranger_cert, &stranger_key))).await.unwrap();
    assert!(
        !out.status.success(),
        "prodctl with another CA's certificate"
    );

    // The Python client with cert_file and key_file.
    let script = "import json, sys; sys.path.insert(0, sys.argv[1]); \
        from prodsys_client import Client; \
        c = Client(sys.argv[2], sys.argv[3], sys.argv[4], ca_file=sys.argv[5], \
                   cert_file=sys.argv[6], key_file=sys.argv[7]); \
        print(json.dumps({'productions': len(c.productions()), 'profiles': len(c.profiles())}))";
    let root = prodsys_testkit::repo_root();
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(root.join("clients/python/src"))
        .args([&intake_url, &status_url, &catalog_url])
        .args([&pki.ca_file, &user_cert, &user_key])
        .env_remove("PRODSYS_CERT_FILE")
        .env_remove("PRODSYS_KEY_FILE")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the Python client with a client certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(seen["productions"].as_u64().unwrap() >= 1, "{seen}");
    assert!(seen["profiles"].as_u64().unwrap() > 0, "{seen}");
    app.stop().await;

    // A client CA, certificate or key that cannot be read stops a service
    // at start, the setting named.
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let missing = dir.join("missing.pem");
    for (tls, named) in [
        (
            prodsys_config::TlsSettings {
                client_ca_file: Some(missing.clone()),
                ..settings.clone()
            },
            "tls.client_ca_file",
        ),
        (
            prodsys_config::TlsSettings {
                client_ca_file: Some(not_pem.clone()),
                ..settings.clone()
            },
            "tls.client_ca_file",
        ),
        (
            prodsys_config::TlsSettings {
                client_cert_file: Some(missing.clone()),
                client_key_file: Some(user_key.clone()),
                ..settings.clone()
            },
            "tls.client_cert_file",
        ),
        (
            prodsys_config::TlsSettings {
                client_cert_file: Some(user_cert.clone()),
                client_key_file: Some(not_pem.clone()),
                ..settings.clone()
            },
            "tls.client_key_file",
        ),
        (
            // A key that is not the certificate's.
            prodsys_config::TlsSettings {
                client_cert_file: Some(user_cert.clone()),
                client_key_file: Some(stranger_key.clone()),
                ..settings.clone()
            },
            "tls.client_cert_file and tls.client_key_file",
        ),
    ] {
        let mut env = prodsys_testkit::TestEnv::new().await.unwrap();
        env.settings.tls = tls;
        refused_to_start(env, named).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}
