//! Processes starting together on an empty catalogue (the API and the process manager at a
//! deployment) each see the whole seeded catalogue: the load generator once caught a process
//! manager that found the table half seeded by the API and could not deliver an order until
//! its next refresh.

use backbone_tests::TestEnv;
use commands::CatalogueStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_starting_together_each_see_the_whole_seeded_catalogue() {
    let env = TestEnv::start("catalogue_seed").await;
    let seed = TestEnv::catalogue();
    let expected = seed.regions.len()
        + seed.items.len()
        + seed.stores.len()
        + seed.promotions.len()
        + seed.experiments.len();
    assert!(expected > 10, "the built-in catalogue has entries to seed");
    let loads = (0..16).map(|_| {
        let (pool, seed) = (env.pool().clone(), seed.clone());
        tokio::spawn(async move { CatalogueStore::load(pool, &seed).await })
    });
    for (n, load) in futures::future::join_all(loads)
        .await
        .into_iter()
        .enumerate()
    {
        let store = load.expect("task").expect("the catalogue loads");
        let seen = store.current();
        assert_eq!(
            (
                seen.regions.len(),
                seen.items.len(),
                seen.stores.len(),
                seen.promotions.len(),
                seen.experiments.len()
            ),
            (
                seed.regions.len(),
                seed.items.len(),
                seed.stores.len(),
                seed.promotions.len(),
                seed.experiments.len()
            ),
            "loader {n} saw a partly seeded catalogue"
        );
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM catalogue_entries")
        .fetch_one(env.pool())
        .await
        .expect("count");
    assert_eq!(
        rows,
        i64::try_from(expected).expect("small"),
        "seeded once, whole"
    );
    env.stop().await;
}
