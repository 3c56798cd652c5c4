//! The store suite: the same scenarios against SQLite and PostgreSQL.

use verge_control::store::{
    Backend, NewInstance, NewNode, NewRollout, ReleaseRow, Revoke, Store, StoreError, TokenRow,
};

fn expect_revoked(r: Revoke) -> TokenRow {
    match r {
        Revoke::Revoked(row) => row,
        other => panic!("expected Revoked, got {other:?}"),
    }
}

/// Runs each scenario once per backend, as `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { let (s, url, _dir) = super::open(super::Backend::Sqlite).await; super::$name(s, url).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { let (s, url, _dir) = super::open(super::Backend::Postgres).await; super::$name(s, url).await } )*
        }
    };
}

on_both_backends!(
    migrations_are_idempotent,
    orgs_are_unique_and_sorted,
    rows_below_an_org_stay_in_it,
    tokens_are_found_by_hash_until_revoked,
    claim_once_has_one_winner_among_racers,
    the_last_admin_token_is_never_revoked,
    bootstrap_has_one_winner_and_makes_the_token_with_the_claim,
    node_reservations_follow_placements_and_stops,
    a_new_rollout_supersedes_the_active_one,
);

async fn open(backend: Backend) -> (Store, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("verge.db").display()),
        Backend::Postgres => verge_tests::postgres::fresh_database().await,
    };
    let store = Store::open(&url).await.expect("open store");
    assert_eq!(store.backend(), backend);
    (store, url, dir)
}

async fn migrations_are_idempotent(store: Store, url: String) {
    store.create_org("acme").await.unwrap();
    // A second open runs the migrator again: a no-op that keeps the data.
    let again = Store::open(&url).await.expect("reopen");
    assert_eq!(again.list_orgs().await.unwrap()[0].name, "acme");
    again.ping().await.unwrap();
}

async fn orgs_are_unique_and_sorted(store: Store, _url: String) {
    for name in ["zeta", "acme", "mid"] {
        store.create_org(name).await.unwrap();
    }
    assert!(matches!(
        store.create_org("acme").await,
        Err(StoreError::Conflict)
    ));
    let names: Vec<_> = store
        .list_orgs()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(names, ["acme", "mid", "zeta"]);
    let acme = store.org_by_name("acme").await.unwrap().unwrap();
    assert!(acme.id.starts_with("org_"));
    assert_eq!(store.org_by_id(&acme.id).await.unwrap().unwrap(), acme);
    assert!(store.org_by_name("nope").await.unwrap().is_none());
}

async fn rows_below_an_org_stay_in_it(store: Store, _url: String) {
    let a = store.create_org("a").await.unwrap();
    let b = store.create_org("b").await.unwrap();
    let pa = store.create_project(&a.id, "web").await.unwrap();
    // The same names are fine in another org.
    let pb = store.create_project(&b.id, "web").await.unwrap();
    assert!(matches!(
        store.create_project(&a.id, "web").await,
        Err(StoreError::Conflict)
    ));
    let app = store.create_app(&a.id, &pa, "shop").await.unwrap();
    store.create_app(&b.id, &pb, "shop").await.unwrap();
    assert!(matches!(
        store.create_app(&a.id, &pa, "shop").await,
        Err(StoreError::Conflict)
    ));
    let other = store.create_project(&a.id, "other").await.unwrap();
    store.create_app(&a.id, &other, "admin").await.unwrap();

    assert_eq!(store.list_projects(&a.id).await.unwrap().len(), 2);
    let apps_a: Vec<_> = store
        .list_apps(&a.id, None)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name, a.project))
        .collect();
    assert_eq!(
        apps_a,
        [
            ("admin".to_string(), "other".to_string()),
            ("shop".into(), "web".into())
        ]
    );
    let in_web: Vec<_> = store
        .list_apps(&a.id, Some(&pa.id))
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(in_web, ["shop"]);
    // A project of org b filters org a's apps to nothing: isolation is in SQL.
    assert!(
        store
            .list_apps(&a.id, Some(&pb.id))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.app_by_name(&b.id, "admin").await.unwrap().is_none());

    store.create_env(&app, "prod").await.unwrap();
    store.create_env(&app, "dev").await.unwrap();
    assert!(matches!(
        store.create_env(&app, "prod").await,
        Err(StoreError::Conflict)
    ));
    let envs: Vec<_> = store
        .list_envs(&app.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(envs, ["dev", "prod"]);
}

