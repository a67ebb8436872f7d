//! The API fuzzed from its own OpenAPI document with Schemathesis (PyPI, installed into `.venv`
//! by the test command): every operation, with an administrator's token, valid and invalid data
//! (examples, boundary coverage and random fuzzing). The run must see no 5xx answer and no answer
//! the document does not describe (status, content type, body schema).
//!
//! The two Server-Sent-Events streams are left out: they never end, so a request/response fuzzer
//! cannot judge them (`read_models.rs` and `notifications.rs` test them as clients read them).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use backbone_tests::{token, Role, TestEnv};
use uuid::Uuid;

/// Test cases per operation and phase (`FUZZ_MAX_EXAMPLES`, default 50).
fn max_examples() -> String {
    std::env::var("FUZZ_MAX_EXAMPLES").unwrap_or_else(|_| "50".to_owned())
}

/// The seed (`FUZZ_SEED`; fixed by default, so CI runs repeat; set another to explore).
fn seed() -> String {
    std::env::var("FUZZ_SEED").unwrap_or_else(|_| "20261202".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzing_every_endpoint_from_the_openapi_document_finds_no_server_error_and_no_undocumented_answer(
) {
    let python = std::env::var("BACKBONE_PYTHON")
        .expect("BACKBONE_PYTHON names the .venv python with schemathesis (scripts/test sets it)");
    let schemathesis = std::path::Path::new(&python).with_file_name("schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: run scripts/test, which installs schemas/tests/python/requirements.txt",
        schemathesis.display()
    );
    let env = TestEnv::start("fuzz").await;
    let (api, server) = env.start_api().await;
    let bearer = format!(
        "Authorization: Bearer {}",
        token(Role::Admin, Uuid::new_v4())
    );
    let report = std::env::temp_dir().join(format!("schemathesis-{}", Uuid::new_v4()));
    let junit = report.join("junit.xml");
    let events = report.join("events.ndjson");
    let output = tokio::task::spawn_blocking({
        let api = api.clone();
        let report = report.clone();
        let junit = junit.clone();
        let events = events.clone();
        move || {
            Command::new(schemathesis)
                .args([
                    "run",
                    &format!("{api}/openapi.json"),
                    "--header",
                    &bearer,
                    "--checks",
                    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                    "--phases",
                    "examples,coverage,fuzzing",
                    "--exclude-path-regex",
                    "/stream$",
                    "--max-examples",
                    &max_examples(),
                    "--seed",
                    &seed(),
                    "--request-timeout",
                    "15",
                    // One worker: with several threads, CPython 3.11's `ast.parse` (used by
                    // Hypothesis to describe strategies) can fail with "AST constructor recursion
                    // depth mismatch", an error of the tool, not of the API.
                    "--workers",
                    "1",
                    "--no-color",
                    "--report-dir",
                    &report.display().to_string(),
                    "--report",
                    "junit,ndjson",
                    "--report-junit-path",
                    &junit.display().to_string(),
                    "--report-ndjson-path",
                    &events.display().to_string(),
                ])
                .env("SCHEMATHESIS_HOOKS", "")
                .current_dir(std::env::temp_dir())
                .output()
                .expect("schemathesis runs")
        }
    })
    .await
    .expect("fuzzer task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found problems ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // What it did, from its own event log (one `ScenarioFinished` per test scenario, with the
    // operation, every request and response, and every check's verdict): every documented
    // operation exercised (the event streams left out; Schemathesis leaves out the document it
    // reads), how many requests, and per check how many passed and none failed.
    let doc: serde_json::Value = backbone_tests::client()
        .get(format!("{api}/openapi.json"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let documented: BTreeSet<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .filter(|(path, _)| !path.ends_with("/stream") && *path != "/openapi.json")
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|o| o.keys())
                .filter(|key| ["get", "put", "post", "delete", "patch"].contains(&key.as_str()))
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect();
    let log = std::fs::read_to_string(&events).expect("schemathesis wrote its event log");
    let mut requests: BTreeMap<String, usize> = BTreeMap::new();
    let mut checks: BTreeMap<(String, String), usize> = BTreeMap::new();
    for line in log.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("an NDJSON event");
        let Some(recorder) = event.get("ScenarioFinished").map(|e| &e["recorder"]) else {
            continue;
        };
        let operation = recorder["label"].as_str().expect("a label").to_owned();
        *requests.entry(operation).or_default() += recorder["interactions"]
            .as_object()
            .expect("interactions")
            .len();
        for verdicts in recorder["checks"].as_object().expect("checks").values() {
            for verdict in verdicts.as_array().expect("verdicts") {
                let name = verdict["name"].as_str().expect("a check").to_owned();
                let status = verdict["status"].as_str().expect("a status").to_owned();
                *checks.entry((name, status)).or_default() += 1;
            }
        }
    }
    let exercised: BTreeSet<String> = requests
        .iter()
        .filter(|(_, sent)| **sent > 0)
        .map(|(operation, _)| operation.clone())
        .collect();
    assert_eq!(
        exercised, documented,
        "every operation exercised, and no other"
    );
    let total: usize = requests.values().sum();
    eprintln!(
        "schemathesis sent {total} requests over {} operations; checks: {checks:?}",
        exercised.len()
    );
    // At least what the minimum of one example per phase sends (about 2,800 requests; 50, the
    // default, about 4,700): a run that skipped its phases would send far fewer.
    assert!(total >= 2_000, "{total} requests: {requests:?}");
    for check in [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ] {
        let passed = checks
            .get(&(check.to_owned(), "success".to_owned()))
            .copied()
            .unwrap_or(0);
        assert!(
            passed >= total / 2,
            "{check} ran on {passed} of {total} responses"
        );
    }
    let failed: Vec<_> = checks
        .iter()
        .filter(|((_, status), _)| status != "success")
        .collect();
    assert!(failed.is_empty(), "checks that did not pass: {failed:?}");
    // Its JUnit report agrees: a test case per operation, none failed or errored.
    let xml = std::fs::read_to_string(&junit).expect("schemathesis wrote its JUnit report");
    assert_eq!(
        xml.matches("<testcase").count(),
        documented.len(),
        "one test case per operation:\n{xml}"
    );
    assert_eq!(
        (
            xml.matches("<failure").count(),
            xml.matches("<error").count()
        ),
        (0, 0),
        "{xml}"
    );
    let _ = std::fs::remove_dir_all(&report);

    server.stop().await.expect("api stops");
    env.stop().await;
}
