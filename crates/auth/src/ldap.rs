//! LDAP as an identity source: a service account searches the user by name, the user's own
//! bind checks the password, and a second search names the groups the user is in. What those
//! users and groups may do is still a grant in the log (`--user NAME`, `--group CN`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ldap3::{ldap_escape, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};

/// Where and how to ask.
#[derive(Clone)]
pub struct LdapSettings {
    /// `ldap://host:port` or `ldaps://host:port`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS.
    pub start_tls: bool,
    /// CA certificates (PEM) that sign the server's certificate (default: none beyond the
    /// system's roots are trusted; an `ldaps://` or StartTLS server must present a valid one).
    pub ca: Option<PathBuf>,
    pub bind_dn: String,
    /// The service account's password (read from a file, never logged).
    pub bind_password: String,
    pub user_base_dn: String,
    /// `{username}` is replaced by the escaped user name.
    pub user_filter: String,
    pub group_base_dn: Option<String>,
    /// `{dn}` is replaced by the escaped user DN, `{username}` by the escaped user name; the
    /// groups' `cn` are their names in grants.
    pub group_filter: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for LdapSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapSettings")
            .field("url", &self.url)
            .field("bind_dn", &self.bind_dn)
            .field("bind_password", &"<redacted>")
            .field("user_base_dn", &self.user_base_dn)
            .finish()
    }
}

impl LdapSettings {
    fn connection(&self) -> Result<LdapConnSettings, String> {
        let mut s = LdapConnSettings::new().set_conn_timeout(self.timeout).set_starttls(self.start_tls);
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.add(c.map_err(|e| format!("{}: {e}", ca.display()))?).map_err(|e| e.to_string())?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            s = s.set_config(Arc::new(cfg));
        }
        Ok(s)
    }
}

/// What LDAP said about a user name and password.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The password is right; the user is in these groups.
    Valid { groups: Vec<String> },
    /// No such user, several, or a wrong password.
    Invalid,
}

/// Asks the directory. An error means the directory could not answer (down, misconfigured):
/// the caller treats it as a failed login, and logs it.
pub async fn verify(s: &LdapSettings, user: &str, password: &str) -> Result<Verdict, String> {
    // an empty password is an "unauthenticated bind" that many servers accept: never a login
    if password.is_empty() || user.is_empty() {
        return Ok(Verdict::Invalid);
    }
    ask(s, user, Some(password)).await
}

/// Whether the directory still has the user, and its groups now (no password: for a refresh
/// token, whose holder proved the password when it was issued).
pub async fn lookup(s: &LdapSettings, user: &str) -> Result<Verdict, String> {
    if user.is_empty() {
        return Ok(Verdict::Invalid);
    }
    ask(s, user, None).await
}

async fn ask(s: &LdapSettings, user: &str, password: Option<&str>) -> Result<Verdict, String> {
    let work = async {
        let settings = s.connection()?;
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings.clone(), &s.url)
            .await
            .map_err(|e| format!("connecting to {}: {e}", s.url))?;
        ldap3::drive!(conn);
        ldap.simple_bind(&s.bind_dn, &s.bind_password)
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("service account bind: {e}"))?;
        let filter = s.user_filter.replace("{username}", &ldap_escape(user));
        let (entries, _) = ldap
            .search(&s.user_base_dn, Scope::Subtree, &filter, vec!["1.1"])
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("user search: {e}"))?;
        let [entry] = entries.as_slice() else {
            let _ = ldap.unbind().await;
            return Ok(Verdict::Invalid);
        };
        let dn = SearchEntry::construct(entry.clone()).dn;
        if let Some(password) = password {
            // the user's own bind, on a connection of its own, checks the password
            let (conn2, mut as_user) = LdapConnAsync::with_settings(settings, &s.url)
                .await
                .map_err(|e| format!("connecting to {}: {e}", s.url))?;
            ldap3::drive!(conn2);
            let ok = as_user.simple_bind(&dn, password).await.map_err(|e| format!("user bind: {e}"))?.rc == 0;
            let _ = as_user.unbind().await;
            if !ok {
                let _ = ldap.unbind().await;
                return Ok(Verdict::Invalid);
            }
        }
        let mut groups = Vec::new();
        if let Some(base) = &s.group_base_dn {
            let filter = s.group_filter.replace("{dn}", &ldap_escape(&dn)).replace("{username}", &ldap_escape(user));
            let (entries, _) = ldap
                .search(base, Scope::Subtree, &filter, vec!["cn"])
                .await
                .and_then(|r| r.success())
                .map_err(|e| format!("group search: {e}"))?;
            for e in entries {
                if let Some(cns) = SearchEntry::construct(e).attrs.get("cn") {
                    groups.extend(cns.iter().cloned());
                }
            }
            groups.sort();
            groups.dedup();
        }
        let _ = ldap.unbind().await;
        Ok(Verdict::Valid { groups })
    };
    match tokio::time::timeout(s.timeout * 3, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer from {} within {:?}", s.url, s.timeout * 3)),
    }
}