async fn tokens_are_found_by_hash_until_revoked(store: Store, _url: String) {
    let org = store.create_org("acme").await.unwrap();
    let admin = store
        .create_token(None, "admin", "hash-admin")
        .await
        .unwrap();
    assert_eq!(
        (admin.org_id.as_deref(), admin.org.as_deref()),
        (None, None)
    );
    let t = store
        .create_token(Some(&org.id), "ci", "hash-ci")
        .await
        .unwrap();
    assert_eq!(t.org.as_deref(), Some("acme"));
    assert!(matches!(
        store.create_token(None, "dup", "hash-ci").await,
        Err(StoreError::Conflict)
    ));

    assert_eq!(
        store
            .active_token_by_hash("hash-ci")
            .await
            .unwrap()
            .unwrap()
            .id,
        t.id
    );
    assert!(
        store
            .active_token_by_hash("hash-other")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.list_tokens(Some(&org.id)).await.unwrap().len(), 1);
    assert_eq!(store.list_tokens(None).await.unwrap().len(), 2);

    let revoked = expect_revoked(store.revoke_token(&t.id).await.unwrap());
    assert!(revoked.revoked_at.is_some());
    assert!(
        store
            .active_token_by_hash("hash-ci")
            .await
            .unwrap()
            .is_none()
    );
    // Revoking again keeps the first revocation time.
    let again = expect_revoked(store.revoke_token(&t.id).await.unwrap());
    assert_eq!(again.revoked_at, revoked.revoked_at);
    assert!(matches!(
        store.revoke_token("tok_missing").await.unwrap(),
        Revoke::NotFound
    ));
}

async fn claim_once_has_one_winner_among_racers(store: Store, _url: String) {
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move { s.claim_once("bootstrap", &i.to_string()).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for r in racers {
        winners += r.await.unwrap() as usize;
    }
    assert_eq!(winners, 1);
    assert!(!store.claim_once("bootstrap", "late").await.unwrap());
    assert!(store.claim_once("another", "x").await.unwrap());
}

#[tokio::test]
async fn sqlite_uses_wal_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("verge.db").display());
    let store = Store::open(&url).await.unwrap();
    store.create_org("acme").await.unwrap();
    assert!(
        dir.path().join("verge.db-wal").exists(),
        "no WAL file next to the database"
    );
    store.close().await;
    let reopened = Store::open(&url).await.unwrap();
    assert_eq!(reopened.list_orgs().await.unwrap()[0].name, "acme");
}

#[tokio::test]
async fn unsupported_and_unreachable_databases_are_named() {
    let err = Store::open("mysql://x/y").await.unwrap_err().to_string();
    assert!(
        err.contains("unsupported database URL \"mysql://x/y\""),
        "{err}"
    );
    let err = Store::open("postgres://verge:secret@127.0.0.1:1/verge")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cannot open database postgres://verge:***@127.0.0.1:1/verge"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
}

async fn the_last_admin_token_is_never_revoked(store: Store, _url: String) {
    let a = store.create_token(None, "a", "hash-a").await.unwrap();
    let b = store.create_token(None, "b", "hash-b").await.unwrap();
    // Two racing revocations of the only two admin tokens: one must lose.
    let (ra, rb) = tokio::join!(store.revoke_token(&a.id), store.revoke_token(&b.id));
    let outcomes = [ra.unwrap(), rb.unwrap()];
    let refused = outcomes
        .iter()
        .filter(|r| matches!(r, Revoke::LastAdmin(_)))
        .count();
    assert_eq!(refused, 1, "{outcomes:?}");
    assert_eq!(store.active_admin_tokens().await.unwrap(), 1);
    // Org tokens are never held back by this rule.
    let org = store.create_org("acme").await.unwrap();
    let t = store
        .create_token(Some(&org.id), "ci", "hash-ci")
        .await
        .unwrap();
    expect_revoked(store.revoke_token(&t.id).await.unwrap());
}

