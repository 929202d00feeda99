//! `raftyard user|token|access …`: users, robot tokens and grants over a node's peer port.
//!
//! Passwords are read from stdin or a file and hashed here (argon2id) before anything is
//! sent; robot token secrets are made here and only their SHA-256 goes to the cluster. The
//! peer port is trusted as it is for `raftyard cluster` (loopback, or mutual TLS).

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use raftyard_auth::{password, robot};
use raftyard_cluster::pb::AccessRequest;
use raftyard_types::access::{valid_name, Actions, Grant, RepoGlob, RobotRecord, Subject, UserRecord};
use raftyard_types::event::now_ms;
use raftyard_types::Event;

use crate::admin::{client, TlsDir};

/// Where a password comes from: stdin (one line) or a file (its first line).
pub enum Secret<'a> {
    Stdin,
    File(&'a Path),
}

/// Reads a password: its first line, without the line end; at least 8 characters.
pub fn read_password(from: Secret) -> anyhow::Result<String> {
    let mut text = String::new();
    match from {
        Secret::Stdin => {
            std::io::stdin().read_to_string(&mut text).context("reading the password from stdin")?;
        }
        Secret::File(p) => text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
    }
    let pw = text.lines().next().unwrap_or("").to_string();
    anyhow::ensure!(pw.chars().count() >= 8, "the password must have at least 8 characters");
    anyhow::ensure!(pw.len() <= 1024, "the password is longer than 1024 bytes");
    Ok(pw)
}

fn actor() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into())
}

/// Applies access events through the node at `node`.
pub async fn apply(node: &str, tls: &TlsDir, events: Vec<Event>) -> anyhow::Result<u64> {
    let req = AccessRequest { events: bincode::serialize(&events)?.into(), list: false, actor: actor() };
    let reply = client(node, tls).await?.access(req).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(reply.into_inner().index)
}

/// The users, robot tokens and grants as the node at `node` has them (no hash, no key).
pub async fn list(node: &str, tls: &TlsDir) -> anyhow::Result<serde_json::Value> {
    let req = AccessRequest { events: Default::default(), list: true, actor: actor() };
    let reply = client(node, tls).await?.access(req).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(serde_json::from_str(&reply.into_inner().json)?)
}

fn check_name(kind: &str, n: &str) -> anyhow::Result<()> {
    anyhow::ensure!(valid_name(n), "invalid {kind} name {n:?}: 1-64 characters of a-z A-Z 0-9 . _ - @");
    Ok(())
}

pub async fn user_add(
    node: &str,
    tls: &TlsDir,
    name: &str,
    admin: bool,
    groups: Vec<String>,
    pw: &str,
) -> anyhow::Result<()> {
    check_name("user", name)?;
    for g in &groups {
        check_name("group", g)?;
    }
    let record = UserRecord { password_hash: password::hash(pw), admin, groups, created_ms: now_ms() };
    let index = apply(node, tls, vec![Event::UserPut { name: name.into(), record, replace: false }]).await?;
    println!("user {name} added{} (log index {index})", if admin { " as an admin" } else { "" });
    Ok(())
}

pub async fn user_passwd(node: &str, tls: &TlsDir, name: &str, pw: &str) -> anyhow::Result<()> {
    let ev = Event::UserPassword { name: name.into(), password_hash: password::hash(pw) };
    let index = apply(node, tls, vec![ev]).await?;
    println!("password of {name} changed (log index {index})");
    Ok(())
}

pub async fn user_remove(node: &str, tls: &TlsDir, name: &str) -> anyhow::Result<()> {
    let index = apply(node, tls, vec![Event::UserRemoved { name: name.into() }]).await?;
    println!("user {name} removed with its grants (log index {index})");
    Ok(())
}

/// `30d`, `12h`, `90m`, `3600s` or plain seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => anyhow::bail!("invalid duration {s:?}: a number with s, m, h or d"),
    };
    Ok(Duration::from_secs(secs))
}

/// `GLOB:ACTIONS`, e.g. `team/*:pull,push`.
pub fn parse_grant(s: &str) -> anyhow::Result<(RepoGlob, Actions)> {
    let (glob, actions) =
        s.rsplit_once(':').with_context(|| format!("grant {s:?}: REPOS:ACTIONS, e.g. team/*:pull,push"))?;
    let actions = Actions::parse(actions)?;
    anyhow::ensure!(!actions.is_empty(), "grant {s:?} names no action");
    Ok((RepoGlob::parse(glob)?, actions))
}

pub async fn token_create(
    node: &str,
    tls: &TlsDir,
    name: &str,
    grants: &[String],
    expires: Option<&str>,
) -> anyhow::Result<()> {
    check_name("token", name)?;
    let grants: Vec<(RepoGlob, Actions)> = grants.iter().map(|g| parse_grant(g)).collect::<anyhow::Result<_>>()?;
    let expires_ms = expires.map(parse_duration).transpose()?.map(|d| now_ms() + d.as_millis() as u64);
    let (id, secret, hash) = robot::generate();
    let mut events = vec![Event::RobotAdded {
        id: id.clone(),
        record: RobotRecord {
            name: name.into(),
            secret_sha256: hash,
            expires_ms,
            created_ms: now_ms(),
            last_used_ms: None,
        },
    }];
    events.extend(
        grants
            .into_iter()
            .map(|(repos, actions)| Event::GrantAdded(Grant { subject: Subject::Robot(id.clone()), repos, actions })),
    );
    apply(node, tls, events).await?;
    eprintln!("robot token {name} created (id {id}); the secret is printed once, below:");
    println!("{secret}");
    Ok(())
}

