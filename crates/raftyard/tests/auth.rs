//! Access control end to end: users and grants made with the `raftyard` command line, checked
//! on every endpoint in basic and token mode, with docker, skopeo and podman logging in; robot
//! tokens; the lockout of one address while another keeps pulling; no secret in the log.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use rand::{Rng, SeedableRng};

const ADMIN_PW: &str = "admin-password-1";
const ALICE_PW: &str = "alice-password-1";
const BOB_PW: &str = "bob-password-1";
const CAROL_PW: &str = "carol-password-1";

/// A one-node cluster with `[auth]` set to `mode` (and any more lines of that section).
fn node_with_auth(dir: &std::path::Path, mode: &str, more: &str) -> Node {
    let addr = format!("127.0.0.1:{}", free_port());
    let peer = format!("127.0.0.1:{}", free_port());
    let section = format!("[auth]\nmode = \"{mode}\"\n{more}");
    Node::start_member_with(dir, 1, &addr, &peer, &[], &Extra { cluster: &section, ..Extra::default() })
}

/// Runs `raftyard ARGS` with `input` on stdin; panics with stderr if it fails.
fn cli_stdin(args: &[&str], input: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_raftyard"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "raftyard {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn add_user(n: &Node, name: &str, pw: &str, more: &[&str]) {
    let mut args = vec!["user", "add", name, "--password-stdin", "--node", &n.peer];
    args.extend_from_slice(more);
    cli_stdin(&args, &format!("{pw}\n"));
}

fn grant(n: &Node, who: &[&str], repos: &str, actions: &str) {
    let mut args = vec!["access", "grant", "--repos", repos, "--actions", actions, "--node", &n.peer];
    args.extend_from_slice(who);
    cli(&args);
}

/// An HTTP client that sends Basic credentials on every request.
fn client_as(user: &str, pw: &str) -> reqwest::Client {
    let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}")));
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, v.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(h)
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn bearer(token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder().default_headers(h).timeout(Duration::from_secs(60)).build().unwrap()
}

/// Polls `check` every 100 ms, at most `tries` times; whether it came true.
async fn eventually<F, Fut>(tries: usize, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..tries {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn status(c: &reqwest::Client, url: String) -> u16 {
    c.get(url).send().await.unwrap().status().as_u16()
}

async fn catalog(c: &reqwest::Client, n: &Node) -> Vec<String> {
    let r = c.get(n.url("/v2/_catalog")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    v["repositories"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

/// Users, groups and grants as a new user would set them up; the whole grant matrix over HTTP.
#[tokio::test]
async fn basic_mode_enforces_the_grant_matrix_on_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let n = node_with_auth(dir.path(), "basic", "");
    add_user(&n, "admin", ADMIN_PW, &["--admin"]);
    add_user(&n, "alice", ALICE_PW, &[]);
    add_user(&n, "bob", BOB_PW, &["--group", "devs"]);
    add_user(&n, "carol", CAROL_PW, &[]);
    grant(&n, &["--user", "alice"], "team/**", "pull,push");
    grant(&n, &["--group", "devs"], "team/*", "pull");
    grant(&n, &["--user", "bob"], "bob/*", "*");
    grant(&n, &["--anonymous"], "public/*", "pull");
    let listed = cli(&["access", "list", "--json", "--node", &n.peer]);
    assert!(listed.contains("group:devs") && listed.contains("anonymous"), "{listed}");
    let users = cli(&["user", "list", "--json", "--node", &n.peer]);
    assert!(users.contains("\"alice\"") && !users.contains("argon2"), "no hash is ever listed: {users}");

    let admin = client_as("admin", ADMIN_PW);
    let alice = client_as("alice", ALICE_PW);
    let bob = client_as("bob", BOB_PW);
    let carol = client_as("carol", CAROL_PW);
    let anon = client();
    let app = push_image(&admin, &n, "team/app", "v1", b"app").await;
    push_image(&admin, &n, "team/sub/x", "v1", b"sub").await;
    push_image(&admin, &n, "public/base", "v1", b"base").await;
    let secret_layer = push_blob(&admin, &n, "other/secret", b"secret layer bytes").await;
    push_image(&admin, &n, "other/secret", "v1", b"secret").await;

    // the base: 401 with a Basic challenge and the spec's body without credentials
    let r = anon.get(n.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"raftyard\"");
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    assert_eq!(status(&client_as("alice", "wrong-password"), n.url("/v2/")).await, 401);
    assert_eq!(status(&client_as("nobody", ALICE_PW), n.url("/v2/")).await, 401);
    assert_eq!(status(&carol, n.url("/v2/")).await, 200);

    let m = |repo: &str| n.url(&format!("/v2/{repo}/manifests/v1"));
    // (caller, repository, expected status of a manifest GET)
    let matrix: [(&reqwest::Client, &str, &str, u16); 16] = [
        (&anon, "anonymous", "team/app", 401),
        (&anon, "anonymous", "public/base", 200),
        (&carol, "carol", "team/app", 403),
        (&carol, "carol", "public/base", 200),
        (&carol, "carol", "no/such/repo", 403),
        (&alice, "alice", "team/app", 200),
        (&alice, "alice", "team/sub/x", 200),
        (&alice, "alice", "other/secret", 403),
        (&bob, "bob", "team/app", 200),
        (&bob, "bob", "team/sub/x", 403),
        (&bob, "bob", "other/secret", 403),
        (&admin, "admin", "other/secret", 200),
        (&admin, "admin", "team/sub/x", 200),
        (&anon, "anonymous", "no/such/repo", 401),
        (&alice, "alice", "no/such/repo", 403),
        (&admin, "admin", "no/such/repo", 404),
    ];
    for (c, who, repo, want) in matrix {
        let r = c.get(m(repo)).header("accept", OCI_MANIFEST).send().await.unwrap();
        let got = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(got, want, "{who} GET {repo}: {body}");
        if got == 403 {
            assert!(body.contains("\"DENIED\""), "{body}");
            assert!(!body.contains(repo), "a refusal does not echo what exists: {body}");
        }
    }
    // a denial to an anonymous caller names the scope it lacked in the challenge
    let r = anon.get(m("team/app")).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"raftyard\"");

    // pushes and deletes
    let post = |c: &reqwest::Client, repo: &str| c.post(n.url(&format!("/v2/{repo}/blobs/uploads/"))).send();
    assert_eq!(post(&alice, "team/new").await.unwrap().status(), 202);
    assert_eq!(post(&alice, "team/deep/new").await.unwrap().status(), 202);
    assert_eq!(post(&bob, "team/app").await.unwrap().status(), 403);
    assert_eq!(post(&bob, "bob/own").await.unwrap().status(), 202);
    assert_eq!(post(&carol, "public/base").await.unwrap().status(), 403);
    assert_eq!(post(&anon, "public/base").await.unwrap().status(), 401);
    let del = |c: &reqwest::Client, repo: &str| c.delete(n.url(&format!("/v2/{repo}/manifests/{app}"))).send();
    assert_eq!(del(&alice, "team/app").await.unwrap().status(), 403, "alice may not delete");
    push_image(&bob, &n, "bob/own", "v1", b"bob's").await;
    let r = bob.delete(n.url("/v2/bob/own/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 202, "bob may delete in bob/*");

    // the catalog lists only what the caller may pull
    assert_eq!(catalog(&alice, &n).await, ["public/base", "team/app", "team/sub/x"]);
    assert_eq!(catalog(&bob, &n).await, ["bob/own", "public/base", "team/app"]);
    assert_eq!(catalog(&carol, &n).await, ["public/base"]);
    assert_eq!(catalog(&admin, &n).await, ["bob/own", "other/secret", "public/base", "team/app", "team/sub/x"]);
    // usage lists what the caller may pull, and the quotas over those repositories only
    cli(&["quota", "set", "--repos", "other/**", "--bytes", "1GB", "--node", &n.peer]);
    cli(&["quota", "set", "--repos", "team/**", "--bytes", "1GB", "--node", &n.peer]);
    let usage = |c: reqwest::Client| {
        let url = n.url("/v2/_raftyard/usage");
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let v: serde_json::Value = r.json().await.unwrap();
            let names = |k: &str, f: &str| -> Vec<String> {
                v[k].as_array().unwrap().iter().map(|x| x[f].as_str().unwrap().to_string()).collect()
            };
            (names("repositories", "repository"), names("quotas", "repos"))
        }
    };
    assert_eq!(
        usage(alice.clone()).await,
        (vec!["public/base".into(), "team/app".into(), "team/sub/x".into()], vec!["team/**".into()])
    );
    assert_eq!(usage(carol.clone()).await, (vec!["public/base".into()], vec![]));
    let (repos, quotas) = usage(admin.clone()).await;
    assert!(repos.contains(&"other/secret".to_string()) && quotas.len() == 2, "{repos:?} {quotas:?}");
    assert_eq!(status(&anon, n.url("/v2/_raftyard/usage")).await, 401);
    assert_eq!(status(&anon, n.url("/v2/_catalog")).await, 401);
    // pages are pages of what the caller sees
    let r = alice.get(n.url("/v2/_catalog?n=2")).send().await.unwrap();
    assert!(r.headers()["link"].to_str().unwrap().contains("last=team%2Fapp"));

    // a mount from a repository the caller may not pull is an ordinary upload: it learns nothing
    let mount =
        |from: &str| bob.post(n.url(&format!("/v2/bob/own/blobs/uploads/?mount={secret_layer}&from={from}"))).send();
    assert_eq!(mount("other/secret").await.unwrap().status(), 202);
    let team_blob = push_blob(&admin, &n, "team/app", b"shared layer").await;
    let r =
        bob.post(n.url(&format!("/v2/bob/own/blobs/uploads/?mount={team_blob}&from=team/app"))).send().await.unwrap();
    assert_eq!(r.status(), 201, "bob may pull team/app, so he may mount from it");
    let r = bob.post(n.url(&format!("/v2/bob/own/blobs/uploads/?mount={secret_layer}"))).send().await.unwrap();
    assert_eq!(r.status(), 202, "a mount without `from` only finds blobs of repositories the caller may pull");
    let r = bob.post(n.url(&format!("/v2/bob/own2/blobs/uploads/?mount={team_blob}"))).send().await.unwrap();
    assert_eq!(r.status(), 201, "team/app links it, and bob may pull team/app");

    // the event journal is for admins; /metrics for admins and a metrics grant
    assert_eq!(status(&alice, n.url("/v2/_raftyard/events")).await, 403);
    assert_eq!(status(&anon, n.url("/v2/_raftyard/events")).await, 401);
    let r = admin.get(n.url("/v2/_raftyard/events?since=0&limit=10000")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let journal = r.text().await.unwrap();
    assert!(journal.contains("\"UserPut\"") && journal.contains("\"GrantAdded\""), "the journal is the audit trail");
    assert!(!journal.contains("argon2"), "no hash in the journal's view");
    assert_eq!(status(&alice, n.url("/metrics")).await, 403);
    add_user(&n, "prom", "prom-password-1", &[]);
    grant(&n, &["--user", "prom"], "_raftyard/metrics", "pull");
    let r = client_as("prom", "prom-password-1").get(n.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let metrics = r.text().await.unwrap();
    assert!(metrics.contains("raftyard_auth_failures_total{reason=\"bad_password\"}"), "{metrics}");
    assert!(metrics.contains("raftyard_auth_denied_total"), "{metrics}");
    // health and readiness stay open for load balancers
    assert_eq!(status(&anon, n.url("/v2/_raftyard/health")).await, 200);

    // revoking and removing take effect at once
    cli(&["access", "revoke", "--user", "alice", "--repos", "team/**", "--node", &n.peer]);
    assert_eq!(status(&alice, m("team/app")).await, 403);
    cli(&["user", "remove", "carol", "--node", &n.peer]);
    assert_eq!(status(&carol, n.url("/v2/")).await, 401);
    cli_stdin(&["user", "passwd", "bob", "--password-stdin", "--node", &n.peer], "bob-new-password\n");
    assert_eq!(status(&bob, n.url("/v2/")).await, 401, "the old password stops working");
    assert_eq!(status(&client_as("bob", "bob-new-password"), n.url("/v2/")).await, 200);

    let log = std::fs::read_to_string(&n.log).unwrap();
    for secret in [ADMIN_PW, ALICE_PW, BOB_PW, CAROL_PW, "bob-new-password", "argon2id"] {
        assert!(!log.contains(secret), "the log holds a secret: {secret}");
    }
    assert!(log.contains("\"audit\":\"denied\"") && log.contains("\"audit\":\"access_change\""));
}

/// Robot tokens as `docker login` passwords; the lockout of one address while another pulls.
#[tokio::test]
async fn robot_tokens_and_lockout_of_one_address() {
    let dir = tempfile::tempdir().unwrap();
    let n = node_with_auth(dir.path(), "basic", "lockout_threshold = 5\n");
    add_user(&n, "admin", ADMIN_PW, &["--admin"]);
    let admin = client_as("admin", ADMIN_PW);
    let digest = push_image(&admin, &n, "team/app", "v1", b"app").await;

    let secret = cli(&["token", "create", "--name", "ci", "--grant", "ci/*:pull,push", "--node", &n.peer]);
    let secret = secret.trim().to_string();
    assert!(secret.starts_with("ryt_"), "{secret}");
    let robot = client_as("ci", &secret);
    push_image(&robot, &n, "ci/build", "1", b"built").await;
    assert_eq!(status(&robot, n.url("/v2/team/app/manifests/v1")).await, 403);
    // last use recorded in the log (at most once a minute)
    let peer = n.peer.as_str();
    let used = eventually(50, || async move {
        let l: serde_json::Value = serde_json::from_str(&cli(&["token", "list", "--json", "--node", peer])).unwrap();
        l[0]["last_used_ms"].as_u64().is_some()
    });
    assert!(used.await, "the token's last use is recorded");
    // an expired token is refused
    let expired =
        cli(&["token", "create", "--name", "old", "--grant", "ci/*:pull", "--expires", "0s", "--node", &n.peer]);
    assert_eq!(status(&client_as("old", expired.trim()), n.url("/v2/")).await, 401);
    // metrics: a wide grant does not reach the reserved name, a grant on exactly it does
    add_user(&n, "watcher", "watcher-password-1", &[]);
    grant(&n, &["--user", "watcher"], "**", "pull");
    let watcher = client_as("watcher", "watcher-password-1");
    assert_eq!(status(&watcher, n.url("/metrics")).await, 403);
    grant(&n, &["--user", "watcher"], "_raftyard/metrics", "pull");
    assert_eq!(status(&watcher, n.url("/metrics")).await, 200);
    cli(&["token", "revoke", "--name", "ci", "--node", &n.peer]);
    assert_eq!(status(&robot, n.url("/v2/")).await, 401, "a revoked token stops working");

    // five failures a minute are tolerated from 127.0.0.2; the sixth locks it out, and only it
    let from2 = |user: &str, pw: &str| {
        let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}")));
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::AUTHORIZATION, v.parse().unwrap());
        reqwest::Client::builder().local_address(Some("127.0.0.2".parse().unwrap())).default_headers(h).build().unwrap()
    };
    let attacker = from2("admin", "guess");
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(status(&attacker, n.url("/v2/")).await);
        // the other address keeps pulling meanwhile
        assert_eq!(status(&admin, n.url(&format!("/v2/team/app/manifests/{digest}"))).await, 200);
    }
    assert_eq!(codes, [401, 401, 401, 401, 401, 401, 429, 429], "locked after the sixth failure");
    let r = from2("admin", ADMIN_PW).get(n.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 429, "locked out even with the right password");
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    let metrics = admin.get(n.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("raftyard_auth_lockouts_total 1"), "{metrics}");
    assert!(metrics.contains("raftyard_auth_locked_addresses 1"), "{metrics}");
    let log = std::fs::read_to_string(&n.log).unwrap();
    assert!(!log.contains(&secret) && !log.contains(expired.trim()), "a robot secret reached the log");
}

fn jwt_claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// The Docker token flow by hand: challenges, the token endpoint (GET with Basic, the OAuth2
/// POST with password and refresh token), the granted intersection, tokens for other
/// repositories.
#[tokio::test]
async fn token_mode_challenges_and_issues_the_intersection() {
    let dir = tempfile::tempdir().unwrap();
    let n = node_with_auth(dir.path(), "token", "");
    // the leader makes the cluster's signing key at start, before any token is asked for
    let keys = |peer: &str| {
        let all: serde_json::Value = serde_json::from_str(&cli(&["access", "list", "--all", "--node", peer])).unwrap();
        all["signing_keys"].as_array().map_or(0, |k| k.len())
    };
    let peer = n.peer.as_str();
    assert!(eventually(100, || async move { keys(peer) > 0 }).await, "no signing key made at start");
    assert_eq!(keys(peer), 1, "one signing key made at start");
    add_user(&n, "admin", ADMIN_PW, &["--admin"]);
    add_user(&n, "alice", ALICE_PW, &[]);
    grant(&n, &["--user", "alice"], "team/**", "pull,push");
    grant(&n, &["--anonymous"], "public/*", "pull");
    let anon = client();
    let r = anon.get(n.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let realm = format!("http://{}/auth/token", n.addr);
    assert_eq!(r.headers()["www-authenticate"], format!("Bearer realm=\"{realm}\",service=\"raftyard\"").as_str());
    let r = anon.get(n.url("/v2/team/app/manifests/v1")).send().await.unwrap();
    assert_eq!(
        r.headers()["www-authenticate"],
        format!("Bearer realm=\"{realm}\",service=\"raftyard\",scope=\"repository:team/app:pull\"").as_str()
    );
    // a token for alice, asking more than she may: she gets pull and push, not delete
    let alice = client_as("alice", ALICE_PW);
    let r = alice
        .get(format!("{realm}?service=raftyard&scope=repository:team/app:pull,push,delete&offline_token=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let claims = jwt_claims(&token);
    assert_eq!(claims["access"][0]["actions"], serde_json::json!(["pull", "push"]));
    assert_eq!(claims["sub"], "alice");
    assert!(v["refresh_token"].is_string());
    let with = bearer(&token);
    let digest = push_image(&with, &n, "team/app", "v1", b"by token").await;
    assert_eq!(status(&with, n.url("/v2/team/app/manifests/v1")).await, 200);
    let r = with.delete(n.url(&format!("/v2/team/app/manifests/{digest}"))).send().await.unwrap();
    assert_eq!(r.status(), 403, "delete was not granted, and alice may not get it");
    // the token names one repository: for another one alice may use, a new challenge
    let r = with.get(n.url("/v2/team/other/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("scope=\"repository:team/other:pull\""));
    assert_eq!(status(&with, n.url("/v2/other/x/manifests/v1")).await, 403);
    // wrong password at the token endpoint; garbage and forged bearer tokens at the API
    assert_eq!(status(&client_as("alice", "nope"), format!("{realm}?scope=repository:team/app:pull")).await, 401);
    assert_eq!(status(&bearer("not.a.token"), n.url("/v2/")).await, 401);
    let mut forged = token.clone();
    forged.truncate(forged.len() - 4);
    forged.push_str("AAAA");
    assert_eq!(status(&bearer(&forged), n.url("/v2/team/app/manifests/v1")).await, 401);
    // a Basic caller in token mode may still reach the API (curl, scripts)
    assert_eq!(status(&alice, n.url("/v2/team/app/manifests/v1")).await, 200);

    // the OAuth2 POST: password grant, then the refresh token docker keeps as identity token
    let form = [
        ("grant_type", "password"),
        ("username", "alice"),
        ("password", ALICE_PW),
        ("service", "raftyard"),
        ("scope", "repository:team/app:pull"),
        ("access_type", "offline"),
        ("client_id", "test"),
    ];
    let v: serde_json::Value = anon.post(&realm).form(&form).send().await.unwrap().json().await.unwrap();
    let refresh = v["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(jwt_claims(v["access_token"].as_str().unwrap())["access"][0]["actions"], serde_json::json!(["pull"]));
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("service", "raftyard"),
        ("scope", "repository:team/app:pull,push"),
        ("client_id", "test"),
    ];
    let r = anon.post(&realm).form(&form).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        jwt_claims(v["access_token"].as_str().unwrap())["access"][0]["actions"],
        serde_json::json!(["pull", "push"])
    );
    assert_eq!(status(&bearer(&refresh), n.url("/v2/")).await, 401, "a refresh token is no access token");
    let r = anon
        .post(&realm)
        .form(&[("grant_type", "password"), ("username", "alice"), ("password", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "RFC 6749: invalid_grant");
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "invalid_grant");
    let r = anon.post(&realm).form(&[("grant_type", "client_credentials")]).send().await.unwrap();
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "unsupported_grant_type");
    // a refresh grant gets no new refresh token (a chain of refreshes cannot outlive the first)
    assert!(v.get("refresh_token").is_none(), "{v}");
    // a changed password ends the refresh token
    cli_stdin(&["user", "passwd", "alice", "--password-stdin", "--node", &n.peer], "alice-password-2\n");
    let form = [("grant_type", "refresh_token"), ("refresh_token", refresh.as_str()), ("service", "raftyard")];
    let r = anon.post(&realm).form(&form).send().await.unwrap();
    assert_eq!(r.status(), 400, "the refresh token outlived a password change");
    cli_stdin(&["user", "passwd", "alice", "--password-stdin", "--node", &n.peer], &format!("{ALICE_PW}\n"));
    // a rotated key keeps the old tokens valid until they expire
    cli(&["access", "rotate-key", "--node", &n.peer]);
    assert_eq!(status(&with, n.url("/v2/team/app/manifests/v1")).await, 200);
    // an anonymous pull of a public repository: a token without credentials, as docker asks
    push_image(&client_as("admin", ADMIN_PW), &n, "public/base", "v1", b"base").await;
    let v: serde_json::Value = anon
        .get(format!("{realm}?service=raftyard&scope=repository:public/base:pull,push"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwt_claims(v["token"].as_str().unwrap())["access"][0]["actions"], serde_json::json!(["pull"]));
    assert_eq!(status(&bearer(v["token"].as_str().unwrap()), n.url("/v2/public/base/manifests/v1")).await, 200);
    // the catalog needs its scope, then lists what the holder may pull
    assert_eq!(status(&with, n.url("/v2/_catalog")).await, 401);
    let v: serde_json::Value =
        alice.get(format!("{realm}?scope=registry:catalog:*")).send().await.unwrap().json().await.unwrap();
    let cat = bearer(v["token"].as_str().unwrap());
    push_image(&client_as("admin", ADMIN_PW), &n, "other/x", "v1", b"x").await;
    assert_eq!(catalog(&cat, &n).await, ["public/base", "team/app"]);
}

/// docker, skopeo and podman log in and push and pull, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_log_in_in_both_modes() {
    for mode in ["basic", "token"] {
        let dir = tempfile::tempdir().unwrap();
        let n = node_with_auth(dir.path(), mode, "");
        add_user(&n, "alice", ALICE_PW, &[]);
        grant(&n, &["--user", "alice"], "team/**", "pull,push");
        add_user(&n, "eve", "eve-password-1", &[]);

        // docker: login (stored under its own config dir), push, pull
        let cfg = dir.path().join("docker-config");
        let docker = |args: &[&str]| {
            let mut c = Command::new("docker");
            c.arg("--config").arg(&cfg).args(args);
            c
        };
        let login = |user: &str, pw: &str| {
            let mut c = docker(&["login", "-u", user, "--password-stdin", &n.addr]);
            let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
            child.stdin.take().unwrap().write_all(pw.as_bytes()).unwrap();
            child.wait_with_output().unwrap()
        };
        let bad = login("alice", "wrong-password");
        assert!(!bad.status.success(), "{mode}: docker login with a wrong password must fail");
        let ok = login("alice", ALICE_PW);
        assert!(ok.status.success(), "{mode}: docker login: {}", String::from_utf8_lossy(&ok.stderr));
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        let mut junk = vec![0u8; 300_000];
        rand::rngs::StdRng::seed_from_u64(5).fill(&mut junk[..]);
        std::fs::write(rootfs.join("payload"), &junk).unwrap();
        let tar = dir.path().join("rootfs.tar");
        run(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg("."));
        let image = format!("{}/team/docker:{mode}{}", n.addr, std::process::id());
        run(docker(&["import"]).arg(&tar).arg(&image));
        let push = run(&mut docker(&["push", &image]));
        let pushed = push.split_whitespace().find(|w| w.starts_with("sha256:")).expect("digest").to_string();
        run(&mut docker(&["rmi", &image]));
        let pull = run(&mut docker(&["pull", &image]));
        assert!(pull.contains(&pushed), "{mode}: {pull}");
        run(&mut docker(&["rmi", &image]));
        // someone without a grant is refused a push
        let denied_image = format!("{}/team/denied:{mode}{}", n.addr, std::process::id());
        run(docker(&["import"]).arg(&tar).arg(&denied_image));
        assert!(login("eve", "eve-password-1").status.success());
        let out = docker(&["push", &denied_image]).output().unwrap();
        assert!(!out.status.success(), "{mode}: eve may not push");
        run(&mut docker(&["rmi", &denied_image]));
        // a robot token is a docker login password
        let secret = cli(&["token", "create", "--name", "ci", "--grant", "team/ci:pull,push", "--node", &n.peer]);
        assert!(login("ci", secret.trim()).status.success(), "{mode}: docker login with a robot token");
        let robot_image = format!("{}/team/ci:{mode}{}", n.addr, std::process::id());
        run(docker(&["import"]).arg(&tar).arg(&robot_image));
        run(&mut docker(&["push", &robot_image]));
        run(&mut docker(&["rmi", &robot_image]));
        let elsewhere = format!("{}/team/not-ci:{mode}{}", n.addr, std::process::id());
        run(docker(&["import"]).arg(&tar).arg(&elsewhere));
        let out = docker(&["push", &elsewhere]).output().unwrap();
        run(&mut docker(&["rmi", &elsewhere]));
        assert!(!out.status.success(), "{mode}: the robot may push team/ci only");
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains("denied") || err.contains("unauthorized"), "{mode}: {err}");
        assert!(login("alice", ALICE_PW).status.success());

        // skopeo with --creds / --dest-creds
        let src = dir.path().join("layout");
        let index = write_layout(&src, 3);
        let dest = format!("docker://{}/team/skopeo:v1", n.addr);
        run(Command::new("skopeo")
            .args(["copy", "--all", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(format!("--dest-creds=alice:{ALICE_PW}"))
            .arg(format!("oci:{}:v1", src.display()))
            .arg(&dest));
        let raw = run(Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("--creds=alice:{ALICE_PW}"))
            .arg(&dest));
        assert_eq!(sha256(raw.as_bytes()), index);
        let out = Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &dest]).output().unwrap();
        assert!(!out.status.success(), "{mode}: skopeo without credentials is refused");

        // podman login, then pull what skopeo pushed, by digest
        let auth_file = dir.path().join("podman-auth.json");
        let mut p = Command::new("podman")
            .args(["login", "--tls-verify=false", "-u", "alice", "--password-stdin", "--authfile"])
            .arg(&auth_file)
            .arg(&n.addr)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin.take().unwrap().write_all(ALICE_PW.as_bytes()).unwrap();
        let out = p.wait_with_output().unwrap();
        assert!(out.status.success(), "{mode}: podman login: {}", String::from_utf8_lossy(&out.stderr));
        // podman pulls what docker pushed, with the credentials of its login
        let pulled = run(Command::new("podman")
            .args(["pull", "-q", "--tls-verify=false", "--authfile"])
            .arg(&auth_file)
            .arg(&image));
        let digest = run(Command::new("podman").args(["image", "inspect", "--format", "{{.Digest}}", pulled.trim()]));
        assert_eq!(digest.trim(), pushed, "{mode}: podman pulled another image");
        run(Command::new("podman").args(["rmi", "-f", pulled.trim()]));
        let out = Command::new("podman")
            .args(["pull", "-q", "--tls-verify=false", "--authfile", "/dev/null", &image])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{mode}: podman without credentials is refused");

        // in token mode every client went through the token endpoint; in basic mode none did
        add_user(&n, "admin", ADMIN_PW, &["--admin"]);
        let metrics = client_as("admin", ADMIN_PW).get(n.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let tokens: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("raftyard_http_requests_total{route=\"token\"") && l.contains("status=\"200\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        if mode == "token" {
            assert!(tokens >= 5, "docker, skopeo and podman fetched tokens: {tokens}");
        } else {
            assert_eq!(tokens, 0);
        }
        let log = std::fs::read_to_string(&n.log).unwrap();
        assert!(!log.contains(ALICE_PW) && !log.contains("eve-password-1"), "{mode}: a password reached the log");
    }
}

/// Users of an htpasswd file as `htpasswd -B` writes it (what Distribution reads); the file is
/// reloaded when it changes; what they may do is still a grant in the log.
#[tokio::test]
async fn htpasswd_users_are_reloaded_and_still_need_grants() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("htpasswd");
    run(Command::new("htpasswd").args(["-B", "-b", "-c"]).arg(&file).args(["dave", "dave-password-1"]));
    let n = node_with_auth(dir.path(), "basic", &format!("htpasswd = {:?}\n", file));
    add_user(&n, "admin", ADMIN_PW, &["--admin"]);
    push_image(&client_as("admin", ADMIN_PW), &n, "team/app", "v1", b"app").await;
    let dave = client_as("dave", "dave-password-1");
    let m = n.url("/v2/team/app/manifests/v1");
    assert_eq!(status(&dave, n.url("/v2/")).await, 200);
    assert_eq!(status(&dave, m.clone()).await, 403, "known, but not granted");
    grant(&n, &["--user", "dave"], "team/*", "pull");
    assert_eq!(status(&dave, m.clone()).await, 200);
    assert_eq!(status(&client_as("dave", "wrong"), n.url("/v2/")).await, 401);
    // a user added to the file works within a second or two; one taken out stops working
    run(Command::new("htpasswd").args(["-B", "-b"]).arg(&file).args(["erin", "erin-password-1"]));
    let (erin, base) = (&client_as("erin", "erin-password-1"), n.url("/v2/"));
    let base = base.as_str();
    assert!(
        eventually(40, || async move { status(erin, base.to_string()).await == 200 }).await,
        "erin was not picked up from the changed file"
    );
    run(Command::new("htpasswd").args(["-D"]).arg(&file).arg("dave"));
    let dave = &dave;
    assert!(
        eventually(40, || async move { status(dave, base.to_string()).await == 401 }).await,
        "dave still works after leaving the file (a cached credential outlived the reload)"
    );
}

/// A user made on one node logs in through the relay's shared endpoint of a three-node cluster
/// in token mode (the realm follows the relay's address), pushes with docker and pulls from
/// every node's own endpoint: users and grants are the same on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_through_the_relay_in_token_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, cl, leader) = behind_relay(dir.path(), |_| "[auth]\nmode = \"token\"\n".to_string()).await;
    // made through a follower's peer port: forwarded to the leader like any write
    let follower = &cl.nodes[(leader + 1) % 3];
    add_user(follower, "alice", ALICE_PW, &[]);
    grant(follower, &["--user", "alice"], "team/**", "pull,push");
    let shared = relay.shared().to_string();
    let r = client().get(format!("http://{shared}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        format!("Bearer realm=\"http://{shared}/auth/token\",service=\"raftyard\"").as_str()
    );
    let cfg = dir.path().join("docker-config");
    let docker = |args: &[&str]| {
        let mut c = Command::new("docker");
        c.arg("--config").arg(&cfg).args(args);
        c
    };
    let mut child = docker(&["login", "-u", "alice", "--password-stdin", &shared])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(ALICE_PW.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "docker login through the relay: {}", String::from_utf8_lossy(&out.stderr));
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let mut junk = vec![0u8; 2_000_000];
    rand::rngs::StdRng::seed_from_u64(9).fill(&mut junk[..]);
    std::fs::write(rootfs.join("payload"), &junk).unwrap();
    let tar = dir.path().join("rootfs.tar");
    run(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg("."));
    let image = format!("{shared}/team/relayed:t{}", std::process::id());
    run(docker(&["import"]).arg(&tar).arg(&image));
    let push = run(&mut docker(&["push", &image]));
    let pushed = push.split_whitespace().find(|w| w.starts_with("sha256:")).expect("digest").to_string();
    run(&mut docker(&["rmi", &image]));
    let pull = run(&mut docker(&["pull", &image]));
    assert!(pull.contains(&pushed), "{pull}");
    run(&mut docker(&["rmi", &image]));
    // every node's own endpoint serves it to alice, with a token from that node
    let alice = client_as("alice", ALICE_PW);
    for id in 1..=3u64 {
        let own = &relay.services[&format!("registry-{id}")];
        let tag = format!("t{}", std::process::id());
        let v: serde_json::Value = alice
            .get(format!("http://{own}/auth/token?service=raftyard&scope=repository:team/relayed:pull"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let r = bearer(v["token"].as_str().unwrap())
            .head(format!("http://{own}/v2/team/relayed/manifests/{tag}"))
            .header("accept", "application/vnd.docker.distribution.manifest.v2+json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "node {id}");
        assert_eq!(r.headers()["docker-content-digest"], pushed.as_str(), "node {id}");
    }
}

/// A real slapd on a loopback port, with users and groups, for the life of a test.
struct Slapd {
    child: std::process::Child,
    url: String,
}

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_slapd(dir: &std::path::Path) -> Slapd {
    let d = dir.join("slapd");
    std::fs::create_dir_all(d.join("db")).unwrap();
    let conf = d.join("slapd.conf");
    std::fs::write(
        &conf,
        format!(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/inetorgperson.schema\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\n\
             pidfile {}/slapd.pid\ndatabase mdb\nmaxsize 10485760\nsuffix \"dc=example,dc=org\"\n\
             rootdn \"cn=admin,dc=example,dc=org\"\nrootpw admin-secret\ndirectory {}/db\n",
            d.display(),
            d.display()
        ),
    )
    .unwrap();
    let person = |uid: &str, pw: &str| {
        format!(
            "dn: uid={uid},ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\nuserPassword: {pw}\n\n"
        )
    };
    let ldif = format!(
        "dn: dc=example,dc=org\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n\
         dn: ou=people,dc=example,dc=org\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: ou=groups,dc=example,dc=org\nobjectClass: organizationalUnit\nou: groups\n\n\
         {}{}\
         dn: cn=devs,ou=groups,dc=example,dc=org\nobjectClass: groupOfNames\ncn: devs\n\
         member: uid=lara,ou=people,dc=example,dc=org\n\n\
         dn: cn=ops,ou=groups,dc=example,dc=org\nobjectClass: groupOfNames\ncn: ops\n\
         member: uid=omar,ou=people,dc=example,dc=org\n",
        person("lara", "lara-password-1"),
        person("omar", "omar-password-1"),
    );
    let ldif_path = d.join("data.ldif");
    std::fs::write(&ldif_path, ldif).unwrap();
    run(Command::new("slapadd").arg("-f").arg(&conf).arg("-l").arg(&ldif_path));
    let addr = format!("127.0.0.1:{}", free_port());
    let url = format!("ldap://{addr}");
    let child = Command::new("slapd")
        .arg("-f")
        .arg(&conf)
        .args(["-h", &format!("{url}/"), "-d", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("slapd (the README's test command installs it)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "slapd did not start on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Slapd { child, url }
}

/// LDAP users and groups from a real slapd: the directory says who (and in which groups), the
/// grants in the log say what; injection in the user name finds no one.
#[tokio::test]
async fn ldap_users_and_groups_from_slapd() {
    let dir = tempfile::tempdir().unwrap();
    let ldap = start_slapd(dir.path());
    let bind_pw = dir.path().join("ldap-bind");
    std::fs::write(&bind_pw, "admin-secret\n").unwrap();
    let section = format!(
        "[auth.ldap]\nurl = \"{}\"\nbind_dn = \"cn=admin,dc=example,dc=org\"\nbind_password_file = {:?}\n\
         user_base_dn = \"ou=people,dc=example,dc=org\"\nuser_filter = \"(uid={{username}})\"\n\
         group_base_dn = \"ou=groups,dc=example,dc=org\"\ngroup_filter = \"(member={{dn}})\"\n",
        ldap.url, bind_pw
    );
    let n = node_with_auth(dir.path(), "token", &section);
    add_user(&n, "admin", ADMIN_PW, &["--admin"]);
    push_image(&client_as("admin", ADMIN_PW), &n, "team/app", "v1", b"app").await;
    grant(&n, &["--group", "devs"], "team/*", "pull");
    grant(&n, &["--user", "lara"], "lara/*", "pull,push");
    let lara = client_as("lara", "lara-password-1");
    let omar = client_as("omar", "omar-password-1");
    assert_eq!(status(&lara, n.url("/v2/")).await, 200);
    assert_eq!(status(&lara, n.url("/v2/team/app/manifests/v1")).await, 200, "through the LDAP group devs");
    assert_eq!(status(&omar, n.url("/v2/")).await, 200);
    assert_eq!(status(&omar, n.url("/v2/team/app/manifests/v1")).await, 403, "omar is in ops, not devs");
    push_image(&lara, &n, "lara/tools", "v1", b"lara's").await;
    assert_eq!(lara.post(n.url("/v2/team/app/blobs/uploads/")).send().await.unwrap().status(), 403);
    for (user, pw) in [
        ("lara", "wrong-password"),
        ("lara", ""),
        ("nobody", "lara-password-1"),
        ("*", "lara-password-1"),
        ("lara)(uid=*", "lara-password-1"),
        ("*)(|(uid=*", "omar-password-1"),
    ] {
        assert_eq!(status(&client_as(user, pw), n.url("/v2/")).await, 401, "{user:?} / {pw:?}");
    }
    // the token endpoint carries the LDAP groups into the token
    let r = lara.get(n.url("/auth/token?service=raftyard&scope=repository:team/app:pull,push")).send().await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    let claims = jwt_claims(v["token"].as_str().unwrap());
    assert_eq!(claims["grp"], serde_json::json!(["devs"]));
    assert_eq!(claims["access"][0]["actions"], serde_json::json!(["pull"]));
    assert_eq!(status(&bearer(v["token"].as_str().unwrap()), n.url("/v2/team/app/manifests/v1")).await, 200);
    // docker login's identity token: a refresh looks lara up in the directory again, with her
    // groups as they are now
    let realm = n.url("/auth/token");
    let form =
        [("grant_type", "password"), ("username", "lara"), ("password", "lara-password-1"), ("access_type", "offline")];
    let v: serde_json::Value = client().post(&realm).form(&form).send().await.unwrap().json().await.unwrap();
    let refresh = v["refresh_token"].as_str().expect("a refresh token").to_string();
    let refreshed = |scope: &'static str| {
        let refresh = refresh.clone();
        let realm = realm.clone();
        async move {
            let form = [("grant_type", "refresh_token"), ("refresh_token", refresh.as_str()), ("scope", scope)];
            client().post(&realm).form(&form).send().await.unwrap()
        }
    };
    let r = refreshed("repository:team/app:pull").await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(jwt_claims(v["access_token"].as_str().unwrap())["grp"], serde_json::json!(["devs"]));
    // taken out of the group devs in the directory: the next refresh knows
    let modify = dir.path().join("modify.ldif");
    std::fs::write(&modify, "dn: cn=devs,ou=groups,dc=example,dc=org\nchangetype: modify\ndelete: member\nmember: uid=lara,ou=people,dc=example,dc=org\n-\nadd: member\nmember: uid=omar,ou=people,dc=example,dc=org\n").unwrap();
    run(Command::new("ldapmodify")
        .args(["-x", "-H", &ldap.url, "-D", "cn=admin,dc=example,dc=org", "-w", "admin-secret", "-f"])
        .arg(&modify));
    let v: serde_json::Value = refreshed("repository:team/app:pull").await.json().await.unwrap();
    let claims = jwt_claims(v["access_token"].as_str().unwrap());
    assert!(claims.get("grp").is_none() || claims["grp"] == serde_json::json!([]), "{claims}");
    assert_eq!(claims["access"][0]["actions"], serde_json::json!([]), "no pull without the group");
    // a user of the cluster named lara now shadows the directory's: the refresh token ends
    add_user(&n, "lara", "cluster-lara-password", &[]);
    assert_eq!(refreshed("repository:lara/tools:pull").await.status(), 400);
    let log = std::fs::read_to_string(&n.log).unwrap();
    assert!(!log.contains("lara-password-1") && !log.contains("admin-secret"), "a secret reached the log");
}

/// Behind the relay the client address is the visitor's (the relay tells the agent in a PROXY
/// header, the agent tells its node): a brute force through the relay locks out its own address
/// only, while another visitor of the same relay keeps pulling.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lockout_through_the_relay_hits_only_the_visitor() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("relay"), 1);
    let cl = Cluster::start_configured(1, "", |id| {
        format!("[auth]\nmode = \"basic\"\nlockout_threshold = 3\n{}", relay.link(id))
    });
    cl.leader(Duration::from_secs(20)).await;
    relay.wait_agents(1, Duration::from_secs(20)).await;
    cl.ready(Duration::from_secs(20)).await;
    let n = &cl.nodes[0];
    add_user(n, "admin", ADMIN_PW, &["--admin"]);
    let shared = relay.shared().to_string();
    let via = |from: &str, user: &str, pw: &str| {
        let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}")));
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::AUTHORIZATION, v.parse().unwrap());
        reqwest::Client::builder().local_address(Some(from.parse().unwrap())).default_headers(h).build().unwrap()
    };
    let admin = via("127.0.0.3", "admin", ADMIN_PW);
    let base = format!("http://{shared}/v2/");
    let digest = push_image(&admin, &Node::remote(&shared), "team/app", "v1", b"app").await;
    let attacker = via("127.0.0.2", "admin", "guess");
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(status(&attacker, base.clone()).await);
        let r = admin.get(format!("http://{shared}/v2/team/app/manifests/{digest}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "another visitor of the same relay keeps pulling");
    }
    assert_eq!(codes, [401, 401, 401, 401, 429, 429], "three failures tolerated, the fourth locks");
    // the node's audit lines name the visitor, not the agent's loopback connection
    let log = std::fs::read_to_string(&n.log).unwrap();
    assert!(log.contains("\"client\":\"127.0.0.2\""), "the visitor's address is not in the audit lines");
    // and a PROXY header from anyone but the node's own agent is not believed: it is a bad request
    let mut s = std::net::TcpStream::connect(&n.addr).unwrap();
    use std::io::{Read, Write};
    let fake: std::net::SocketAddr = "203.0.113.9:4444".parse().unwrap();
    let mut req = raftyard_tunnel_header(fake, n.addr.parse().unwrap());
    req.extend_from_slice(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(&req).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(!out.starts_with("HTTP/1.1 401"), "a forged PROXY header was parsed: {out}");
}

/// A PROXY v2 header, as the relay and the agent write them.
fn raftyard_tunnel_header(src: std::net::SocketAddr, dst: std::net::SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    for ip in [src.ip(), dst.ip()] {
        if let std::net::IpAddr::V4(a) = ip {
            h.extend_from_slice(&a.octets());
        }
    }
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// Tokens of an outside issuer, as Distribution accepts them: the challenge names its realm
/// and service, a token whose x5c chain ends at the bundle is accepted for what its `access`
/// claim grants, a self-made chain is not.
#[tokio::test]
async fn an_outside_token_issuer_as_distribution_configures_it() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use rcgen::{CertificateParams, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["auth.example".into()]).unwrap().signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let bundle = dir.path().join("token-ca.pem");
    std::fs::write(&bundle, ca.pem()).unwrap();
    let section = format!(
        "[auth.token]\nrealm = \"https://auth.example/token\"\nservice = \"registry.example\"\n\
         issuer = \"auth.example\"\nrootcertbundle = {bundle:?}\n"
    );
    let n = node_with_auth(dir.path(), "token", &section);
    add_user(&n, "admin", ADMIN_PW, &["--admin"]);
    push_image(&client_as("admin", ADMIN_PW), &n, "team/app", "v1", b"app").await;
    let r = client().get(n.url("/v2/team/app/manifests/v1")).send().await.unwrap();
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"https://auth.example/token\",service=\"registry.example\",scope=\"repository:team/app:pull\""
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({"iss": "auth.example", "sub": "someone", "aud": "registry.example",
        "exp": now + 300, "nbf": now - 5, "iat": now, "jti": "1",
        "access": [{"type": "repository", "name": "team/app", "actions": ["pull"]}]});
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let sign = |key: &KeyPair, chain: Vec<String>| {
        let mut h = Header::new(Algorithm::ES256);
        h.x5c = Some(chain);
        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap()).unwrap()
    };
    let good = bearer(&sign(&leaf_key, vec![b64(leaf.der()), b64(ca.der())]));
    assert_eq!(status(&good, n.url("/v2/team/app/manifests/v1")).await, 200);
    // pull only: a push asks the outside issuer for a token with push (its decision, not ours)
    let r = good.post(n.url("/v2/team/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 401, "pull only");
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("scope=\"repository:team/app:pull,push\""));
    let rogue_key = KeyPair::generate().unwrap();
    let rogue = CertificateParams::new(vec!["auth.example".into()]).unwrap().self_signed(&rogue_key).unwrap();
    assert_eq!(
        status(&bearer(&sign(&rogue_key, vec![b64(rogue.der())])), n.url("/v2/team/app/manifests/v1")).await,
        401
    );
    // the outside issuer's `sub` names nobody here: "admin" there is not the cluster's admin
    let mut as_admin = claims.clone();
    as_admin["sub"] = "admin".into();
    let mut h = Header::new(Algorithm::ES256);
    h.x5c = Some(vec![b64(leaf.der()), b64(ca.der())]);
    let t =
        jsonwebtoken::encode(&h, &as_admin, &EncodingKey::from_ec_pem(leaf_key.serialize_pem().as_bytes()).unwrap())
            .unwrap();
    assert_eq!(status(&bearer(&t), n.url("/v2/_raftyard/events")).await, 403);
    assert_eq!(status(&bearer(&t), n.url("/metrics")).await, 403);
    assert_eq!(status(&bearer(&t), n.url("/v2/team/app/manifests/v1")).await, 200, "its access claim still counts");
}

/// `registry.metrics_listen`: /metrics without credentials on a port of its own (and nothing
/// else there), while the API's /metrics keeps its door.
#[tokio::test]
async fn metrics_on_a_port_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let n = node_with_auth(dir.path(), "basic", &format!("[registry]\nmetrics_listen = \"{metrics}\"\n"));
    assert_eq!(status(&client(), n.url("/metrics")).await, 401);
    let r = client().get(format!("http://{metrics}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("raftyard_http_requests_total"));
    assert_eq!(status(&client(), format!("http://{metrics}/v2/")).await, 404);
    assert_eq!(status(&client(), format!("http://{metrics}/v2/_catalog")).await, 404);
}

/// Over HTTPS the token realm says `https`, and the whole flow works through it: challenge,
/// token with Basic credentials, bearer request.
#[tokio::test]
async fn token_flow_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    cli(&["certs", "self-signed", "--host", "registry.test", "--out", certs.to_str().unwrap()]);
    let section = format!("[registry.tls]\ncert = {:?}\nkey = {:?}\n", certs.join("cert.pem"), certs.join("key.pem"));
    let n = node_with_auth(dir.path(), "token", &section);
    add_user(&n, "alice", ALICE_PW, &[]);
    grant(&n, &["--user", "alice"], "team/**", "pull,push");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.join("ca.pem")).unwrap()).unwrap();
    let https = |auth: Option<String>| {
        let mut h = reqwest::header::HeaderMap::new();
        if let Some(a) = auth {
            h.insert(reqwest::header::AUTHORIZATION, a.parse().unwrap());
        }
        reqwest::Client::builder().add_root_certificate(ca.clone()).default_headers(h).build().unwrap()
    };
    let base = format!("https://{}", n.addr);
    let r = https(None).get(format!("{base}/v2/team/app/tags/list")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    let realm = format!("https://{}/auth/token", n.addr);
    assert!(challenge.starts_with(&format!("Bearer realm=\"{realm}\"")), "{challenge}");
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("alice:{ALICE_PW}")));
    let v: serde_json::Value = https(Some(basic))
        .get(format!("{realm}?service=raftyard&scope=repository:team/app:pull,push"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let with = https(Some(format!("Bearer {}", v["token"].as_str().unwrap())));
    let r = with.post(format!("{base}/v2/team/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202, "a bearer token obtained over HTTPS opens an upload");
}
