//! The chaos run in short (the full one is `scripts/bench --bench chaos`): whole orders under a
//! small load while each backbone process (API, relay, projector, process manager, registry) is
//! SIGKILLed and restarted at moments drawn from a seed; then nothing lost, nothing doubled,
//! every read model equal to its rebuild, the hash chain intact, and no client met a 5xx but
//! 503. The shared test broker and PostgreSQL are left alone (other tests use them).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backbone_tests::chaos::{self, Fault};
use backbone_tests::lifecycle::{closed_loop, Ctx};
use backbone_tests::load::{catalogue_with_stores, Backbone, COMPONENTS};
use uuid::Uuid;

/// Long enough for each of the five kills to land under load and be recovered from.
const WINDOW: Duration = Duration::from_secs(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_each_backbone_process_under_load_loses_no_order_and_doubles_no_effect() {
    backbone_tests::init_logs();
    let seed = chaos::seed();
    let required: Vec<Fault> = COMPONENTS.into_iter().map(Fault::Kill).collect();
    let plan = chaos::plan(seed, WINDOW, &required, 0);
    let catalogue = std::env::temp_dir().join(format!("chaos-test-{}.json", Uuid::new_v4()));
    let stores = catalogue_with_stores(&catalogue, 4);
    let mut backbone = Backbone::start(&catalogue, &[]).await;
    let ctx = Arc::new(Ctx::new(
        backbone.api.clone(),
        &stores,
        2,
        Duration::from_millis(50),
        true,
    ));

    let started = Instant::now();
    let mut load = closed_loop(&ctx, 4);
    let run = chaos::inject(&mut backbone, &plan, None, started, WINDOW).await;
    ctx.stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let settled = chaos::settle(&backbone, Duration::from_secs(120)).await;
    let placed = ctx.placed.lock().expect("placed").clone();
    let findings = chaos::check(&backbone, &placed).await;
    let server_errors = ctx.server_errors.lock().expect("server errors").clone();
    backbone.stop().await;
    let _ = std::fs::remove_file(&catalogue);

    let context = format!("seed {seed} (CHAOS_SEED repeats it); {findings}");
    for fault in &required {
        assert!(
            run.injected.iter().any(|i| i.fault == fault.to_string()),
            "{fault} was injected; {context}"
        );
    }
    assert!(!placed.is_empty(), "orders were placed; {context}");
    assert!(
        findings.completed > 0,
        "orders completed through the faults; {context}"
    );
    settled.unwrap_or_else(|e| panic!("the backbone settles: {e}; {context}"));
    assert_eq!(
        server_errors,
        Vec::<String>::new(),
        "no 5xx but 503; {context}"
    );
    assert_eq!(findings.violations(), Vec::<String>::new(), "{context}");
    assert_eq!((findings.lost(), findings.doubled()), (0, 0), "{context}");
}
