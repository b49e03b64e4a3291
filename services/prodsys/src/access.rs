//! `prodsys broker-users`: one RabbitMQ user per service with the least
//! privilege it needs, and an ingest user that can only publish requests
//! to `prodsys.ingest` (through `rabbitmqctl`, so it runs where the broker
//! does, as root or the rabbitmq user). Each password is random and written
//! to its own file (mode 600), never printed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use prodsys_messaging::Names;
use prodsys_messaging::access::{self, Permissions};

use crate::Service;

/// The name of the ingest user's role among `--only`.
pub const INGEST: &str = "ingest";

/// What `prodsys broker-users` is asked.
pub struct BrokerUsers {
    /// The deployment's exchange and queue prefix (`amqp.prefix`).
    pub prefix: String,
    /// Prepended to each user's role name (`prodsys-intake`, `prodsys-ingest`).
    pub user_prefix: String,
    pub vhost: String,
    /// Where each user's password file goes (`<user>.password`).
    pub secrets_dir: PathBuf,
    /// Roles to create (service names and `ingest`); all when empty.
    pub only: Vec<String>,
    /// Delete the users instead.
    pub delete: bool,
    pub rabbitmqctl: String,
}

/// Every role and its permissions under `prefix`.
pub fn roles(prefix: &str) -> Vec<(String, Permissions)> {
    let names = Names::new(prefix);
    Service::ALL
        .iter()
        .map(|s| (s.name().to_string(), access::service(&names, s.name())))
        .chain([(INGEST.to_string(), access::ingest(&names))])
        .collect()
}

impl BrokerUsers {
    pub fn run(&self) -> anyhow::Result<()> {
        let roles: Vec<(String, Permissions)> = roles(&self.prefix)
            .into_iter()
            .filter(|(role, _)| self.only.is_empty() || self.only.contains(role))
            .collect();
        if let Some(unknown) = self
            .only
            .iter()
            .find(|o| !roles.iter().any(|(role, _)| role == *o))
        {
            bail!(
                "--only {unknown:?}: roles are intake, checker, dispatcher, status, catalog, ingest"
            );
        }
        if !self.delete {
            create_private_dir(&self.secrets_dir)?;
        }
        let existing = if self.delete {
            String::new()
        } else {
            self.ctl(&["list_users", "--quiet", "--no-table-headers"], None)?
        };
        for (role, permissions) in roles {
            let user = format!("{}{role}", self.user_prefix);
            if self.delete {
                self.ctl(&["delete_user", &user], None)?;
                let _ = std::fs::remove_file(password_file(&self.secrets_dir, &user));
                println!("deleted broker user {user}");
                continue;
            }
            let password = random_password();
            // An existing user keeps its name and gets a new password.
            let exists = existing
                .lines()
                .any(|l| l.split_whitespace().next() == Some(user.as_str()));
            if exists {
                self.ctl(&["change_password", &user], Some(&password))?;
            } else {
                self.ctl(&["add_user", &user], Some(&password))?;
            }
            self.ctl(
                &[
                    "set_permissions",
                    "-p",
                    &self.vhost,
                    &user,
                    &permissions.configure,
                    &permissions.write,
                    &permissions.read,
                ],
                None,
            )?;
            write_secret(&password_file(&self.secrets_dir, &user), &password)?;
            println!(
                "broker user {user}: configure {} write {} read {} (password in {})",
                permissions.configure,
                permissions.write,
                permissions.read,
                password_file(&self.secrets_dir, &user).display()
            );
        }
        Ok(())
    }

