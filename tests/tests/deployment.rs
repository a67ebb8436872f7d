//! The deployment files (`deploy/`) checked with tools nobody here wrote, and against the
//! running binaries:
//! - the kustomize renders of `deploy/k8s/base` and `overlays/production` validate against the
//!   Kubernetes schemas of a pinned version (kubernetes-validate, strict); KEDA's ScaledObject,
//!   a CRD it has no schema for, is skipped there by kind and checked here instead: its target,
//!   its bounds and its consumer groups, which must be the groups the projector really joins;
//! - checkov finds nothing in the Dockerfile and the renders (skips only in
//!   `deploy/tools/checkov.yaml`, each with its reason);
//! - the Dockerfile copies only what exists and builds exactly the workspace's binaries; the
//!   compose file builds its targets; every variable the files set is one the code reads;
//! - every metric the alert rules and the dashboard name is exported by a running process;
//! - `replay-tools migrate` (the migration job) migrates a fresh database, twice over.
//!
//! Tools: `scripts/test` installs them (`ensure_deploy_tools` in `scripts/lib.sh`) and passes
//! `DEPLOY_TOOLS_BIN` and `KUSTOMIZE`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use backbone_tests::deploy::{
    deploy_tool, exposed_series, kustomize_build, metric_names, repo, run, template_metric_names,
    yaml_documents, yaml_file,
};
use backbone_tests::load::free_port;
use backbone_tests::{
    client_as, eventually, order_request, place_request, Role, TestEnv, TEST_JWT_SECRET,
    TEST_WEBHOOK_SECRET,
};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use uuid::Uuid;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.34.0";
/// The renders checked.
const RENDERS: &[&str] = &["deploy/k8s/base", "deploy/k8s/overlays/production"];
/// The one kind kubernetes-validate has no schema for, checked by [`check_scaled_objects`].
const KEDA_SCALED_OBJECT: (&str, &str) = ("keda.sh/v1alpha1", "ScaledObject");