/// The id of the robot token named `name` (or with that id).
async fn robot_id(node: &str, tls: &TlsDir, name: &str) -> anyhow::Result<String> {
    let all = list(node, tls).await?;
    let matches: Vec<String> = all["robots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["name"] == name || r["id"] == name)
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    match matches.as_slice() {
        [id] => Ok(id.clone()),
        [] => anyhow::bail!("no robot token named {name:?}"),
        _ => anyhow::bail!("several robot tokens are named {name:?}: give the id ({})", matches.join(", ")),
    }
}

pub async fn token_revoke(node: &str, tls: &TlsDir, name: &str) -> anyhow::Result<()> {
    let id = robot_id(node, tls, name).await?;
    let index = apply(node, tls, vec![Event::RobotRevoked { id: id.clone() }]).await?;
    println!("robot token {name} ({id}) revoked with its grants (log index {index})");
    Ok(())
}

/// Who a grant is for, as the command line names it.
pub struct Who {
    pub user: Option<String>,
    pub group: Option<String>,
    pub token: Option<String>,
    pub anonymous: bool,
}

async fn subject(node: &str, tls: &TlsDir, who: Who) -> anyhow::Result<Subject> {
    Ok(match who {
        Who { user: Some(u), group: None, token: None, anonymous: false } => {
            check_name("user", &u)?;
            Subject::User(u)
        }
        Who { user: None, group: Some(g), token: None, anonymous: false } => {
            check_name("group", &g)?;
            Subject::Group(g)
        }
        Who { user: None, group: None, token: Some(t), anonymous: false } => {
            Subject::Robot(robot_id(node, tls, &t).await?)
        }
        Who { user: None, group: None, token: None, anonymous: true } => Subject::Anonymous,
        _ => anyhow::bail!("name exactly one of --user, --group, --token, --anonymous"),
    })
}

pub async fn grant(node: &str, tls: &TlsDir, who: Who, repos: &str, actions: &str) -> anyhow::Result<()> {
    let subject = subject(node, tls, who).await?;
    let repos = RepoGlob::parse(repos)?;
    let actions = Actions::parse(actions)?;
    anyhow::ensure!(!actions.is_empty(), "--actions names no action");
    let line = format!("{subject} may {actions} on {repos}");
    let index = apply(node, tls, vec![Event::GrantAdded(Grant { subject, repos, actions })]).await?;
    println!("granted: {line} (log index {index})");
    Ok(())
}

pub async fn revoke(node: &str, tls: &TlsDir, who: Who, repos: &str, actions: Option<&str>) -> anyhow::Result<()> {
    let subject = subject(node, tls, who).await?;
    let repos = RepoGlob::parse(repos)?;
    let actions = actions.map(Actions::parse).transpose()?.unwrap_or(Actions::ALL);
    let index = apply(node, tls, vec![Event::GrantRevoked { subject, repos, actions }]).await?;
    println!("revoked (log index {index})");
    Ok(())
}

pub async fn rotate_key(node: &str, tls: &TlsDir) -> anyhow::Result<()> {
    let key = raftyard_auth::token::new_signing_key(now_ms());
    let kid = key.kid.clone();
    let index = apply(node, tls, vec![Event::SigningKeyAdded { key, only_if_none: false }]).await?;
    println!("new token signing key {kid} (log index {index}); tokens signed by the previous key stay valid until they expire");
    Ok(())
}

/// Prints one part of the access state (`users`, `robots`, `grants`), as JSON or a table.
pub async fn print(node: &str, tls: &TlsDir, part: &str, json: bool) -> anyhow::Result<()> {
    let all = list(node, tls).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all[part])?);
        return Ok(());
    }
    let time = |v: &serde_json::Value| v.as_u64().map(|ms| format!("{}", ms / 1000)).unwrap_or_else(|| "-".into());
    for r in all[part].as_array().into_iter().flatten() {
        match part {
            "users" => println!(
                "{:<24} {:<6} groups: {}",
                r["name"].as_str().unwrap_or(""),
                if r["admin"] == true { "admin" } else { "" },
                r["groups"]
                    .as_array()
                    .map(|g| g.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                    .unwrap_or_default()
            ),
            "robots" => println!(
                "{:<16} {:<20} created {} expires {} last used {}",
                r["id"].as_str().unwrap_or(""),
                r["name"].as_str().unwrap_or(""),
                time(&r["created_ms"]),
                time(&r["expires_ms"]),
                time(&r["last_used_ms"])
            ),
            _ => println!(
                "{:<28} {:<32} {}",
                r["subject"].as_str().unwrap_or(""),
                r["repos"].as_str().unwrap_or(""),
                r["actions"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                    .unwrap_or_default()
            ),
        }
    }
    Ok(())
}