async fn bootstrap_has_one_winner_and_makes_the_token_with_the_claim(store: Store, _url: String) {
    let racers: Vec<_> = (0..6)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move {
                s.bootstrap_admin_token("admin", &format!("hash-{i}"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for r in racers {
        winners += r.await.unwrap() as usize;
    }
    assert_eq!(winners, 1);
    assert_eq!(store.active_admin_tokens().await.unwrap(), 1);
    assert!(
        !store
            .bootstrap_admin_token("admin", "hash-late")
            .await
            .unwrap()
    );
    assert_eq!(store.active_admin_tokens().await.unwrap(), 1);
}

/// An env with one release, for instance and rollout rows: `(env id, release id)`.
async fn env_with_release(store: &Store) -> (String, String) {
    let org = store.create_org("acme").await.unwrap();
    let project = store.create_project(&org.id, "p").await.unwrap();
    let app = store.create_app(&org.id, &project, "hello").await.unwrap();
    let env = store.create_env(&app, "prod").await.unwrap();
    let release = ReleaseRow {
        id: "rel_1".into(),
        env_id: env.id.clone(),
        number: 1,
        manifest: "{}".into(),
        images: "{}".into(),
        config_version: 0,
        secrets: "{}".into(),
        fingerprint: "f".into(),
        parent_id: None,
        created_at: 0,
        created_by: "test".into(),
    };
    let mut tx = store.mutation().await.unwrap();
    tx.insert_release(&release).await.unwrap();
    tx.commit().await.unwrap();
    (env.id, release.id)
}

/// `nodes.used_*` is kept in step with every placement, stop and delete,
/// and equals what the instances with goal `run` add up to.
async fn node_reservations_follow_placements_and_stops(store: Store, _url: String) {
    let (env, release) = env_with_release(&store).await;
    let mut tx = store.mutation().await.unwrap();
    for (id, name) in [("n_a", "a"), ("n_b", "b")] {
        let node = NewNode {
            id,
            name,
            labels: "{}",
            cpu_millis: 4000,
            memory: 1 << 30,
            isolation: "namespaces",
            version: "test",
            cert_sha256: id,
            join_token_id: "jt",
        };
        tx.insert_node(&node, |i| Some(format!("fd00:{i}::/64")))
            .await
            .unwrap()
            .unwrap();
    }
    let new = |slot, node| NewInstance {
        env_id: &env,
        release_id: &release,
        workload: "web",
        slot,
        node_id: node,
        cpu_millis: 250,
        memory: 64 << 20,
        message: None,
    };
    let placed = tx.insert_instance(&new(0, Some("n_a"))).await.unwrap();
    let pending = tx.insert_instance(&new(1, None)).await.unwrap();
    let other = tx.insert_instance(&new(2, Some("n_a"))).await.unwrap();
    tx.place_instance(&pending, Some("n_b"), None)
        .await
        .unwrap();
    tx.stop_instance(&other).await.unwrap();
    // Stopping twice, or deleting a stopped one, gives nothing back twice.
    tx.stop_instance(&other).await.unwrap();
    tx.delete_instance(&other).await.unwrap();
    tx.commit().await.unwrap();
    let used = |store: Store| async move {
        store
            .nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| (n.name, n.used_cpu_millis, n.used_memory))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        used(store.clone()).await,
        [("a".into(), 250, 64 << 20), ("b".into(), 250, 64 << 20)]
    );
    let mut tx = store.mutation().await.unwrap();
    tx.stop_instance(&placed).await.unwrap();
    tx.delete_instance(&pending).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        used(store.clone()).await,
        [("a".into(), 0, 0), ("b".into(), 0, 0)]
    );
}

async fn a_new_rollout_supersedes_the_active_one(store: Store, _url: String) {
    let (env, release) = env_with_release(&store).await;
    let new = NewRollout {
        env_id: &env,
        release_id: &release,
        from_release_id: None,
        kind: "deploy",
        deadline_ms: 1000,
        created_by: Some("test"),
    };
    let mut tx = store.mutation().await.unwrap();
    let (first, none) = tx.start_rollout(&new, "v1 (deploy)").await.unwrap();
    assert!(none.is_none());
    let (second, superseded) = tx.start_rollout(&new, "v2 (deploy)").await.unwrap();
    tx.commit().await.unwrap();
    let superseded = superseded.expect("the first was active");
    assert_eq!(superseded.id, first);
    assert_eq!(superseded.state, "canceled");
    assert_eq!(
        superseded.reason.as_deref(),
        Some("superseded by v2 (deploy)")
    );
    let rows = store.rollouts(&env, 10).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        store.latest_rollout(&env).await.unwrap().unwrap().id,
        second
    );
    assert_eq!(
        rows.iter().find(|r| r.id == first).unwrap().state,
        "canceled"
    );
}