    /// Runs `rabbitmqctl args`, the password (if any) on its standard input
    /// so it never shows in a process list.
    fn ctl(&self, args: &[&str], password: Option<&str>) -> anyhow::Result<String> {
        let mut child = Command::new(&self.rabbitmqctl)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.rabbitmqctl))?;
        if let Some(password) = password {
            let mut stdin = child.stdin.take().context("rabbitmqctl's stdin")?;
            stdin.write_all(password.as_bytes())?;
            stdin.write_all(b"\n")?;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {} failed: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Where the password of `user` is kept.
pub fn password_file(dir: &Path, user: &str) -> PathBuf {
    dir.join(format!("{user}.password"))
}

/// 32 random hexadecimal digits (two v4 UUIDs' worth of randomness, from the OS).
pub fn random_password() -> String {
    let mut bytes = [0u8; 16];
    getrandom(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn getrandom(bytes: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(bytes))
        .expect("reading /dev/urandom");
}

pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes `secret` to `path`, readable by its owner only.
pub fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(secret.as_bytes())?;
    Ok(())
}

/// What `prodsys db-roles` is asked: one PostgreSQL role per service, each
/// owning its schema (and everything in it) and nothing else; no other
/// role but the administrator's can read it.
pub struct DbRoles {
    /// A superuser's (or the database owner's) URL of the deployment's database.
    pub admin_url: String,
    /// Prepended to each service's name to make its role (`prodsys_intake`).
    pub role_prefix: String,
    /// Where each role's password file goes (`<role>.password`).
    pub secrets_dir: PathBuf,
    /// Services to create roles for; all when empty.
    pub only: Vec<String>,
    /// Drop the roles (and what they own in this database) instead.
    pub delete: bool,
}

impl DbRoles {
    pub async fn run(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.role_prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "--role-prefix may hold only lower-case letters, digits and _"
        );
        let services: Vec<Service> = Service::ALL
            .into_iter()
            .filter(|s| self.only.is_empty() || self.only.iter().any(|o| o == s.name()))
            .collect();
        if let Some(unknown) = self
            .only
            .iter()
            .find(|o| !Service::ALL.iter().any(|s| s.name() == o.as_str()))
        {
            bail!("--only {unknown:?}: services are intake, checker, dispatcher, status, catalog");
        }
        // TLS as the URL's sslmode and sslrootcert say, as the services connect.
        let client = prodsys_db::connect(&self.admin_url)
            .await
            .context("connecting with the administrator's URL")?;
        if !self.delete {
            create_private_dir(&self.secrets_dir)?;
        }
        for service in services {
            let schema = service.name();
            let role = format!("{}{schema}", self.role_prefix);
            if self.delete {
                client
                    .batch_execute(&format!(
                        "DO $r$ BEGIN
                             IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                                 DROP OWNED BY {role}; DROP ROLE {role};
                             END IF;
                         END $r$;"
                    ))
                    .await
                    .with_context(|| format!("dropping role {role}"))?;
                let _ = std::fs::remove_file(password_file(&self.secrets_dir, &role));
                println!("dropped database role {role}");
                continue;
            }
            let password = random_password();
            // The password is hexadecimal: nothing in it needs quoting.
            client
                .batch_execute(&format!(
                    "DO $r$ BEGIN
                         IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                             ALTER ROLE {role} LOGIN PASSWORD '{password}';
                         ELSE
                             CREATE ROLE {role} LOGIN PASSWORD '{password}';
                         END IF;
                     END $r$;
                     CREATE SCHEMA IF NOT EXISTS {schema};
                     ALTER SCHEMA {schema} OWNER TO {role};
                     REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
                     DO $o$ DECLARE object record; BEGIN
                         FOR object IN SELECT c.relname, c.relkind FROM pg_class c
                                 JOIN pg_namespace n ON n.oid = c.relnamespace
                                 WHERE n.nspname = '{schema}' AND c.relkind IN ('r', 'p', 'S', 'v', 'm')
                         LOOP
                             EXECUTE format('ALTER %s {schema}.%I OWNER TO {role}',
                                 CASE object.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                                      WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END,
                                 object.relname);
                         END LOOP;
                     END $o$;"
                ))
                .await
                .with_context(|| format!("creating role {role} owning schema {schema}"))?;
            write_secret(&password_file(&self.secrets_dir, &role), &password)?;
            println!(
                "database role {role} owns schema {schema} (password in {})",
                password_file(&self.secrets_dir, &role).display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_and_the_ingest_user_have_a_role() {
        let roles = roles("p.");
        let names: Vec<&str> = roles.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "catalog",
                "checker",
                "intake",
                "status",
                "dispatcher",
                "ingest"
            ]
        );
        let password = random_password();
        assert_eq!(password.len(), 32);
        assert_ne!(password, random_password());
    }
}