/// A scratch directory of this test binary's run.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("backbone-deployment-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn kind_of(doc: &Value) -> (String, String, String) {
    (
        doc["apiVersion"].as_str().unwrap_or_default().to_owned(),
        doc["kind"].as_str().unwrap_or_default().to_owned(),
        doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[test]
fn the_rendered_manifests_validate_against_the_kubernetes_schemas() {
    let dir = scratch("validate");
    let mut problems = Vec::new();
    for render in RENDERS {
        let yaml = kustomize_build(render);
        let docs = yaml_documents(&yaml, render);
        let file = dir.join(format!("{}.yaml", render.replace('/', "_")));
        std::fs::write(&file, &yaml).expect("render written");
        let output = run(
            Command::new(deploy_tool("kubernetes-validate"))
                .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
                .arg(&file),
            "kubernetes-validate",
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let keda_skip = format!(
            "Couldn't find schema for kind {} with api version {}",
            KEDA_SCALED_OBJECT.1, KEDA_SCALED_OBJECT.0
        );
        for line in text.lines() {
            let skipped_crd = line.starts_with("WARN") && line.contains(&keda_skip);
            if (line.starts_with("ERROR") || line.starts_with("WARN")) && !skipped_crd {
                problems.push(format!("{render}: {line}"));
            }
        }
        if !output.status.success() && problems.is_empty() {
            problems.push(format!("{render}: kubernetes-validate failed:\n{text}"));
        }
        // Every object but the ScaledObjects passed (no object silently left out).
        let expected = docs
            .iter()
            .filter(|d| {
                let (api, kind, _) = kind_of(d);
                (api.as_str(), kind.as_str()) != KEDA_SCALED_OBJECT
            })
            .count();
        let passed = text
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        if passed != expected {
            problems.push(format!(
                "{render}: kubernetes-validate passed {passed} objects of the {expected} it has schemas for:\n{text}"
            ));
        }
        problems.extend(check_scaled_objects(render, &docs));
    }
    assert!(
        problems.is_empty(),
        "the manifests do not validate against Kubernetes {KUBERNETES_VERSION}:\n{}",
        problems.join("\n")
    );
}

/// The ScaledObjects of a render, checked against what KEDA's kafka scaler takes and what the
/// projector does: a Deployment of the render as target; min ≤ max ≤ the topics' partitions;
/// one kafka trigger per read model the target runs, on the consumer group the projector joins
/// (`<PROJECTOR_GROUP_PREFIX><read model>`), the ConfigMap's brokers, and the projector's
/// `auto.offset.reset` (earliest).
fn check_scaled_objects(render: &str, docs: &[Value]) -> Vec<String> {
    const SPEC_FIELDS: &[&str] = &[
        "scaleTargetRef",
        "pollingInterval",
        "cooldownPeriod",
        "initialCooldownPeriod",
        "idleReplicaCount",
        "minReplicaCount",
        "maxReplicaCount",
        "fallback",
        "advanced",
        "triggers",
    ];
    const KAFKA_FIELDS: &[&str] = &[
        "bootstrapServers",
        "consumerGroup",
        "topic",
        "lagThreshold",
        "activationLagThreshold",
        "offsetResetPolicy",
        "allowIdleConsumers",
        "scaleToZeroOnInvalidOffset",
        "excludePersistentLag",
        "limitToPartitionsWithLag",
        "version",
    ];
    let mut problems = Vec::new();
    let config = docs
        .iter()
        .find(|d| kind_of(d).1 == "ConfigMap" && kind_of(d).2 == "backbone-config")
        .map(|d| d["data"].clone())
        .unwrap_or_default();
    let setting = |key: &str| config[key].as_str().unwrap_or_default().to_owned();
    let partitions: i64 = setting("KAFKA_PARTITIONS").parse().unwrap_or(6);
    let prefix = config["PROJECTOR_GROUP_PREFIX"]
        .as_str()
        .map_or_else(|| "backbone-".to_owned(), str::to_owned);
    let scaled: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            let (api, kind, _) = kind_of(d);
            (api.as_str(), kind.as_str()) == KEDA_SCALED_OBJECT
        })
        .collect();
    if scaled.is_empty() {
        problems.push(format!("{render}: no ScaledObject scales the projector"));
    }
    for object in scaled {
        let name = kind_of(object).2;
        let at = format!("{render}: ScaledObject {name}");
        let spec = &object["spec"];
        for field in spec
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_else(Vec::new)
        {
            if !SPEC_FIELDS.contains(&field.as_str()) {
                problems.push(format!("{at}: spec.{field} is not a ScaledObject field"));
            }
        }
        let target = spec["scaleTargetRef"]["name"].as_str().unwrap_or_default();
        let Some(deployment) = docs
            .iter()
            .find(|d| kind_of(d).1 == "Deployment" && kind_of(d).2 == target)
        else {
            problems.push(format!(
                "{at}: its target `{target}` is no Deployment of the render"
            ));
            continue;
        };
        let (min, max) = (
            spec["minReplicaCount"].as_i64().unwrap_or(0),
            spec["maxReplicaCount"].as_i64().unwrap_or(100),
        );
        if !(min >= 1 && min <= max && max <= partitions) {
            problems.push(format!(
                "{at}: replicas {min}..{max} must be within 1..KAFKA_PARTITIONS ({partitions})"
            ));
        }
        // The read models the target runs: PROJECTIONS, or every one.
        let projections = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .and_then(|env| env.iter().find(|e| e["name"] == "PROJECTIONS"))
            .and_then(|e| e["value"].as_str())
            .map_or_else(
                || {
                    projections::read_models::names()
                        .into_iter()
                        .map(str::to_owned)
                        .collect()
                },
                |list| {
                    list.split(',')
                        .map(|n| n.trim().to_owned())
                        .collect::<Vec<_>>()
                },
            );
        let wanted: BTreeSet<String> = projections.iter().map(|p| format!("{prefix}{p}")).collect();
        let mut groups = BTreeSet::new();
        for (i, trigger) in spec["triggers"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("{at} trigger {i}");
            if trigger["type"] != "kafka" {
                problems.push(format!("{at}: type {} is not kafka", trigger["type"]));
            }
            let metadata = &trigger["metadata"];
            for field in metadata
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_else(Vec::new)
            {
                if !KAFKA_FIELDS.contains(&field.as_str()) {
                    problems.push(format!(
                        "{at}: metadata.{field} is not a kafka scaler setting"
                    ));
                }
            }
            if metadata["bootstrapServers"].as_str()
                != Some(setting("KAFKA_BOOTSTRAP_SERVERS").as_str())
            {
                problems.push(format!(
                    "{at}: bootstrapServers {} is not the ConfigMap's KAFKA_BOOTSTRAP_SERVERS {}",
                    metadata["bootstrapServers"],
                    setting("KAFKA_BOOTSTRAP_SERVERS")
                ));
            }
            let threshold = metadata["lagThreshold"]
                .as_str()
                .and_then(|t| t.parse::<u64>().ok());
            if threshold.unwrap_or(0) == 0 {
                problems.push(format!(
                    "{at}: lagThreshold must be a positive integer string"
                ));
            }
            if metadata["offsetResetPolicy"] != "earliest" {
                problems.push(format!(
                    "{at}: offsetResetPolicy must be earliest, the projector's auto.offset.reset"
                ));
            }
            groups.insert(
                metadata["consumerGroup"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        for missing in wanted.difference(&groups) {
            problems.push(format!(
                "{at}: no trigger on consumer group {missing}, which {target} joins"
            ));
        }
        for unknown in groups.difference(&wanted) {
            problems.push(format!(
                "{at}: consumer group {unknown} is no group {target} joins (it joins {wanted:?})"
            ));
        }
    }
    problems
}

/// Every workload of both renders: non-root, read-only root, no privilege escalation, no
/// capabilities, the runtime's seccomp profile, requests and limits; every Deployment with
/// liveness and readiness probes on a port it declares, which is the port its binary is told to
/// listen on (API_LISTEN, METRICS_LISTEN, REGISTRY_LISTEN).
#[test]
fn every_workload_runs_locked_down_with_probes_on_the_port_it_listens_on() {
    let mut problems = Vec::new();
    for render in RENDERS {
        for doc in yaml_documents(&kustomize_build(render), render) {
            let (_, kind, name) = kind_of(&doc);
            if kind != "Deployment" && kind != "Job" {
                continue;
            }
            let at = format!("{render}: {kind} {name}");
            let pod = &doc["spec"]["template"]["spec"];
            let pod_security = &pod["securityContext"];
            if pod_security["runAsNonRoot"] != true {
                problems.push(format!("{at}: securityContext.runAsNonRoot is not true"));
            }
            if pod_security["seccompProfile"]["type"] != "RuntimeDefault" {
                problems.push(format!(
                    "{at}: securityContext.seccompProfile.type is not RuntimeDefault"
                ));
            }
            if pod["automountServiceAccountToken"] != false {
                problems.push(format!("{at}: automountServiceAccountToken is not false"));
            }
            for container in pod["containers"].as_array().into_iter().flatten() {
                let at = format!(
                    "{at} container {}",
                    container["name"].as_str().unwrap_or("?")
                );
                let security = &container["securityContext"];
                for (field, want) in [
                    ("runAsNonRoot", Value::Bool(true)),
                    ("readOnlyRootFilesystem", Value::Bool(true)),
                    ("allowPrivilegeEscalation", Value::Bool(false)),
                ] {
                    if security[field] != want {
                        problems.push(format!("{at}: securityContext.{field} is not {want}"));
                    }
                }
                if !security["capabilities"]["drop"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|c| c == "ALL"))
                {
                    problems.push(format!("{at}: securityContext.capabilities.drop lacks ALL"));
                }
                for bound in ["requests", "limits"] {
                    for resource in ["cpu", "memory"] {
                        if container["resources"][bound][resource].is_null() {
                            problems.push(format!("{at}: no resources.{bound}.{resource}"));
                        }
                    }
                }
                if kind != "Deployment" {
                    continue;
                }
                let ports: BTreeMap<String, i64> = container["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap_or_default().to_owned(),
                            p["containerPort"].as_i64().unwrap_or(0),
                        )
                    })
                    .collect();
                let listen = container["env"].as_array().into_iter().flatten().find(|e| {
                    ["API_LISTEN", "METRICS_LISTEN", "REGISTRY_LISTEN"]
                        .contains(&e["name"].as_str().unwrap_or_default())
                });
                let listen_port = listen
                    .and_then(|e| e["value"].as_str())
                    .and_then(|v| v.rsplit_once(':'))
                    .and_then(|(_, port)| port.parse::<i64>().ok());
                for probe in ["livenessProbe", "readinessProbe"] {
                    let probe = &container[probe];
                    let port = &probe["httpGet"]["port"];
                    let port = if port.is_null() {
                        &probe["tcpSocket"]["port"]
                    } else {
                        port
                    };
                    let number = port
                        .as_i64()
                        .or_else(|| ports.get(port.as_str().unwrap_or_default()).copied());
                    if number.is_none() || number != listen_port {
                        problems.push(format!(
                            "{at}: its {probe} port {port} is not the port it listens on ({listen:?}, ports {ports:?})"
                        ));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "workloads that are not locked down or not probed:\n{}",
        problems.join("\n")
    );
}

/// The components a NetworkPolicy's podSelector selects.
fn selected(policy: &Value, components: &[&str]) -> BTreeSet<String> {
    let selector = &policy["spec"]["podSelector"];
    let mut chosen: BTreeSet<String> = components.iter().map(|c| (*c).to_owned()).collect();
    if let Some(name) = selector["matchLabels"]["app.kubernetes.io/name"].as_str() {
        chosen.retain(|c| c == name);
    }
    for expression in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if expression["key"] == "app.kubernetes.io/name" && expression["operator"] == "In" {
            let values: Vec<&str> = expression["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            chosen.retain(|c| values.contains(&c.as_str()));
        }
    }
    chosen
}

/// The NetworkPolicies of both renders: all traffic denied by default; from outside the
/// namespace only the API (from anywhere) and Prometheus (namespace `monitoring`, ops ports);
/// the broker's namespace reached only by the relay, the projector, the process manager and the
/// API (its readiness check); DNS for everyone.
#[test]
fn network_policies_deny_by_default_and_let_in_and_out_only_what_is_needed() {
    const BROKER_CLIENTS: &[&str] = &["relay", "projector", "process-manager", "api"];
    let mut problems = Vec::new();
    for render in RENDERS {
        let docs = yaml_documents(&kustomize_build(render), render);
        let mut components: Vec<&str> = docs
            .iter()
            .filter(|d| matches!(kind_of(d).1.as_str(), "Deployment" | "Job"))
            .filter_map(|d| {
                d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"].as_str()
            })
            .collect();
        components.sort_unstable();
        let policies: Vec<&Value> = docs
            .iter()
            .filter(|d| kind_of(d).1 == "NetworkPolicy")
            .collect();
        let denies_all = policies.iter().any(|p| {
            p["spec"]["podSelector"]
                .as_object()
                .is_some_and(serde_json::Map::is_empty)
                && p["spec"]["policyTypes"]
                    .as_array()
                    .is_some_and(|t| t.len() == 2)
                && p["spec"]["ingress"].is_null()
                && p["spec"]["egress"].is_null()
        });
        if !denies_all {
            problems.push(format!("{render}: no default-deny policy (empty podSelector, Ingress and Egress, no rules)"));
        }
        let mut dns: BTreeSet<String> = BTreeSet::new();
        for policy in &policies {
            let name = kind_of(policy).2;
            let pods = selected(policy, &components);
            for rule in policy["spec"]["ingress"].as_array().into_iter().flatten() {
                let sources = rule["from"].as_array().cloned().unwrap_or_default();
                let from_anywhere =
                    sources.is_empty() || sources.iter().any(|s| !s["ipBlock"].is_null());
                if from_anywhere && pods.iter().any(|p| p != "api") {
                    problems.push(format!("{render}: NetworkPolicy {name} lets anyone reach {pods:?}; only the API may be reached from outside"));
                }
                for source in &sources {
                    let namespace = &source["namespaceSelector"];
                    if !namespace.is_null()
                        && namespace["matchLabels"]["kubernetes.io/metadata.name"] != "monitoring"
                        && pods.iter().any(|p| p != "api")
                    {
                        problems.push(format!("{render}: NetworkPolicy {name} lets namespace {namespace} reach {pods:?}"));
                    }
                }
            }
            for rule in policy["spec"]["egress"].as_array().into_iter().flatten() {
                let to_broker = rule["to"].as_array().into_iter().flatten().any(|t| {
                    t["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "kafka"
                }) || rule["to"].is_null();
                let broker_port = rule["ports"]
                    .as_array()
                    .is_none_or(|ports| ports.iter().any(|p| p["port"] == 9092));
                if to_broker && broker_port {
                    for pod in pods
                        .iter()
                        .filter(|p| !BROKER_CLIENTS.contains(&p.as_str()))
                    {
                        problems.push(format!(
                            "{render}: NetworkPolicy {name} lets {pod} reach the broker"
                        ));
                    }
                }
                if rule["ports"]
                    .as_array()
                    .is_some_and(|ports| ports.iter().any(|p| p["port"] == 53))
                {
                    dns.extend(pods.iter().cloned());
                }
            }
        }
        for component in &components {
            if !dns.contains(*component) {
                problems.push(format!(
                    "{render}: {component} may not resolve names (no egress to port 53)"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "network policies:\n{}",
        problems.join("\n")
    );
}

/// checkov's JSON report: one object, or a list of them (one per framework).
fn checkov_failures(report: &Value, what: &str) -> (u64, Vec<String>) {
    let reports = match report {
        Value::Array(list) => list.clone(),
        other => vec![other.clone()],
    };
    let mut passed = 0;
    let mut failures = Vec::new();
    for report in &reports {
        let summary = &report["summary"];
        passed += summary["passed"].as_u64().unwrap_or(0);
        if summary["parsing_errors"].as_u64().unwrap_or(0) > 0 {
            failures.push(format!(
                "{what}: checkov could not parse {}",
                report["results"]["parsing_errors"]
            ));
        }
        for check in report["results"]["failed_checks"]
            .as_array()
            .into_iter()
            .flatten()
        {
            failures.push(format!(
                "{what}: {} {} — {} ({}{})",
                check["check_id"].as_str().unwrap_or("?"),
                check["check_name"].as_str().unwrap_or("?"),
                check["resource"].as_str().unwrap_or("?"),
                check["file_path"].as_str().unwrap_or("?"),
                check["file_line_range"]
            ));
        }
    }
    (passed, failures)
}

#[test]
fn checkov_finds_nothing_in_the_dockerfile_and_the_rendered_manifests() {
    let config = repo().join("deploy/tools/checkov.yaml");
    // Every skip carries its reason.
    let text = std::fs::read_to_string(&config).expect("deploy/tools/checkov.yaml");
    for line in text.lines().filter(|l| l.trim_start().starts_with("- CKV")) {
        let reason = line
            .split_once("# reason:")
            .map(|(_, r)| r.trim())
            .unwrap_or_default();
        assert!(
            reason.len() >= 20,
            "deploy/tools/checkov.yaml skips a check without a written reason (`- CKV_... # reason: why`): {line}"
        );
    }
    let dir = scratch("checkov");
    for render in RENDERS {
        std::fs::write(
            dir.join(format!("{}.yaml", render.replace('/', "_"))),
            kustomize_build(render),
        )
        .expect("render written");
    }
    let mut failures = Vec::new();
    for (what, args) in [
        (
            "deploy/Dockerfile".to_owned(),
            vec![
                "-f".into(),
                repo().join("deploy/Dockerfile").display().to_string(),
                "--framework".into(),
                "dockerfile".into(),
            ],
        ),
        (
            format!("rendered manifests ({})", RENDERS.join(", ")),
            vec![
                "-d".into(),
                dir.display().to_string(),
                "--framework".into(),
                "kubernetes".into(),
            ],
        ),
    ] {
        let output = run(
            Command::new(deploy_tool("checkov"))
                .arg("--config-file")
                .arg(&config)
                .args(&args)
                .args(["--output", "json"]),
            "checkov",
        );
        let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "checkov on {what} printed no JSON report ({e}):\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        let (passed, found) = checkov_failures(&report, &what);
        assert!(passed > 0, "checkov ran no check on {what}: {report}");
        failures.extend(found);
    }
    assert!(
        failures.is_empty(),
        "checkov failed checks (fix them, or skip one in deploy/tools/checkov.yaml with its reason):\n{}",
        failures.join("\n")
    );
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions() -> Vec<String> {
    let text =
        std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
}

/// The workspace's binaries and member directories (cargo metadata).
fn workspace() -> (BTreeSet<String>, Vec<PathBuf>) {
    let output = run(
        Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--no-deps",
                "--format-version",
                "1",
                "--manifest-path",
            ])
            .arg(repo().join("Cargo.toml")),
        "cargo metadata",
    );
    assert!(output.status.success(), "cargo metadata failed");
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata JSON");
    let mut bins = BTreeSet::new();
    let mut members = Vec::new();
    for package in metadata["packages"].as_array().expect("packages") {
        let manifest = PathBuf::from(package["manifest_path"].as_str().expect("manifest path"));
        members.push(manifest.parent().expect("a crate directory").to_path_buf());
        for target in package["targets"].as_array().expect("targets") {
            if target["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
            {
                bins.insert(target["name"].as_str().expect("name").to_owned());
            }
        }
    }
    (bins, members)
}

#[test]
fn the_dockerfile_copies_what_exists_and_builds_every_binary_of_the_workspace() {
    let root = repo();
    let instructions = dockerfile_instructions();
    let ignored: Vec<String> = std::fs::read_to_string(root.join(".dockerignore"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    let (bins, members) = workspace();
    let mut problems = Vec::new();
    let mut copied = Vec::new();
    let mut built = BTreeSet::new();
    let mut stages = BTreeMap::new(); // stage → (binary copied in, has a HEALTHCHECK CMD)
    let mut stage = String::new();
    for instruction in &instructions {
        let words: Vec<&str> = instruction.split_whitespace().collect();
        match words.first().map(|w| w.to_ascii_uppercase()).as_deref() {
            Some("FROM") => {
                stage = words
                    .iter()
                    .position(|w| w.eq_ignore_ascii_case("AS"))
                    .and_then(|i| words.get(i + 1))
                    .map_or_else(String::new, |s| (*s).to_owned());
                stages.insert(stage.clone(), (None::<String>, false));
            }
            Some("COPY") => {
                let args: Vec<&str> = words[1..]
                    .iter()
                    .copied()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let from_stage = words.iter().any(|w| w.starts_with("--from="));
                let (sources, _destination) = args.split_at(args.len().saturating_sub(1));
                if from_stage {
                    for source in sources {
                        if let Some(binary) = source.strip_prefix("/out/") {
                            if !bins.contains(binary) {
                                problems.push(format!(
                                    "stage {stage} copies /out/{binary}, which is no binary of the workspace ({bins:?})"
                                ));
                            }
                            if let Some(entry) = stages.get_mut(&stage) {
                                entry.0 = Some(binary.to_owned());
                            }
                        }
                    }
                    continue;
                }
                for source in sources {
                    let source = source.trim_end_matches('/');
                    if source.contains(['*', '?', '$']) {
                        problems.push(format!(
                            "COPY {source}: name the paths, no patterns or variables"
                        ));
                    } else if !root.join(source).exists() {
                        problems.push(format!(
                            "COPY {source}: no such path in the repository (`{instruction}`)"
                        ));
                    } else if ignored
                        .iter()
                        .any(|i| source == i || source.starts_with(&format!("{i}/")))
                    {
                        problems.push(format!(
                            "COPY {source}: excluded from the build context by .dockerignore"
                        ));
                    }
                    copied.push(root.join(source));
                }
            }
            Some("RUN") if instruction.contains("cargo build") => {
                if !instruction.contains("--locked") || !instruction.contains("--release") {
                    problems.push(format!(
                        "the build must be `cargo build --release --locked`: {instruction}"
                    ));
                }
                for pair in words.windows(2) {
                    if pair[0] == "--bin" {
                        built.insert(pair[1].to_owned());
                    }
                }
            }
            Some("HEALTHCHECK") if words.get(1) != Some(&"NONE") => {
                if let Some(entry) = stages.get_mut(&stage) {
                    entry.1 = true;
                }
            }
            Some("USER") => {
                let user = words.get(1).copied().unwrap_or_default();
                let uid = user.split(':').next().unwrap_or_default();
                if !uid.parse::<u32>().is_ok_and(|uid| uid > 0) {
                    problems.push(format!(
                        "USER {user}: the runtime user must be a numeric uid other than 0"
                    ));
                }
            }
            _ => {}
        }
    }
    if built != bins {
        problems.push(format!(
            "the build builds {built:?}; the workspace's binaries are {bins:?}: every binary gets an image"
        ));
    }
    for member in &members {
        if !copied.iter().any(|c| member.starts_with(c)) {
            problems.push(format!(
                "workspace member {} is not copied into the build (cargo needs every member)",
                member.display()
            ));
        }
    }
    // A target per binary, on the non-root runtime, with a health check where it serves HTTP.
    let servers = [
        "api",
        "relay",
        "projector",
        "process-manager",
        "schema-registry",
    ];
    for binary in &bins {
        match stages
            .iter()
            .find(|(_, (copied, _))| copied.as_deref() == Some(binary.as_str()))
        {
            None => problems.push(format!("no image target copies the binary {binary}")),
            Some((name, (_, healthcheck))) => {
                if servers.contains(&binary.as_str()) && !healthcheck {
                    problems.push(format!("target {name} serves HTTP but has no HEALTHCHECK"));
                }
            }
        }
    }
    let runtime_from = instructions
        .iter()
        .filter(|i| i.to_ascii_uppercase().starts_with("FROM RUNTIME AS"))
        .count();
    if runtime_from != bins.len() {
        problems.push(format!(
            "{runtime_from} targets are built FROM runtime (the non-root stage); there are {} binaries",
            bins.len()
        ));
    }
    // The compose file builds targets that exist, and waits only on services with health checks.
    let compose = yaml_file("deploy/compose.yaml");
    for (name, service) in compose["services"].as_object().expect("compose services") {
        if let Some(target) = service["build"]["target"].as_str() {
            if !stages.contains_key(target) {
                problems.push(format!(
                    "compose service {name} builds target {target}, which deploy/Dockerfile lacks"
                ));
            }
        }
        for (dependency, condition) in service["depends_on"].as_object().into_iter().flatten() {
            if condition["condition"] == "service_healthy" {
                let other = &compose["services"][dependency];
                let checked = other["healthcheck"].is_object()
                    || other["build"]["target"]
                        .as_str()
                        .and_then(|t| stages.get(t))
                        .is_some_and(|(_, healthcheck)| *healthcheck);
                if !checked {
                    problems.push(format!("compose service {name} waits for {dependency} to be healthy, which has no health check"));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "deploy/Dockerfile and deploy/compose.yaml:\n{}",
        problems.join("\n")
    );
}

/// Whether `name` occurs in `text` as a whole word (not inside a longer variable name).
fn mentions(text: &str, name: &str) -> bool {
    text.match_indices(name).any(|(at, _)| {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        !text[..at].chars().next_back().is_some_and(word)
            && !text[at + name.len()..].chars().next().is_some_and(word)
    })
}

#[test]
fn every_variable_the_deployment_sets_is_one_the_binaries_read() {
    // The workspace's Rust sources (envy's field docs name each variable: `KAFKA_BOOTSTRAP_SERVERS`).
    let mut sources = String::new();
    let mut stack = vec![repo()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable").flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() && !name.starts_with('.') && name != "target" && name != "tests" {
                stack.push(path);
            } else if name.ends_with(".rs") {
                sources.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    let mut set: Vec<(String, String)> = Vec::new();
    for render in RENDERS {
        for doc in yaml_documents(&kustomize_build(render), render) {
            let (_, kind, name) = kind_of(&doc);
            if kind == "ConfigMap" {
                for key in doc["data"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k)
                {
                    set.push((key.clone(), format!("{render}: ConfigMap {name}")));
                }
            }
            for container in doc["spec"]["template"]["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
            {
                for env in container["env"].as_array().into_iter().flatten() {
                    let var = env["name"].as_str().unwrap_or_default().to_owned();
                    set.push((var, format!("{render}: {kind} {name}")));
                }
            }
        }
    }
    let compose = yaml_file("deploy/compose.yaml");
    for (name, service) in compose["services"].as_object().expect("services") {
        if service["build"].is_null() {
            continue; // PostgreSQL's and Kafka's own images.
        }
        for var in service["environment"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            set.push((var.clone(), format!("deploy/compose.yaml: {name}")));
        }
    }
    assert!(set.len() > 20, "the variables were not found: {set:?}");
    let unread: Vec<String> = set
        .iter()
        // The OpenTelemetry SDK's standard variables, read by the SDK rather than by our code.
        .filter(|(var, _)| !var.starts_with("OTEL_"))
        .filter(|(var, _)| !mentions(&sources, var))
        .map(|(var, at)| format!("{var} ({at})"))
        .collect();
    assert!(
        unread.is_empty(),
        "variables set by the deployment that no binary reads (a typo, or a setting that does not exist):\n{}",
        unread.join("\n")
    );
}

/// Every metric the alert rules and the dashboard read, with where each is used.
fn metrics_used() -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let rules = yaml_file("deploy/monitoring/alerts.yaml");
    let mut recorded = BTreeSet::new();
    let groups = rules["groups"].as_array().expect("alerts.yaml: groups");
    assert!(!groups.is_empty(), "alerts.yaml has no rule group");
    for group in groups {
        for rule in group["rules"]
            .as_array()
            .expect("alerts.yaml: rules of each group")
        {
            let name = rule["alert"]
                .as_str()
                .or_else(|| rule["record"].as_str())
                .expect("alert or record");
            if let Some(record) = rule["record"].as_str() {
                recorded.insert(record.to_owned());
            } else {
                assert!(
                    rule["labels"]["severity"].is_string()
                        && rule["annotations"]["summary"].is_string(),
                    "alerts.yaml: alert {name} needs labels.severity and annotations.summary"
                );
            }
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("alerts.yaml: {name} has no expr"));
            for metric in metric_names(expr) {
                used.entry(metric)
                    .or_default()
                    .insert(format!("alerts.yaml {name}"));
            }
        }
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/monitoring/dashboard.json"))
            .expect("dashboard.json"),
    )
    .expect("dashboard.json is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "dashboard.json has no panels"
    );
    fn walk(value: &Value, title: &str, used: &mut BTreeMap<String, BTreeSet<String>>) {
        match value {
            Value::Object(map) => {
                let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(expr) = map.get("expr").and_then(Value::as_str) {
                    for metric in metric_names(expr) {
                        used.entry(metric)
                            .or_default()
                            .insert(format!("dashboard.json panel \"{title}\""));
                    }
                }
                for child in map.values() {
                    walk(child, title, used);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, title, used)),
            _ => {}
        }
    }
    walk(&dashboard["panels"], "", &mut used);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str());
        if variable["type"] == "query" {
            for metric in template_metric_names(query.unwrap_or_default()) {
                used.entry(metric).or_default().insert(format!(
                    "dashboard.json variable ${}",
                    variable["name"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    used.retain(|metric, _| !recorded.contains(metric));
    used
}

async fn get(url: &str) -> Option<(u16, String)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_the_dashboard_name_is_exported_by_a_running_process() {
    let used = metrics_used();
    assert!(
        used.len() >= 10,
        "too few metrics found in the rules and dashboard: {used:?}"
    );
    let env = TestEnv::start("deployment").await;

    // The backbone's processes as deployed: the release of each binary, its ops endpoint on.
    let api_port = free_port().to_string();
    let api_listen = format!("127.0.0.1:{api_port}");
    let api = format!("http://{api_listen}");
    let mut processes = vec![(
        "api",
        api.clone(),
        backbone_tests::KillOnDrop(env.spawn_process(
            "api",
            &[
                ("API_LISTEN", api_listen.as_str()),
                ("AUTH_JWT_SECRET", TEST_JWT_SECRET),
                ("PAYMENTS_WEBHOOK_SECRET", TEST_WEBHOOK_SECRET),
                ("API_READINESS_INTERVAL_MS", "200"),
                // Low, so the flood below is limited (api_rate_limited_total).
                ("API_RATE_LIMIT_PER_SECOND", "1"),
                ("API_RATE_LIMIT_BURST", "5"),
            ],
        )),
    )];
    for binary in ["relay", "projector", "process-manager"] {
        let listen = format!("127.0.0.1:{}", free_port());
        let child = env.spawn_process(
            binary,
            &[
                ("METRICS_LISTEN", listen.as_str()),
                ("READY_CHECK_INTERVAL_MS", "200"),
            ],
        );
        processes.push((
            binary,
            format!("http://{listen}"),
            backbone_tests::KillOnDrop(child),
        ));
    }
    for (binary, base, _) in &processes {
        eventually(
            Duration::from_secs(90),
            &format!("{binary} ready"),
            || async { (get(&format!("{base}/health/ready")).await?.0 == 200).then_some(()) },
        )
        .await;
    }

    // Every httpGet probe of the manifests answers 200 on the running component.
    let base = yaml_documents(&kustomize_build("deploy/k8s/base"), "base");
    for doc in base.iter().filter(|d| kind_of(d).1 == "Deployment") {
        let component = kind_of(doc).2;
        let url = if component == "schema-registry" {
            env.registry.schema_registry_url.clone()
        } else {
            processes
                .iter()
                .find(|(binary, _, _)| *binary == component)
                .map(|(_, base, _)| base.clone())
                .unwrap_or_else(|| panic!("no running process for Deployment {component}"))
        };
        let container = &doc["spec"]["template"]["spec"]["containers"][0];
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            if let Some(path) = container[probe]["httpGet"]["path"].as_str() {
                let status = get(&format!("{url}{path}")).await.map(|(s, _)| s);
                assert_eq!(
                    status,
                    Some(200),
                    "Deployment {component}'s {probe} GET {path}: the running {component} answers {status:?}"
                );
            }
        }
    }

    // The images' HEALTHCHECK probe against a live process: 200 passes, anything else fails.
    let probe = repo().join("deploy/docker/http-probe");
    let live = run(
        Command::new(&probe).args([api_port.as_str(), "/health/live"]),
        "http-probe",
    );
    assert!(
        live.status.success(),
        "http-probe {api_port} /health/live: {live:?}"
    );
    let missing = run(
        Command::new(&probe).args([api_port.as_str(), "/no-such-path"]),
        "http-probe",
    );
    assert!(!missing.status.success(), "http-probe passed a 404");

    // Traffic that makes the lazily registered series appear: an order through the API (its
    // commands, publication, projection and flow), a record no read model can decode (a dead
    // letter), a flood from one client (429s).
    let customer = Uuid::new_v4();
    let customer_client = client_as(Role::Customer, customer);
    let order = place_request(&customer_client, &api, &order_request(customer)).await;
    let topic = env
        .kafka
        .topics()
        .for_aggregate("order")
        .expect("orders topic");
    let producer: FutureProducer = env.kafka.client_config().create().expect("producer");
    producer
        .send(
            FutureRecord::to(&topic)
                .key("poison")
                .payload("\u{0}\u{0}\u{0}\u{0}\u{9}garbage"),
            Duration::from_secs(10),
        )
        .await
        .expect("poison produced");
    let flooder = client_as(Role::Analyst, Uuid::new_v4());
    let mut limited = 0;
    for _ in 0..20 {
        let status = flooder
            .get(format!("{api}/orders/{order}/tracking"))
            .send()
            .await
            .expect("sent")
            .status();
        limited += usize::from(status.as_u16() == 429);
    }
    assert!(limited > 0, "the flood was never rate limited");

    // Every metric named is exported by some process (the lag and stuck-flow gauges are set
    // on their own loops: waited for, then named if still missing).
    let scrape = || async {
        let mut exported: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (binary, base, _) in &processes {
            let (status, page) = get(&format!("{base}/metrics")).await.unwrap_or_default();
            assert_eq!(status, 200, "{binary} serves /metrics");
            for series in exposed_series(&page) {
                exported.entry(series).or_default().push(binary);
            }
        }
        exported
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let exported = loop {
        let exported = scrape().await;
        if used.keys().all(|m| exported.contains_key(m)) || std::time::Instant::now() > deadline {
            break exported;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let missing: Vec<String> = used
        .iter()
        .filter(|(metric, _)| !exported.contains_key(*metric))
        .map(|(metric, places)| {
            format!("{metric} (used by {}) is exported by none of api, relay, projector, process-manager", places.iter().cloned().collect::<Vec<_>>().join(", "))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/monitoring names metrics no running process exports:\n{}\n(exported: {:?})",
        missing.join("\n"),
        exported.keys().collect::<Vec<_>>()
    );

    // The consumer groups the ScaledObject watches are the groups the projector joined (the
    // manifests' prefix swapped for this run's).
    let prefix = base
        .iter()
        .find(|d| kind_of(d).1 == "ConfigMap")
        .and_then(|d| {
            d["data"]["PROJECTOR_GROUP_PREFIX"]
                .as_str()
                .map(str::to_owned)
        })
        .expect("PROJECTOR_GROUP_PREFIX in the ConfigMap");
    for object in base.iter().filter(|d| kind_of(d).1 == "ScaledObject") {
        for trigger in object["spec"]["triggers"].as_array().into_iter().flatten() {
            let group = trigger["metadata"]["consumerGroup"]
                .as_str()
                .expect("consumerGroup");
            let read_model = group
                .strip_prefix(prefix.as_str())
                .expect("the ConfigMap's prefix");
            let live_group = env.group_of(read_model);
            eventually(
                Duration::from_secs(60),
                &format!("group {live_group} has members"),
                || async {
                    env.group_members(&live_group)
                        .filter(|m| !m.is_empty())
                        .map(|_| ())
                },
            )
            .await;
        }
    }

    drop(processes);
    env.stop().await;
}

#[tokio::test]
async fn the_migration_job_migrates_a_fresh_database_and_can_run_again() {
    use sqlx::{Connection, PgConnection};
    let database = format!(
        "bt_{}_migrate_{}",
        backbone_tests::test_run_id(),
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let admin = backbone_tests::admin_url();
    let mut connection = PgConnection::connect(&admin)
        .await
        .expect("the test PostgreSQL server");
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&mut connection)
        .await
        .expect("created");
    let url = backbone_tests::with_database(&admin, &database);
    // As the Job runs it: the replay-tools image's binary with `migrate` and DATABASE_URL.
    for round in 1..=2 {
        let output = run(
            Command::new(backbone_tests::binary_path("replay-tools"))
                .arg("migrate")
                .env("DATABASE_URL", &url),
            "replay-tools migrate",
        );
        assert!(
            output.status.success(),
            "replay-tools migrate (run {round}) failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut db = PgConnection::connect(&url)
        .await
        .expect("the migrated database");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut db)
        .await
        .expect("sqlx's migration table");
    let files = std::fs::read_dir(repo().join("commands/migrations"))
        .expect("migrations")
        .count();
    assert_eq!(
        applied,
        i64::try_from(files).expect("count"),
        "every migration applied"
    );
    for read_model in projections::read_models::names() {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM information_schema.schemata WHERE schema_name = $1)",
        )
        .bind(read_model)
        .fetch_one(&mut db)
        .await
        .expect("schemata");
        assert!(exists, "read model {read_model}'s schema was created");
    }
    drop(db);
    sqlx::query(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .execute(&mut connection)
        .await
        .expect("dropped");
}
